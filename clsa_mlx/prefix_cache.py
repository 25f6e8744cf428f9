"""Prefilled documents kept for the next conversation: the whole cache at the end of a document
prefix (global K/V, index keys, every window / retention layer's state), keyed by the model and
the rendered prefix. The last few live in memory; on disk they are mlx-lm prompt-cache files in a
bounded folder, least recently used evicted first."""

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx_lm.models.cache import KVCache, load_prompt_cache, save_prompt_cache

FOLDER = Path(os.environ.get("CLSA_MLX_DOCUMENT_CACHE", "~/.cache/clsa-mlx/documents")).expanduser()
MIN_TOKENS = 2048  # shorter prefixes prefill in about the time a file takes to read


def compact(cache: list) -> list:
    """A copy of `cache` holding only its rows: a global cache's reserved rows are dropped."""
    out = []
    for c in cache:
        if isinstance(c, KVCache):
            k = KVCache()
            k.state = (c.keys[..., : c.offset, :], c.values[..., : c.offset, :], c.offset)
            out.append(k)
        else:
            out.append(copy.deepcopy(c))
    return out


class PrefixCache:
    def __init__(self, model_id: str, folder: Optional[Path] = FOLDER, max_gb: float = 8.0, in_memory: int = 2):
        self.model_id, self.folder, self.max_bytes, self.in_memory = model_id, folder, int(max_gb * 1e9), in_memory
        self.memory = {}  # key -> (cache, ids), most recent last

    def _key(self, text: str) -> str:
        return hashlib.sha256(f"{self.model_id}\0{text}".encode()).hexdigest()[:32]

    def _path(self, key: str) -> Path:
        return self.folder / f"{self.model_id}-{key}.safetensors"

    def get(self, text: str, check) -> Optional[tuple]:
        """-> (a fresh copy of the cache, its token ids), or None. `check(cache, n)` vets a file's
        caches against the model; a file that fails it (or cannot be read) is removed."""
        key = self._key(text)
        if key in self.memory:
            self.memory[key] = self.memory.pop(key)
            cache, ids = self.memory[key]
            return compact(cache), list(ids)
        path = self._path(key) if self.folder else None
        if path is None or not path.is_file():
            return None
        try:
            cache, meta = load_prompt_cache(str(path), return_metadata=True)
            ids = json.loads(meta["ids"])
            if meta.get("key") != key or not isinstance(ids, list):
                raise ValueError("not this prefix")
            check(cache, len(ids))
        except Exception:  # a stale, foreign or broken file: prefill again and rewrite it
            path.unlink(missing_ok=True)
            return None
        os.utime(path)
        self._remember(key, cache, ids)
        return compact(cache), list(ids)

    def put(self, text: str, cache: list, ids: list):
        if len(ids) < MIN_TOKENS:
            return
        key, kept = self._key(text), compact(cache)
        mx.eval([c.state for c in kept])
        self._remember(key, kept, ids)
        if self.folder is None:
            return
        tmp = self._path(key).with_suffix(f".partial-{os.getpid()}.safetensors")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            save_prompt_cache(str(tmp), kept, {"key": key, "ids": json.dumps(ids)})
            os.replace(tmp, self._path(key))
            self._evict()
        except (OSError, RuntimeError, ValueError):  # a full disk or read-only folder: memory only
            Path(tmp).unlink(missing_ok=True)

    def _remember(self, key, cache, ids):
        self.memory[key] = (cache, list(ids))
        while len(self.memory) > self.in_memory:
            self.memory.pop(next(iter(self.memory)))

    def _evict(self):
        files = sorted((p for p in self.folder.glob("*.safetensors") if ".partial-" not in p.name),
                       key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        while files and total > self.max_bytes:
            oldest = files.pop(0)
            total -= oldest.stat().st_size
            oldest.unlink(missing_ok=True)
