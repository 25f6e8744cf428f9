"""One check of cache state against a model, for every path that loads caches (sessions, the
document cache): a file's cache classes, arrays, dtypes, shapes and offsets, checked against the
model and against each other before anything runs on them. A cache that passes can be run on;
one that does not is refused with a line naming the cache and the field."""

import mlx.core as mx
from mlx.utils import tree_unflatten
from mlx_lm.models import cache as mlx_cache

from .cache import RotatingKVCache
from .loading import safetensors_header

CLASSES = {"KVCache": mlx_cache.KVCache, "RotatingKVCache": RotatingKVCache, "ArraysCache": mlx_cache.ArraysCache}
FIELDS = {"KVCache": 3, "RotatingKVCache": 6, "ArraysCache": 3}


class CacheError(ValueError):
    """Cache state that does not fit the model."""


def read_cache_file(path) -> tuple:
    """-> (caches, metadata) of an mlx-lm prompt-cache file, read as mlx-lm's `load_prompt_cache`
    writes it, with only the cache classes our models make and integer scalars; any other
    structure is refused (mlx-lm's reader looks any name up in its module and sets any state)."""
    safetensors_header(path)  # offsets, sizes and coverage, before MLX reads a byte
    try:
        arrays, flat = mx.load(str(path), return_metadata=True)
        meta = tree_unflatten(list(flat.items()))
    except Exception as e:
        raise CacheError(f"not a prompt-cache file ({type(e).__name__})") from None
    if not (isinstance(meta, list) and len(meta) == 3 and isinstance(meta[0], dict) and isinstance(meta[1], list)
            and isinstance(meta[2], list) and meta[2][:1] == [""]):
        raise CacheError("not a prompt-cache file (its metadata is not mlx-lm's)")
    metadata, classes, scalars = meta
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CacheError("its metadata holds more than names and texts")
    for name in classes:
        if not isinstance(name, str) or name not in CLASSES:
            raise CacheError(f"cache class {str(name)[:40]!r} is none of {sorted(CLASSES)}")
    for entry in scalars[1:]:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and entry[0] in arrays):
            raise CacheError(f"scalar entry {str(entry)[:40]!r} names no array")
        pos, kind = entry
        a = arrays[pos]
        if kind == "none" and a.size == 0:
            arrays[pos] = None
        elif kind == "scalar" and a.ndim == 0 and mx.issubdtype(a.dtype, mx.integer):
            arrays[pos] = int(a.item())
        else:
            raise CacheError(f"{pos}: a {kind!r} of dtype {a.dtype} and shape {tuple(a.shape)}; "
                             "cache scalars are integers")
    try:
        states = tree_unflatten(list(arrays.items()))
    except Exception as e:
        raise CacheError(f"its arrays are not caches ({type(e).__name__})") from None
    if not isinstance(states, list) or len(states) != len(classes):
        raise CacheError(f"{len(classes)} cache classes for {len(states) if isinstance(states, list) else 0} states")
    caches = []
    for i, (name, state) in enumerate(zip(classes, states)):
        if not isinstance(state, list) or len(state) != FIELDS[name]:
            raise CacheError(f"cache {i}: not the {FIELDS[name]} fields of a {name}")
        if name == "ArraysCache" and not isinstance(state[0], list):
            raise CacheError(f"cache {i}: an ArraysCache without its list of arrays")
        caches.append(CLASSES[name].from_state(state))
    return caches, metadata


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def reference(model) -> list:
    """The caches the model itself writes for one token: what every loaded cache is held to (its
    classes, window sizes, and each array's dtype and shape but for the rows), for any
    architecture. Made once per model."""
    ref = model.__dict__.get("_cache_reference")
    if ref is None:
        ref = model.make_cache()
        model.__dict__.setdefault("_caches_checked", []).append(ref)  # not checked against itself
        model(mx.array([[0]]), cache=ref)
        mx.eval([c.state for c in ref])
        model.__dict__["_cache_reference"] = ref
    return ref


def check_cache(model, cache, n_tokens=None):
    """Raises CacheError unless `cache` is state the model could have written: the classes and
    window sizes of its own caches, arrays of their dtypes and shapes, integer offsets within their
    buffers, and one length (the shared K/V's) held by every cache (and equal to `n_tokens`)."""
    ref = reference(model)
    if not isinstance(cache, list) or len(cache) != len(ref):
        raise CacheError(f"{len(cache) if isinstance(cache, list) else type(cache).__name__} caches, "
                         f"the model has {len(ref)}")
    shared = len(model.self_decoder.layers)  # the K/V every cross layer reads comes right after
    length = cache[shared].offset if hasattr(cache[shared], "offset") else None
    if not _integer(length) or length < 0:
        raise CacheError(f"cache {shared}: offset {repr(length)[:40]} is not a length")
    for i, (c, r) in enumerate(zip(cache, ref)):
        if type(c).__name__ != type(r).__name__ or not isinstance(c, getattr(mlx_cache, type(r).__name__)):
            raise CacheError(f"cache {i} is a {type(c).__name__}, the model's is a {type(r).__name__}")
        if isinstance(r, mlx_cache.ArraysCache):
            _check_state(i, c, r, length)
        else:
            _check_rows(i, c, r, length)
    if n_tokens is not None and length != n_tokens:
        raise CacheError(f"the cache holds {length} tokens, its token list {n_tokens}")


def _check_state(i, c, r, length):
    if not (isinstance(c.cache, list) and len(c.cache) == len(r.cache) and c.left_padding is None
            and c.lengths is None):
        raise CacheError(f"cache {i}: not the model's {len(r.cache)} state arrays")
    for j, (s, want) in enumerate(zip(c.cache, r.cache)):
        if s is None and not length:
            continue
        if not (isinstance(s, mx.array) and s.dtype == want.dtype and s.shape == want.shape):
            raise CacheError(f"cache {i}: state {j} {_describe(s)} after {length} tokens, expected {want.dtype} "
                             f"{tuple(want.shape)}")


def _check_rows(i, c, r, length):
    if not _integer(c.offset) or c.offset != length:
        raise CacheError(f"cache {i}: offset {repr(c.offset)[:40]}, the shared K/V's is {length}")
    window = isinstance(r, mlx_cache.RotatingKVCache)
    if window and not (_integer(c.max_size) and c.max_size == r.max_size and c.keep == r.keep == 0
                       and _integer(c._idx)):
        raise CacheError(f"cache {i}: window {repr(c.max_size)[:20]}, keep {repr(c.keep)[:20]}, "
                         f"index {repr(c._idx)[:20]}; the model's window is {r.max_size}, keep 0")
    if c.keys is None or c.values is None:
        if c.keys is not None or c.values is not None or length:
            raise CacheError(f"cache {i}: {length} tokens without both keys and values")
        return
    for name, a, want in (("keys", c.keys, r.keys), ("values", c.values, r.values)):
        if not (isinstance(a, mx.array) and a.ndim == 4 and a.dtype == want.dtype and a.shape[:2] == want.shape[:2]
                and a.shape[3] == want.shape[3] and a.shape[2] == c.keys.shape[2]):
            raise CacheError(f"cache {i}: {name} {_describe(a)}, expected {want.dtype} "
                             f"(1, {want.shape[1]}, rows, {want.shape[3]})")
    rows = c.keys.shape[2]
    if not window:
        ok = length <= rows
    elif length <= c.max_size:  # not yet rotated: written in order, rows allocated up to the window
        ok = c._idx == length <= rows <= c.max_size
    else:  # the window plus a multi-token step's rows in order, or a full window rotating at _idx
        ok = c.max_size <= rows <= length and (c._idx == rows or (rows == c.max_size and 0 < c._idx <= rows))
    if not ok:
        raise CacheError(f"cache {i}: {rows} rows, offset {length}"
                         + (f", index {c._idx}" if window else "") + " do not fit together")


def _describe(a) -> str:
    if isinstance(a, mx.array):
        return f"{a.dtype} {tuple(a.shape)}"
    return type(a).__name__


def check_handed_cache(model, cache):
    """A cache list handed to the model by mlx-lm (`--prompt-cache-file`, a server's prompt cache)
    is checked whole, once per list, when it is a plain one; batch caches are built by mlx-lm
    itself from caches it already ran."""
    seen = model.__dict__.setdefault("_caches_checked", [])  # kept alive: an id is never reused
    if not cache or any(cache is s for s in seen):
        return
    if all(type(c).__name__ in CLASSES for c in cache) and not any(
            getattr(c, "left_padding", None) is not None or getattr(c, "lengths", None) is not None for c in cache):
        check_cache(model, cache)
    seen[:] = seen[-3:] + [cache]
