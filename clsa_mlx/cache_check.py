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


def check_cache(model, cache, n_tokens=None):
    """Raises CacheError unless `cache` is state `model.make_cache()` could hold: the same classes
    and window sizes, arrays of the model's dtype and head shapes, integer offsets within their
    buffers, and one length (the global K/V's) shared by every cache (and equal to `n_tokens`)."""
    fresh = model.make_cache()
    if not isinstance(cache, list) or len(cache) != len(fresh):
        raise CacheError(f"{len(cache) if isinstance(cache, list) else type(cache).__name__} caches, "
                         f"the model has {len(fresh)}")
    n_self = len(model.self_decoder.layers)
    dtype = model.cross_decoder.kv_layer_norm.weight.dtype
    length = cache[n_self].offset
    if not _integer(length) or length < 0:
        raise CacheError(f"cache {n_self}: offset {repr(length)[:40]} is not a length")
    for i, (c, f, (heads, kd, vd)) in enumerate(zip(cache, fresh, model.cache_shapes())):
        if type(c).__name__ != type(f).__name__ or not isinstance(c, getattr(mlx_cache, type(f).__name__)):
            raise CacheError(f"cache {i} is a {type(c).__name__}, the model's is a {type(f).__name__}")
        if isinstance(f, mlx_cache.ArraysCache):
            _check_state(i, c, length, (1, heads, kd, vd))
        else:
            _check_rows(i, c, f, length, dtype, (heads, kd, vd))
    if n_tokens is not None and length != n_tokens:
        raise CacheError(f"the cache holds {length} tokens, its token list {n_tokens}")


def _check_state(i, c, length, shape):
    if not (isinstance(c.cache, list) and len(c.cache) == 1 and c.left_padding is None and c.lengths is None):
        raise CacheError(f"cache {i}: not one retention state")
    s = c.cache[0]
    if s is None:
        if length:
            raise CacheError(f"cache {i}: no retention state after {length} tokens")
        return
    if not isinstance(s, mx.array) or tuple(s.shape) != shape or s.dtype != mx.float32:
        raise CacheError(f"cache {i}: retention state {_describe(s)}, expected float32 {shape}")


def _check_rows(i, c, f, length, dtype, shape):
    heads, kd, vd = shape
    if not _integer(c.offset) or c.offset != length:
        raise CacheError(f"cache {i}: offset {repr(c.offset)[:40]}, the global K/V's is {length}")
    window = isinstance(f, mlx_cache.RotatingKVCache)
    if window and not (_integer(c.max_size) and c.max_size == f.max_size and c.keep == 0 and _integer(c._idx)):
        raise CacheError(f"cache {i}: window {repr(c.max_size)[:20]}, keep {repr(c.keep)[:20]}, "
                         f"index {repr(c._idx)[:20]}; the model's window is {f.max_size}, keep 0")
    if c.keys is None or c.values is None:
        if c.keys is not None or c.values is not None or length:
            raise CacheError(f"cache {i}: {length} tokens without both keys and values")
        return
    for name, a, d in (("keys", c.keys, kd), ("values", c.values, vd)):
        if not (isinstance(a, mx.array) and a.ndim == 4 and a.dtype == dtype and tuple(a.shape[:2]) == (1, heads)
                and a.shape[3] == d and a.shape[2] == c.keys.shape[2]):
            raise CacheError(f"cache {i}: {name} {_describe(a)}, expected {dtype} (1, {heads}, rows, {d})")
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
