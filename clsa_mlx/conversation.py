"""A conversation that keeps its prompt cache across turns: a new turn prefills only its new
tokens, documents are prefilled as soon as they are added, sessions save and resume (as
mlx-lm prompt-cache files that `mlx_lm generate --prompt-cache-file` continues)."""

import copy
import hashlib
import json
import os
import re
import shlex
import stat
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx_lm.models.cache import save_prompt_cache

from .cache_check import CacheError, check_cache, read_cache_file
from .generate import context_used, prefill, stream_generate
from .loading import OneLineError, one_line, printable
from .prefix_cache import PrefixCache

PREFILL_STEP = 2048
CHUNK_SECONDS = 1.0  # a prompt chunk's time on a slow machine: how long Ctrl-C may wait
SENTINEL = "\x00QUESTION\x00"
HEAD_CHARS = 8  # characters per token of context: a longer document's head is tokenized first


class ChatError(OneLineError):
    """A problem the user can fix; printed as one line, the session continues."""


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")


def model_identity(folder: Path) -> str:
    """Cheap fingerprint of what turns text into a cache: the config, the head and tail of each
    weight file, and the tokenizer and chat template files (a cache of other token ids is not
    this model's)."""
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for f in sorted(folder.glob("model*.safetensors")):
        with open(f, "rb") as fh:
            h.update(f.name.encode() + str(f.stat().st_size).encode() + fh.read(1 << 20))
            fh.seek(max(0, f.stat().st_size - (1 << 20)))
            h.update(fh.read())
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            h.update(name.encode() + b"\0" + hashlib.sha256((folder / name).read_bytes()).digest())
    return h.hexdigest()[:16]


def memory_bytes() -> int:
    if mx.metal.is_available():
        return int(mx.metal.device_info()["max_recommended_working_set_size"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def context_limit(model, requested: Optional[int] = None) -> int:
    """The model's max_seq_len, capped so the K/V and index caches fit in half the memory."""
    a = model.args
    per_token = (2 * model.cross_decoder.n_kv_heads * a.head_dim + (a.index_head_dim if a.sparse else 0)) * 2
    limits = [memory_bytes() // 2 // per_token, requested or 10**9]
    if a.max_seq_len > 0:
        limits.append(a.max_seq_len)
    return int(min(limits))


def document_path(arg: str) -> Path:
    """A path as typed or dropped into a terminal: quotes and backslash-escaped spaces undone."""
    try:
        parts = shlex.split(arg)
    except ValueError:  # an unbalanced quote: take the text as it is
        parts = [arg]
    return Path(parts[0] if len(parts) == 1 else arg).expanduser()


def regular_file(path: Path, what: str = "file", command: str = "/file") -> Path:
    """`path` if it is a regular file (or a link to one); a folder, FIFO or device is named as such."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ChatError(f"{path}: no such {what}") from None
    except OSError as e:
        raise ChatError(f"{path}: cannot read ({e.strerror})") from None
    if stat.S_ISREG(mode):
        return path
    kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "not a regular file")
    raise ChatError(f"{path}: is {kind}; {command} takes one {what}")


def read_document(path: Path) -> str:
    regular_file(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ChatError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise ChatError(f"{path}: cannot read ({e.strerror})") from None
    if not text.strip():
        raise ChatError(f"{path}: empty; nothing added")
    return text


class Conversation:
    def __init__(self, model, tokenizer, model_id: str, system: Optional[str] = None,
                 max_context: Optional[int] = None, drop_oldest: bool = False, prefill_step: int = PREFILL_STEP,
                 group=None, prefixes: Optional[PrefixCache] = None, model_path: Optional[str] = None):
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.model_path = model_path  # the folder a saved session names for mlx_lm generate
        self.group = group if group is not None and group.size() > 1 else None  # a model sharded over ranks
        self.prefixes = prefixes if self.group is None else None  # each rank holds only its heads
        self.prefill_step = prefill_step
        self.limit, self.drop_oldest = context_limit(model, max_context), drop_oldest
        self.notes = []  # what the chat says once at its start
        self.system_role = self._probe_template()
        self.reset(system)

    def _probe_template(self) -> bool:
        """Renders a probe conversation now, so that a chat template that fails or drops the text is
        found at the start, not at a question. -> whether it takes a system message (if not, the
        system prompt opens the first user message)."""
        where = f"{self.model_path or 'the model'}: the chat template (chat_template.jinja / tokenizer_config.json)"
        turns = [{"role": "user", "content": "probe one"}, {"role": "assistant", "content": "probe two"},
                 {"role": "user", "content": "probe three" + SENTINEL}]

        def render(messages):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

        try:
            text = render(turns)
        except Exception as e:
            raise ChatError(f"{where} fails on a user/assistant conversation ({type(e).__name__}: "
                            f"{one_line(e, 160)})") from None
        if not isinstance(text, str) or not all(t["content"] in text for t in turns):
            raise ChatError(f"{where} drops the messages' text; the chat cannot use it")
        try:
            with_system = render([{"role": "system", "content": "probe system"}] + turns)
            if "probe system" in with_system and all(t["content"] in with_system for t in turns):
                return True
        except Exception:
            pass
        self.notes.append("the chat template takes no system message: a system prompt opens the first user message")
        return False

    def reset(self, system: Optional[str] = None):
        self.system = system if system is not None else getattr(self, "system", None)
        self.messages, self.documents = [], []
        self.last, self.dropped, self.reused = None, 0, False
        self._clear_cache()

    def _clear_cache(self):
        # ids: the tokens the cache holds; text_in_cache: the rendered text they stand for
        self.cache, self.text_in_cache, self.ids = self.model.make_cache(), "", []

    @property
    def used(self) -> int:
        return context_used(self.model, self.cache)

    def _render(self, user_content: str) -> str:
        messages = self.messages + [{"role": "user", "content": user_content}]
        if self.system and not self.system_role:
            messages = [{"role": "user", "content": f"{self.system}\n\n{messages[0]['content']}"}] + messages[1:]
        head = [{"role": "system", "content": self.system}] if self.system and self.system_role else []
        return self.tokenizer.apply_chat_template(head + messages, tokenize=False, add_generation_prompt=True)

    def _rendered_before(self, content: str) -> str:
        """The rendered conversation up to the end of `content`, the start of a new user message."""
        full = self._render(content + SENTINEL)
        return full[:full.index(SENTINEL)]

    def _content(self, question: str) -> str:
        """A question about documents reads as the model was trained on: the documents, then
        `Question: ...`; follow-ups (documents already in earlier turns) as `Question: ...` alone."""
        about = self.documents or any(m["role"] == "user" and m["content"].startswith("File ") for m in self.messages)
        return "\n\n".join(self.documents + [f"Question: {question}" if about else question])

    def _new_tokens(self, text: str) -> list:
        """Tokens of `text` past what the cache holds; rebuilds the cache if the text diverged."""
        if not text.startswith(self.text_in_cache):
            self._clear_cache()
        return self.tokenizer.encode(text[len(self.text_in_cache):], add_special_tokens=False)

    def _fit(self, render, reserve: int):
        """-> (text, new tokens) for `render()` of the conversation. On overflow, with
        --drop-oldest, the fewest oldest turns that make it fit are dropped (`self.dropped`
        says how many; the cache is then rebuilt); otherwise, or if even the input alone does
        not fit, it is refused and nothing changes."""
        self.dropped = 0
        text = render()
        ids = self._new_tokens(text)
        if self.used + len(ids) + reserve <= self.limit:
            return text, ids
        messages, cache = self.messages, (self.cache, self.text_in_cache, self.ids)
        for turns in range(1, len(messages) // 2 + 1) if self.drop_oldest else ():
            self.messages = messages[2 * turns:]
            n = len(self.tokenizer.encode(render(), add_special_tokens=False))
            if n + reserve <= self.limit:
                self._clear_cache()
                self.dropped = turns
                text = render()
                return text, self._new_tokens(text)
        self.messages = messages
        self.cache, self.text_in_cache, self.ids = cache
        alone, hint = self._input_alone(render), "/reset, or start with --drop-oldest"
        if alone + reserve > self.limit:
            hint = f"this input alone is {alone} tokens; a larger --max-context or a shorter input"
        elif self.drop_oldest:
            hint = "/reset"
        raise ChatError(f"context overflow: {self.used + len(ids)} tokens + {reserve} for the reply "
                        f"> limit {self.limit}; {hint}")

    def _input_alone(self, render) -> int:
        messages, self.messages = self.messages, []
        try:
            return len(self.tokenizer.encode(render(), add_special_tokens=False))
        finally:
            self.messages = messages

    def _chunk_seconds(self):
        return CHUNK_SECONDS if self.group is None else None  # a sharded model's ranks must chunk alike

    def _prefill(self, ids: list, progress=None):
        self.model.reserve(self.cache, len(ids))
        prefill(self.model, ids, self.cache, self.prefill_step, progress, self._chunk_seconds())

    def add_document(self, path: str, progress=None):
        path = document_path(path)
        least = regular_file(path).stat().st_size // self._piece_bytes()
        room = self.limit if self.drop_oldest else self.limit - self.used
        text = read_document(path) if least <= room else ""
        head = HEAD_CHARS * room  # a long document's tokens counted in a head first: never more than it can hold
        if len(text) > head:
            least = max(least, len(self.tokenizer.encode(text[:head], add_special_tokens=False)) - 64)
        if least > room:  # refused before reading (or tokenizing all of) a document that cannot fit
            raise ChatError(f"context overflow: {path.name} is at least {least} tokens ({path.stat().st_size} "
                            f"bytes), {room} fit; a larger --max-context or a shorter document")
        self.documents.append(f"File {path.name}:\n{text}")

        mark = self._mark()
        try:  # the conversation up to the end of the documents
            prefix, ids = self._fit(lambda: self._rendered_before("\n\n".join(self.documents)), reserve=0)
            # kept only for a conversation's start: the case that repeats, and fewer writes to the disk
            keep = self.prefixes if not self.messages else None
            hit = keep.get(prefix, self.ids + ids, self.model) if keep else None
            if hit:  # prefilled before, by this or an earlier conversation
                self.cache, self.ids = hit
            else:
                self._prefill(ids, progress)
                self.ids = self.ids + ids
        except BaseException:  # refused, or stopped inside the prefill: the document is not added
            self.documents.pop()
            self._give_back(mark)
            raise
        self.text_in_cache, self.reused = prefix, bool(hit)
        if keep and not hit:
            keep.put(prefix, self.cache, self.ids)
        return len(ids)

    def _piece_bytes(self) -> int:
        """At least the most bytes of text one token stands for (twice the longest piece, for a
        normalizer that contracts): a document of B bytes is at least B / this many tokens."""
        if not hasattr(self, "_longest"):
            try:
                vocab = getattr(self.tokenizer, "_tokenizer", self.tokenizer).get_vocab()
                self._longest = 2 * max(4, max(len(p.encode("utf-8", "replace")) for p in vocab))
            except Exception:  # no vocabulary to read: no bound
                self._longest = 1 << 40
        return self._longest

    def _mark(self):
        """What an interrupted command must put back: the conversation, the cache list, the
        length of its global caches and a copy of its window / retention caches (a window's
        rows at most per layer, so the copy is cheap)."""
        n = len(self.model.self_decoder.layers)
        return dict(cache=self.cache, used=self.used, windows=[copy.deepcopy(c) for c in self.cache[:n]],
                    messages=self.messages, text=self.text_in_cache, ids=self.ids)

    def _give_back(self, mark):
        """The conversation and its cache exactly as at `_mark()`: the global K/V and index
        caches trimmed, the window caches restored (or, where the overflow rule rebuilt the
        cache, the untouched old one taken back)."""
        if self.cache is not mark["cache"]:
            self.cache = mark["cache"]
        elif self.used > mark["used"]:
            windows, extra = mark["windows"], self.used - mark["used"]
            for c in self.cache[len(windows):]:
                c.trim(extra)
            self.cache[: len(windows)] = windows
        self.model.release(self.cache)  # the rows reserved for what was not added
        self.messages, self.text_in_cache, self.ids = mark["messages"], mark["text"], mark["ids"]

    def ask(self, question: str, max_tokens: int = 512, progress=None, stop=None, **sampling):
        """Streams the reply's text pieces; `stop()` returning True ends it after the current token."""
        mark = self._mark()
        generated = []
        try:
            full, ids = self._fit(lambda: self._render(self._content(question)), reserve=min(max_tokens, 256))
            for r in stream_generate(self.model, self.tokenizer, ids, max_tokens=max_tokens,
                                     prompt_cache=self.cache, prompt_progress_callback=progress,
                                     prefill_step_size=self.prefill_step, group=self.group,
                                     chunk_seconds=self._chunk_seconds(), **sampling):
                self.last = r
                generated.append(r.token)
                yield r.text  # at the end of turn: what the detokenizer held back, never the EOS token
                if stop and stop():
                    break
        except BaseException:  # refused, or stopped inside the prefill: as if the question was never asked
            self._give_back(mark)
            raise
        eos = self.tokenizer.eos_token_ids
        reply = [t for t in generated if t not in eos]
        self.messages += [{"role": "user", "content": self._content(question)},
                          {"role": "assistant", "content": self.tokenizer.decode(reply)}]
        self.documents = []
        self.text_in_cache = full + self.tokenizer.decode(generated)
        self.ids += ids + generated

    def document_names(self) -> list:
        """Names of the documents in the conversation (in earlier turns, then still pending), as they
        may be printed: a session file's names can hold escape sequences."""
        texts = [m["content"] for m in self.messages if m["role"] == "user"] + self.documents
        return [printable(name) for t in texts for name in re.findall(r"(?:^|\n\n)File ([^\n]+):\n", t)]

    def stats(self) -> str:
        kv = sum(c.nbytes for c in self.cache) / 1e6
        line = f"context {self.used}/{self.limit} tokens | KV cache {kv:.1f} MB | peak memory {mx.get_peak_memory() / 1e9:.2f} GB"
        r = self.last
        if r is None:
            return line
        return (f"prompt {r.prompt_tokens} tok, {r.prompt_tps:.0f} tok/s | generated {r.generation_tokens} tok, "
                f"{r.generation_tps:.1f} tok/s | " + line)

    def _whole_model(self, what: str):
        if self.group is not None:
            raise ChatError(f"{what}: sessions of a model sharded over {self.group.size()} ranks are not supported "
                            "(each rank holds only its heads of the cache)")

    def _prefill_to_next_input(self):
        """Prefills up to where the next user text goes: past the pending documents and their
        separator, or the next user turn's header. mlx_lm generate appends only the text from
        the chat template's `<query>` on, so a saved cache must already hold what comes before."""
        pending = "".join(d + "\n\n" for d in self.documents)
        prefix, ids = self._fit(lambda: self._rendered_before(pending), reserve=0)
        if ids:
            self._prefill(ids)
        self.text_in_cache, self.ids = prefix, self.ids + ids

    def save(self, path: str) -> str:
        self._whole_model("/save")
        if path.endswith(("/", os.sep)) or Path(path).expanduser().is_dir():
            raise ChatError(f"{path}: is a folder; /save takes a file name")
        path = str(Path(path).expanduser())
        path = path if path.endswith(".safetensors") else path + ".safetensors"
        if Path(path).is_symlink():
            raise ChatError(f"{path}: is a symbolic link; not writing through it")
        if os.path.lexists(path):
            regular_file(Path(path), "session file", "/save")
            if not _is_session(path):
                raise ChatError(f"{path}: exists and is not a clsa-mlx session; not overwriting it")
        mark, tmp = self._mark(), f"{path}.partial-{os.getpid()}.safetensors"
        try:
            Path(tmp).unlink(missing_ok=True)  # never written through a link left under this name
            self._prefill_to_next_input()
            try:  # never write what /load would refuse
                check_cache(self.model, self.cache, len(self.ids))
            except CacheError as e:
                raise ChatError(f"{path}: not saved, the conversation's cache does not check ({e})") from None
            # "model" and "tokenizer_config": what mlx_lm generate reads from a prompt-cache file
            meta = dict(tokenizer_config="{}", clsa_mlx_session="1", model_id=self.model_id,
                        system=self.system or "", messages=json.dumps(self.messages),
                        documents=json.dumps(self.documents), text_in_cache=self.text_in_cache,
                        ids=json.dumps(self.ids))
            if self.model_path is not None:
                meta["model"] = str(self.model_path)
            try:
                save_prompt_cache(tmp, self.cache, meta)
                os.replace(tmp, path)
            except (OSError, RuntimeError, ValueError) as e:  # MLX reports a missing folder or a full disk as RuntimeError
                Path(tmp).unlink(missing_ok=True)
                raise ChatError(f"{path}: cannot write ({getattr(e, 'strerror', None) or one_line(e, 120)}); "
                                "the conversation is unchanged") from None
        except BaseException:
            self._give_back(mark)
            raise
        return path

    def load(self, path: str):
        """Checks the whole file against this model before anything of the session changes."""
        self._whole_model("/load")
        path = str(Path(path).expanduser())
        path = path if path.endswith(".safetensors") or os.path.lexists(path) else path + ".safetensors"
        regular_file(Path(path), "session file", "/load")
        try:
            cache, meta = read_cache_file(path)
            if meta.get("clsa_mlx_session") != "1" and "tokenizer_config" in meta:
                raise ChatError(f"{path}: an mlx_lm.cache_prompt file holds the model's state but not the text "
                                "it stands for, which the chat needs; continue it with mlx_lm generate "
                                "--prompt-cache-file, or /file the text here; session unchanged")
            if meta.get("clsa_mlx_session") != "1":
                raise ValueError("not a clsa-mlx session")
            if meta.get("model_id") != self.model_id:
                raise ChatError(f"{path}: saved with another model ({str(meta.get('model_id'))[:40]}), "
                                f"this is {self.model_id}; session unchanged")
            session = _session_fields(meta, self.model.args.vocab_size)
            check_cache(self.model, cache, len(session["ids"]))
        except ChatError:
            raise
        except Exception as e:
            raise ChatError(f"{path}: corrupted or not a session file of this model ({one_line(e, 160)}); "
                            "session unchanged") from None
        self.cache, self.last = cache, None
        self.messages, self.documents, self.ids = session["messages"], session["documents"], session["ids"]
        self.system, self.text_in_cache = session["system"] or None, session["text_in_cache"]

def _is_session(path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}  # save_prompt_cache flattens its metadata: "<n>.clsa_mlx_session"
        return any(k.endswith(".clsa_mlx_session") and v == "1" for k, v in meta.items())
    except Exception:
        return False


def _session_fields(meta: dict, vocab_size: int) -> dict:
    """The session's own metadata, each field checked for type."""
    out = {k: meta[k] for k in ("system", "text_in_cache")}
    out.update({k: json.loads(meta[k]) for k in ("messages", "documents", "ids")})
    if not all(isinstance(out[k], str) for k in ("system", "text_in_cache")):
        raise ValueError("system / text_in_cache are not text")
    if not (isinstance(out["messages"], list) and len(out["messages"]) % 2 == 0 and all(
            isinstance(m, dict) and set(m) == {"role", "content"} and m["role"] == r and isinstance(m["content"], str)
            for m, r in zip(out["messages"], ["user", "assistant"] * len(out["messages"])))):
        raise ValueError("messages are not user/assistant turns")
    if not (isinstance(out["documents"], list) and all(isinstance(d, str) for d in out["documents"])):
        raise ValueError("documents are not a list of texts")
    if not (isinstance(out["ids"], list) and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size
                                                 for t in out["ids"])):
        raise ValueError("ids are not token ids of this model")
    return out
