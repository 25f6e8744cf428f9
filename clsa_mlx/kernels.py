"""GPU kernels for CLSA routing and sparse attention (sources in `metal/`).

Each kernel body is written once (`metal/*.inc`, helpers in `metal/common.h`) and
compiled for Metal through `mx.fast.metal_kernel` or for CUDA through
`mx.fast.cuda_kernel`; `metal/dialect_{metal,cuda}.h` and `metal/prologue_*.inc` are
the whole per-backend difference. Kernel objects are built once per process and
cached; MLX compiles each template instantiation once and caches it too.

`backend()` picks the kernels: "metal" when `mx.metal.is_available()`, "cuda" when
`mx.cuda.is_available()`, else None (the pure-MLX references in `sparse.py`).
`CLSA_MLX_REFERENCE=1` in the environment forces the references.
"""

import functools
import os
from pathlib import Path

import mlx.core as mx

# Radix select: 8-bit digits, 4 levels over the 32-bit order-preserving score key.
_TG = 256  # threads per group of the routing passes (one per histogram bin)
_TG_SCORE = 512  # threads per group of the scoring pass (more loads in flight)
_MAX_CHUNKS = 256  # chunks per row (each write group sums the counts of the chunks before it)
_FUSED_MAX_L = 4  # up to this many query rows score inside the kernel; more use a matmul
_SHARED_BYTES = 28 * 1024  # threadgroup memory budget (Metal allows 32 KB)


def _find_sources() -> Path:
    """`metal/` next to the package in a checkout, or `clsa_mlx/metal` when installed."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "metal", here / "metal"):
        if (cand / "common.h").is_file():
            return cand
    from importlib import resources

    return Path(str(resources.files("clsa_mlx.metal")))


SOURCE_DIR = _find_sources()

# name -> (body file, input names, output names)
KERNELS = {
    "route_score": ("route_score.inc", ["q", "kidx", "prm", "start"], ["work"]),
    "route_hist0": ("route_hist0.inc", ["scores", "prm", "start"], ["work"]),
    "route_hist": ("route_hist.inc", ["sw", "prm", "start", "prev"], ["work"]),
    "route_write": ("route_write.inc", ["sw", "prm", "start", "lw"], ["idx"]),
    "gather_kv": ("gather_kv.inc", ["idx", "keys", "values", "prm"], ["ks", "vs"]),
    "sparse_attention": (
        "sparse_attention.inc",
        ["q", "keys", "values", "idx", "prm", "scale"],
        ["out"],
    ),
}


def backend():
    if os.environ.get("CLSA_MLX_REFERENCE", "0") not in ("", "0"):
        return None
    if mx.default_device() != mx.gpu:
        return None
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return None


def _read(name: str) -> str:
    return (SOURCE_DIR / name).read_text()


def kernel_text(backend_name: str, name: str):
    """(header, body) handed to MLX for one kernel on one backend."""
    header = _read(f"dialect_{backend_name}.h") + "\n" + _read("common.h")
    body = _read(f"prologue_{backend_name}.inc") + "\n" + _read(KERNELS[name][0])
    return header, body


@functools.lru_cache(maxsize=None)
def _kernel(backend_name: str, name: str):
    _, inputs, outputs = KERNELS[name]
    header, body = kernel_text(backend_name, name)
    # Inputs are read through explicit strides where it matters (caches are slices
    # of larger buffers), so MLX must not copy them.
    common = dict(
        name=f"clsa_{name}",
        input_names=inputs,
        output_names=outputs,
        source=body,
        header=header,
        ensure_row_contiguous=False,
    )
    if backend_name == "metal":
        return mx.fast.metal_kernel(**common)
    return mx.fast.cuda_kernel(**common)


_GROUPS = 2048  # groups per routing pass to aim for: enough for every GPU core, no more
_MIN_CHUNK = 4 * _TG  # keys of a radix group at least: its histograms (1 KB a level) stay small next to them
_MIN_CHUNK_ROWS = 16 * _TG  # the same when the rows come from a matmul: they give the parallelism, and the
# radix passes, not the index keys, are most of the bytes
_SCORE_KEYS = 512  # keys of a scoring group: scoring reads D values a key, so it splits chunks finer


def _chunking(T: int, rows: int = 1, fused: bool = True):
    """(chunk, C): chunks per row from the row count too, so many-row calls keep few
    chunk histograms (C KB a level and row)."""
    least = _MIN_CHUNK if fused else _MIN_CHUNK_ROWS
    want = max(1, min(_MAX_CHUNKS, -(-_GROUPS // rows)))
    chunk = max(least, -(-T // (want * least)) * least)
    return chunk, -(-T // chunk)


_MAX_SCORE_BYTES = 32 << 20  # score keys of one launch group (many-row calls are split)


def route_pieces(B: int, L: int, T: int):
    """The launch groups of one routing call, [(b0, b1, l0, l1)]: query rows in pieces
    whose score keys fit `_MAX_SCORE_BYTES` (whole batch rows first, then batch rows split),
    so a call's scratch is bounded by bytes, not by its row count."""
    rows = max(1, min(1 << 20, _MAX_SCORE_BYTES // (4 * max(T, 1))))
    ls = max(1, min(L, rows // B))
    bs = B if ls * B <= rows else max(1, rows)
    return [(b, min(B, b + bs), l, min(L, l + ls)) for b in range(0, B, bs) for l in range(0, L, ls)]


def route_variants(B: int, L: int, T: int):
    """The library variants a routing call builds: (scores in the kernel, `start` in
    constant memory) per piece. MLX passes an input of fewer than 8 elements in the
    constant address space, a different library from the device one."""
    return {(l1 - l0 <= _FUSED_MAX_L, b1 - b0 < 8) for b0, b1, l0, l1 in route_pieces(B, L, T)}


def route_plan(B: int, L: int, T: int, k: int) -> dict:
    """What one routing call launches and allocates (counted, not measured): per piece its
    rows, chunks and the bytes of its zero-filled work buffers and matmul scores. Pieces
    run one after another, so the call's scratch is its largest piece's."""
    pieces = []
    for b0, b1, l0, l1 in route_pieces(B, L, T):
        R = (b1 - b0) * (l1 - l0)
        fused = l1 - l0 <= _FUSED_MAX_L
        chunk, C = _chunking(T, R, fused)
        words = (T + (C + 1) * 256 if fused else (C + 1) * 256) + 3 * ((C + 1) * 256 + 4 + C)
        pieces.append(dict(rows=R, chunk=chunk, chunks=C, fused=fused, fill_bytes=4 * R * words,
                           score_bytes=0 if fused else 4 * R * T, launches=5 + (not fused), fills=4))
    return dict(pieces=pieces, scratch_bytes=max(p["fill_bytes"] + p["score_bytes"] for p in pieces),
                out_bytes=4 * B * L * k)


def route(q_idx, k_idx, k: int, offset: int, be: str, start=None):
    """Route in pieces of query rows whose scores fit `_MAX_SCORE_BYTES` (`route_pieces`);
    see `_route_rows`. `start` `[B]`: each batch row's first valid position (None: 0)."""
    if k < 1:  # the select pass would read a threshold no pass wrote
        raise ValueError(f"routing needs k >= 1, got {k}")
    B, L, _ = q_idx.shape
    T = k_idx.shape[1]
    start = _no_padding(B) if start is None else mx.maximum(start, 0).astype(mx.int32)
    pieces = route_pieces(B, L, T)
    if len(pieces) == 1:
        return _route_rows(q_idx, k_idx, k, offset, be, start)
    out = {}
    for b0, b1, l0, l1 in pieces:
        q = q_idx[b0:b1, l0:l1]
        kk, st = (k_idx, start) if b1 - b0 == B else (k_idx[b0:b1], start[b0:b1])
        part = _route_rows(q, kk, k, offset + l0, be, st)
        mx.eval(part)  # one piece's scratch at a time: left lazy, every piece's buffers were live at once
        out.setdefault(b0, []).append(part)
    rows = [mx.concatenate(parts, axis=1) if len(parts) > 1 else parts[0] for parts in out.values()]
    return mx.concatenate(rows, axis=0) if len(rows) > 1 else rows[0]


def route_supported(q_idx, k_idx, k: int) -> bool:
    """No input is small enough for MLX's constant address space but `start` (whose two
    variants the self-test probes)."""
    return q_idx.shape[-1] >= 8 and q_idx.shape[0] * k >= 8


@functools.lru_cache(maxsize=None)
def _no_padding(B: int) -> mx.array:
    # One evaluated array per batch size, so a single sequence's decode step launches no fill.
    z = mx.zeros((B,), mx.int32)
    mx.eval(z)
    return z


def _route_rows(q_idx, k_idx, k: int, offset: int, be: str, start):
    """Exact causal top-k (same contract as `sparse.route_ref`) by a 4-level radix
    select (8-bit digits of an order-preserving key of the fp32 score) split over many
    threadgroups, in 5 launches: score keys + top-digit histogram; three passes that each
    pick one digit and histogram the next; a write pass that picks the last digit, sums
    the earlier chunks' counts and writes in order. Each histogram pass also adds its chunk
    into the row's total (device atomics), so the next pass reads 256 totals, not every
    chunk's histogram; that needs a zeroed output, so each such pass has one packed output
    (layouts in metal/common.h) and MLX zeroes it. Many rows (more than `_FUSED_MAX_L`
    query rows) score with MLX's matmul, and the passes read those fp32 scores directly."""
    B, L, D = q_idx.shape
    T = k_idx.shape[1]
    R = B * L
    fused = L <= _FUSED_MAX_L
    chunk, C = _chunking(T, R, fused)
    S = max(1, chunk // _SCORE_KEYS)
    prm = mx.array([T, L, offset, k, chunk, C, S, 0], dtype=mx.int32)
    grid = (R * C * _TG, 1, 1)
    tg = (_TG, 1, 1)
    if fused:
        q = mx.contiguous(q_idx).reshape(R, D)
        (sw,) = _kernel(be, "route_score")(
            inputs=[q, k_idx, prm, start],
            template=[("QT", q.dtype), ("KT", k_idx.dtype), ("D", D), ("TG", _TG_SCORE)],
            grid=(R * C * S * _TG_SCORE, 1, 1),
            threadgroup=(_TG_SCORE, 1, 1),
            output_shapes=[(R, (C + 1) * 256 + T)],
            output_dtypes=[mx.uint32],
            init_value=0,
        )
        hist = sw
    else:
        from .sparse import index_scores

        sw = mx.contiguous(index_scores(q_idx, k_idx).reshape(R, T))
        (hist,) = _kernel(be, "route_hist0")(
            inputs=[sw, prm, start],
            template=[("TG", _TG)],
            grid=grid,
            threadgroup=tg,
            output_shapes=[(R, (C + 1) * 256)],
            output_dtypes=[mx.uint32],
            init_value=0,
        )
    scores = [("SCORES", int(not fused))]
    work = hist
    for level in (1, 2, 3):
        (work,) = _kernel(be, "route_hist")(
            inputs=[sw, prm, start, work],
            template=[("LEVEL", level), ("TG", _TG)] + scores,
            grid=grid,
            threadgroup=tg,
            output_shapes=[(R, (C + 1) * 256 + 4 + C)],
            output_dtypes=[mx.uint32],
            init_value=0,
        )
    (idx,) = _kernel(be, "route_write")(
        inputs=[sw, prm, start, work],
        template=[("TG", _TG)] + scores,
        grid=grid,
        threadgroup=tg,
        output_shapes=[(R, k)],
        output_dtypes=[mx.int32],
    )
    return idx.reshape(B, L, k)


def gather_kv(idx, keys, values, be: str):
    """idx `[B, K]` -> keys/values rows `[B, Hkv, K, hd]` (one launch for both)."""
    B, H, _, HD = keys.shape
    K = idx.shape[-1]
    prm = mx.array([K, H], dtype=mx.int32)
    rows = K * H
    return _kernel(be, "gather_kv")(
        inputs=[mx.contiguous(idx), keys, values, prm],
        template=[("DT", keys.dtype), ("HD", HD)],
        grid=(-(-rows // 8) * 256, B, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[(B, H, K, HD), (B, H, K, HD)],
        output_dtypes=[keys.dtype, values.dtype],
    )


def select_kv(q_idx, k_idx, keys, values, k: int, be: str, start=None):
    T = k_idx.shape[1]
    idx = route(q_idx[:, -1:], k_idx, k, T - 1, be, start)[:, 0]
    ks, vs = gather_kv(idx, keys, values, be)
    return ks, vs, idx


def attention_warps(G: int, HD: int) -> int:
    """Warps per group for the sparse attention kernel: as many as the threadgroup
    memory budget allows (the G queries and one head's merge buffer per warp; at most 8),
    0 if even one warp does not fit."""
    nw = 8
    while nw and (G * HD + nw * (HD + 2)) * 4 > _SHARED_BYTES:
        nw //= 2
    return nw


def sparse_attention_supported(q, keys, values) -> bool:
    Hq, Hkv = q.shape[1], keys.shape[1]
    return (
        Hq % Hkv == 0
        and q.dtype == keys.dtype == values.dtype
        and keys.shape[-1] == values.shape[-1] == q.shape[-1]
        and attention_warps(Hq // Hkv, q.shape[-1]) > 0
    )


def sparse_attention(q, keys, values, idx, scale: float, be: str):
    B, Hq, L, HD = q.shape
    H = keys.shape[1]
    G = Hq // H
    K = idx.shape[-1]
    nw = attention_warps(G, HD)
    prm = mx.array([L, K, H], dtype=mx.int32)
    (out,) = _kernel(be, "sparse_attention")(
        inputs=[
            mx.contiguous(q),
            keys,
            values,
            mx.contiguous(idx.astype(mx.int32)),
            prm,
            mx.array([scale], dtype=mx.float32),
        ],
        template=[("DT", q.dtype), ("HD", HD), ("G", G), ("NW", nw)],
        grid=(32 * nw * L, B * H, 1),
        threadgroup=(32 * nw, 1, 1),
        output_shapes=[q.shape],
        output_dtypes=[q.dtype],
    )
    return out
