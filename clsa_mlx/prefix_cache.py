"""Prefilled documents kept for the next conversation: the whole cache at the end of a document
prefix (global K/V, index keys, every window / retention layer's state), keyed by the model and
the rendered prefix. The last few live in memory; on disk they are mlx-lm prompt-cache files in a
bounded folder, least recently used evicted first. The folder is ours only if we made it (a marker
file says so) or it was empty: only files with our suffix are ever read, replaced or deleted."""

import copy
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx_lm.models.cache import KVCache, save_prompt_cache

from .cache_check import check_cache, read_cache_file

_SETTING = os.environ.get("CLSA_MLX_DOCUMENT_CACHE", "~/.cache/clsa-mlx/documents")
FOLDER = Path(_SETTING).expanduser() if _SETTING.strip() else None  # "": no folder (memory only)
MIN_TOKENS = 2048  # shorter prefixes prefill in about the time a file takes to read
SUFFIX = ".clsa-document.safetensors"
MARKER = "CLSA_MLX_DOCUMENT_CACHE"  # in a folder we made: "its *.clsa-document.safetensors are ours"
# our entries (also as they were named before the suffix, evicted first as never read), and writes cut short
_ENTRY = re.compile(r"[0-9A-Za-z_-]+-[0-9a-f]{32}(\.clsa-document)?\.safetensors")
_OURS = re.compile(rf"{_ENTRY.pattern}|[0-9A-Za-z_-]+-[0-9a-f]{{32}}\.partial-[0-9]+\.safetensors"
                   r"|\.[0-9a-f]{32}\.partial-[0-9]+\.safetensors")


class FolderError(ValueError):
    """A document-cache folder we may not use."""


def check_folder(folder: Path) -> Path:
    """`folder` if it is ours to fill: missing (made at the first write), or a folder holding our
    marker, nothing, or only document-cache files."""
    if not folder.exists() and not folder.is_symlink():
        return folder
    if not folder.is_dir():
        raise FolderError(f"{folder}: the document cache folder (CLSA_MLX_DOCUMENT_CACHE) is not a folder; "
                          "name another, or --document-cache-gb 0")
    try:
        names = [p.name for p in folder.iterdir()]
    except OSError as e:
        raise FolderError(f"{folder}: cannot read the document cache folder ({e.strerror})") from None
    if MARKER not in names and not all(_OURS.fullmatch(n) for n in names):
        raise FolderError(f"{folder}: the document cache folder holds other files; it keeps only a folder it "
                          "made or an empty one (CLSA_MLX_DOCUMENT_CACHE names another, --document-cache-gb 0 "
                          "keeps none)")
    return folder


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
        if not (isinstance(max_gb, (int, float)) and 0 <= max_gb < 1e9):  # also nan and inf
            raise ValueError(f"the document cache size must be 0 to 1e9 GB, got {max_gb}")
        folder = None if folder is None or max_gb == 0 else check_folder(Path(folder))
        self.model_id, self.folder, self.max_bytes, self.in_memory = model_id, folder, int(max_gb * 1e9), in_memory
        self.memory = {}  # key -> (cache, ids), most recent last

    def _key(self, text: str) -> str:
        return hashlib.sha256(f"{self.model_id}\0{text}".encode()).hexdigest()[:32]

    def _path(self, key: str) -> Path:
        return self.folder / f"{self.model_id}-{key}{SUFFIX}"

    def get(self, text: str, ids: list, model) -> Optional[tuple]:
        """-> (a fresh copy of the cache, its token ids), or None. An entry is used only if it
        holds `ids`, the tokens of `text` (so a file renamed or edited to claim another text is
        not), and a file's caches pass `check_cache` against `model`; a file that fails (or cannot
        be read) is removed."""
        key = self._key(text)
        if key in self.memory and self.memory[key][1] == ids:
            self.memory[key] = self.memory.pop(key)
            cache, ids = self.memory[key]
            return compact(cache), list(ids)
        path = self._path(key) if self.folder else None
        if path is None or path.is_symlink() or not path.is_file():
            return None
        try:
            cache, meta = read_cache_file(path)
            if meta.get("key") != key or json.loads(meta["ids"]) != ids:
                raise ValueError("not this prefix")
            check_cache(model, cache, len(ids))
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
        tmp = self.folder / f".{key}.partial-{os.getpid()}.safetensors"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if not os.path.lexists(self.folder / MARKER):
                (self.folder / MARKER).write_text("clsa-mlx keeps prefilled documents here; it deletes only its "
                                                  f"own *{SUFFIX} files\n")
            tmp.unlink(missing_ok=True)  # never written through a link left under this name
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
        files = [p for p in self.folder.glob("*.safetensors") if _ENTRY.fullmatch(p.name) and not p.is_symlink()]
        files.sort(key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        while files and total > self.max_bytes:
            oldest = files.pop(0)
            total -= oldest.stat().st_size
            oldest.unlink(missing_ok=True)
