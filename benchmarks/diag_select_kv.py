"""Why select_kv (routing + gather) read 1.2-1.7x slower at T=131072 after 441e17d while routing
alone did not: one process, the current tree's clsa_mlx only, variants alternated round-robin.

    PYTHONPATH=. python benchmarks/diag_select_kv.py [--T 32768,131072] [--reps 30] [--iters 20]
        [--old-metal before_tree/metal]

1. "replay": bench_kernels.py's own sequence and timing (benchmarks.common.timed: ONE eval of
   `iters` calls after 3 single evals) for its baselines, route_kernel and select_kv_kernel, on
   fresh arrays per replay (the B=32, attention and copy rows are left out): the single-sample
   figure the results compare, `--replays` times.
2. Rounds: each variant timed once per round (a batch of `iters` calls, one eval unless its mode
   says otherwise), plain variants in an order rotated each round, then the cache-state ones,
   then an untimed batch that refills the buffer cache. Medians per call over rounds 1.. (round 0
   is "first"), split into build (python, lazy graph), encode (until mx.async_eval returns:
   eval_gpu, CUDA graph building and commits, allocations, MLX's in-flight throttle) and wait.

Variants (kernel path; without GPU kernels the references run, the kernel-only variants are
skipped, and the JSON's meta.path says so):
  route; gather_fixed (gather on one evaluated route output); gather_fixed_host (the same indices
  made on the host); select_kv; route_plus_gather_indep (the same launches, the gather on fixed
  indices: no dependency); select_kv_reimpl (this file's copy of the 5-launch dispatch: control);
  select_kv_extra_node / route_extra_node (one more dependent launch between the last histogram
  pass and the write pass, as the 6-launch text had: 11 graph nodes per select_kv call, not 10);
  select_kv_idxcopy (the indices copied by an MLX op before the gather);
  select_kv@async1 / route@async1 (mx.async_eval after every call: one CUDA graph per call);
  X@cleared (mx.clear_cache() first: fresh allocations); X@primed (clear_cache, then the cache
  filled with device-memory 4 MB buffers as select_kv_argpartition leaves them: custom-kernel
  outputs without init_value are unified memory in MLX CUDA, so reusing such a buffer moves it);
  with --old-metal DIR (d463a5a's metal/, read as kernel TEXT, nothing imported from it):
  route_old / select_kv_old, the 6-launch routing, in the same process.
"predicted": the CUDA graph cuts by MLX's commit rule (after a primitive, when the graph holds
more than MAX_OPS nodes or more than MAX_MB * 2^20 input *elements*; 30 / 400 assumed for sm_90,
MLX_MAX_OPS_PER_BUFFER / MLX_MAX_MB_PER_BUFFER honoured).
Prints one JSON line per measurement summary; writes $OUT/diag_select_kv.json if OUT is set.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.bench_kernels import routing_fns  # noqa: E402
from benchmarks.common import machine, timed  # noqa: E402
from clsa_mlx import kernels, sparse  # noqa: E402

D, HKV, HD = 128, 8, 128
DT = mx.bfloat16


def emit(rec):
    print(json.dumps(rec), flush=True)


# ---- a copy of kernels._route_rows (L = 1, fused scoring), optionally with one extra launch ----

_COPY_SRC = {
    "cuda": "const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;\n  if (i < (size_t)N) out[i] = lw[i];",
    "metal": "uint i = thread_position_in_grid.x;\n  if (i < (uint)N) out[i] = lw[i];",
}


def _copy_kernel(be):
    kw = dict(name="diag_copy_work", input_names=["lw"], output_names=["out"], source=_COPY_SRC[be])
    return mx.fast.cuda_kernel(**kw) if be == "cuda" else mx.fast.metal_kernel(**kw)


_copy_cache = {}


def route_head(q, kidx, k, kernel):
    """route_score and the three route_hist passes as kernels._route_rows runs them, with the
    kernels `kernel(name)` gives (the current text or d463a5a's)."""
    B, L, _ = q.shape
    T, R = kidx.shape[1], B * L
    chunk, C = kernels._chunking(T)
    prm = mx.array([T, L, T - 1, k, chunk, C, 0, 0], dtype=mx.int32)
    start = kernels._no_padding(B)
    grid, tg = (R * C * kernels._TG, 1, 1), (kernels._TG, 1, 1)
    (sw,) = kernel("route_score")(
        inputs=[mx.contiguous(q).reshape(R, D), kidx, prm, start],
        template=[("QT", q.dtype), ("KT", kidx.dtype), ("D", D), ("TG", kernels._TG_SCORE)],
        grid=(R * C * kernels._TG_SCORE, 1, 1), threadgroup=(kernels._TG_SCORE, 1, 1),
        output_shapes=[(R, T + (C + 1) * 256)], output_dtypes=[mx.uint32], init_value=0)
    work = sw
    lrow = (C + 1) * 256 + 4 + C
    for level in (1, 2, 3):
        (work,) = kernel("route_hist")(
            inputs=[sw, prm, start, work], template=[("LEVEL", level), ("TG", kernels._TG)],
            grid=grid, threadgroup=tg, output_shapes=[(R, lrow)], output_dtypes=[mx.uint32], init_value=0)
    return sw, work, prm, start, grid, tg, R, C, lrow


def route_reimpl(q, kidx, k, be, extra=False):
    sw, work, prm, start, grid, tg, R, C, lrow = route_head(q, kidx, k, lambda name: kernels._kernel(be, name))
    if extra:  # the 6-launch text's extra dependent launch (route_select), here a copy of the work
        if be not in _copy_cache:
            _copy_cache[be] = _copy_kernel(be)
        n = R * lrow
        (work,) = _copy_cache[be](inputs=[work], template=[("N", n)], grid=(-(-n // 256) * 256, 1, 1),
                                  threadgroup=(256, 1, 1), output_shapes=[(R, lrow)], output_dtypes=[mx.uint32])
    (idx,) = kernels._kernel(be, "route_write")(
        inputs=[sw, prm, start, work], template=[("TG", kernels._TG)], grid=grid, threadgroup=tg,
        output_shapes=[(R, k)], output_dtypes=[mx.int32])
    return idx.reshape(*q.shape[:2], k)


# ---- optional: the 6-launch text of d463a5a, read as kernel TEXT from --old-metal DIR ----
# (no Python from that tree is imported; the gather is the current one, whose text did not change)

_OLD = {
    "route_score": ("route_score.inc", ["q", "kidx", "prm", "start"], ["work"]),
    "route_hist": ("route_hist.inc", ["sw", "prm", "start", "prev"], ["work"]),
    "route_select": ("route_select.inc", ["lw", "prm"], ["st", "abase", "tbase"]),
    "route_write": ("route_write.inc", ["sw", "prm", "start", "st", "abase", "tbase"], ["idx"]),
}
_old_cache = {}


def _old_kernel(be, d, name):
    if name not in _old_cache:
        f, ins, outs = _OLD[name]
        d = Path(d)
        kw = dict(name=f"diag_old_{name}", input_names=ins, output_names=outs,
                  source=(d / f"prologue_{be}.inc").read_text() + "\n" + (d / f).read_text(),
                  header=(d / f"dialect_{be}.h").read_text() + "\n" + (d / "common.h").read_text(),
                  ensure_row_contiguous=False)
        _old_cache[name] = mx.fast.cuda_kernel(**kw) if be == "cuda" else mx.fast.metal_kernel(**kw)
    return _old_cache[name]


def route_old(q, kidx, k, be, d):
    sw, work, prm, start, grid, tg, R, C, _ = route_head(q, kidx, k, lambda name: _old_kernel(be, d, name))
    st, abase, tbase = _old_kernel(be, d, "route_select")(
        inputs=[work, prm], grid=(kernels._TG * R, 1, 1), threadgroup=(kernels._TG, 1, 1),
        output_shapes=[(R, 4), (R, C), (R, C)], output_dtypes=[mx.uint32] * 3)
    (idx,) = _old_kernel(be, d, "route_write")(
        inputs=[sw, prm, start, st, abase, tbase], template=[("TG", kernels._TG)], grid=grid, threadgroup=tg,
        output_shapes=[(R, k)], output_dtypes=[mx.int32])
    return idx.reshape(*q.shape[:2], k)


# ---- predicted CUDA graph cuts ----

def predicted(T, k, iters, prims_fn, mode):
    max_ops = int(os.environ.get("MLX_MAX_OPS_PER_BUFFER", 30))
    max_mb = int(os.environ.get("MLX_MAX_MB_PER_BUFFER", 400))
    _, C = kernels._chunking(T)
    sw, lw = T + (C + 1) * 256, (C + 1) * 256 + 4 + C
    P = dict(score=(2, 1 + D + T * D + 9), h1=(2, 1 + 2 * sw + 9), h=(2, 1 + sw + 9 + lw), extra=(1, lw),
             write=(1, sw + 9 + lw), gather=(1, k + 2 * HKV * T * HD + 2), copy=(1, k + 1))
    prims = [P[p] for p in prims_fn]
    nodes = elems = 0
    graphs, mid = [], 0
    for _ in range(iters):
        for i, (n, e) in enumerate(prims):
            nodes, elems = nodes + n, elems + e
            if nodes > max_ops or (elems >> 20) > max_mb:
                graphs.append(nodes)
                mid += i < len(prims) - 1
                nodes = elems = 0
        if mode == "async1" and nodes:
            graphs.append(nodes)
            nodes = elems = 0
    if nodes:
        graphs.append(nodes)
    return dict(nodes_per_call=sum(n for n, _ in prims), graphs=len(graphs), cuts_mid_call=mid,
                nodes_per_graph=sorted(set(graphs)), limits=[max_ops, max_mb])


PRIMS = {
    "route": ["score", "h1", "h", "h", "write"],
    "route_extra_node": ["score", "h1", "h", "h", "extra", "write"],
    "gather": ["gather"],
}
PRIMS["select_kv"] = PRIMS["route"] + ["gather"]
PRIMS["select_kv_extra_node"] = PRIMS["route_extra_node"] + ["gather"]
PRIMS["select_kv_idxcopy"] = PRIMS["route"] + ["copy", "gather"]
PRIMS["route_plus_gather_indep"] = PRIMS["select_kv"]
PRIMS["route_old"] = PRIMS["route_extra_node"]
PRIMS["select_kv_old"] = PRIMS["select_kv_extra_node"]


# ---- timing ----

def batch(fn, iters, mode):
    """(build, encode, wait) seconds for `iters` calls."""
    t0 = time.perf_counter()
    if mode == "async1":
        outs = []
        for _ in range(iters):
            outs.append(fn())
            mx.async_eval(outs[-1])
        t1 = t2 = time.perf_counter()
    else:
        outs = [fn() for _ in range(iters)]
        t1 = time.perf_counter()
        mx.async_eval(outs)
        t2 = time.perf_counter()
    mx.eval(outs)
    t3 = time.perf_counter()
    del outs
    return t1 - t0, t2 - t1, t3 - t2


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", default="32768,131072")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--replays", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=40.0, help="rounds stop once a T has used its share of this "
                    "(set-up, JIT and replays come on top)")
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    ap.add_argument("--old-metal", default="", help="optional: a metal/ folder of d463a5a (e.g. before_tree/metal, "
                    "carried): adds route_old / select_kv_old, the 6-launch kernel text, in this same process")
    args = ap.parse_args()
    be = kernels.backend()
    k, iters = args.k, args.iters
    Ts = [int(t) for t in args.T.split(",")]
    if min(Ts) < args.k:
        ap.error(f"--k {args.k} is more than the smallest --T {min(Ts)}")
    meta = dict(machine(),
                path="kernels (" + be + ")" if be else "references (sparse.route_ref, take_along_axis): no GPU kernels here",
                k=k, iters=iters, reps=args.reps, Ts=Ts,
                env={v: os.environ.get(v) for v in ("MLX_MAX_OPS_PER_BUFFER", "MLX_MAX_MB_PER_BUFFER",
                                                   "MLX_USE_CUDA_GRAPHS", "MLX_CUDA_GRAPH_CACHE_SIZE")})
    emit(dict(meta=meta))
    t_start = time.perf_counter()
    if be:  # bench_kernels.py's warm-up
        w = mx.random.normal((1, 65536, D)).astype(DT)
        for _ in range(20):
            mx.eval(kernels.route(w[:, :1], w, k, 65535, be))
        del w
    out = dict(meta=meta, replay=[], summary=[], derived=[], raw=[])

    for T in Ts:
        def make():
            mx.random.seed(T)
            a = (mx.random.normal((1, 1, D)).astype(DT), mx.random.normal((1, T, D)).astype(DT),
                 mx.random.normal((1, HKV, T, HD)).astype(DT), mx.random.normal((1, HKV, T, HD)).astype(DT))
            mx.eval(*a)
            return a

        # 1. replay bench_kernels.py's order and single-sample timing
        for rp in range(args.replays):
            q, kidx, keys, values = make()
            fns = routing_fns(q, kidx, keys, values, k, be)
            r = dict(T=T, replay=rp)
            for name, fn in fns.items():
                r[name + "_ms"], r[name + "_sync_ms"] = (round(x, 4) for x in timed(fn, iters))
            emit(r)
            out["replay"].append(r)
            q = kidx = keys = values = fns = None

        # 2. round-robin variants
        q, kidx, keys, values = make()
        if be:
            route = lambda: kernels.route(q, kidx, k, T - 1, be)  # noqa: E731
            gather = lambda i: kernels.gather_kv(i, keys, values, be)  # noqa: E731
            select_kv = lambda: kernels.select_kv(q, kidx, keys, values, k, be)  # noqa: E731
        else:
            route = lambda: sparse.route_ref(q, kidx, k, T - 1)  # noqa: E731
            gather = lambda i: (mx.take_along_axis(keys, i[:, None, :, None], 2),  # noqa: E731
                                mx.take_along_axis(values, i[:, None, :, None], 2))
            select_kv = lambda: sparse.select_kv_ref(q, kidx, keys, values, k)  # noqa: E731
        idx_fixed = route()[:, 0]
        mx.eval(idx_fixed)
        idx_host = mx.array(np.array(idx_fixed))
        mx.eval(idx_host)
        checks = dict(idx_shape=list(idx_fixed.shape), idx_dtype=str(idx_fixed.dtype))

        def idxcopy():
            idx = route()[:, 0]
            return (*gather(idx + 0), idx)  # idx is held, so `+ 0` writes a new buffer

        V = {
            "route": (route, "one", None),
            "gather_fixed": (lambda: gather(idx_fixed), "one", None),
            "gather_fixed_host": (lambda: gather(idx_host), "one", None),
            "select_kv": (select_kv, "one", None),
            "route_plus_gather_indep": (lambda: (route(), *gather(idx_fixed)), "one", None),
            "select_kv_idxcopy": (idxcopy, "one", None),
            "select_kv@async1": (select_kv, "async1", None),
            "route@async1": (route, "async1", None),
            "select_kv@cleared": (select_kv, "one", "clear"),
            "gather_fixed@cleared": (lambda: gather(idx_fixed), "one", "clear"),
            "route@cleared": (route, "one", "clear"),
            "select_kv@primed": (select_kv, "one", "prime"),
            "gather_fixed@primed": (lambda: gather(idx_fixed), "one", "prime"),
        }
        if be:
            def sk(extra):
                i = route_reimpl(q, kidx, k, be, extra)[:, 0]
                return (*kernels.gather_kv(i, keys, values, be), i)
            V["select_kv_reimpl"] = (lambda: sk(False), "one", None)
            V["select_kv_extra_node"] = (lambda: sk(True), "one", None)
            V["route_extra_node"] = (lambda: route_reimpl(q, kidx, k, be, True), "one", None)
            ref = route()
            for ex in (False, True):
                checks[f"reimpl_extra={ex}_equal"] = bool(mx.array_equal(route_reimpl(q, kidx, k, be, ex), ref).item())
            if args.old_metal:
                od = args.old_metal

                def sk_old():
                    i = route_old(q, kidx, k, be, od)[:, 0]
                    return (*kernels.gather_kv(i, keys, values, be), i)
                V["route_old"] = (lambda: route_old(q, kidx, k, be, od), "one", None)
                V["select_kv_old"] = (sk_old, "one", None)
                checks["old_equal"] = bool(mx.array_equal(route_old(q, kidx, k, be, od), ref).item())
        else:
            checks["skipped"] = "select_kv_reimpl, select_kv_extra_node, route_extra_node" + (
                ", route_old, select_kv_old" if args.old_metal else "") + " (GPU kernels only)"
        if args.only:
            V = {n: v for n, v in V.items() if n in args.only.split(",")}
        checks["variants"] = list(V)
        emit(dict(T=T, checks=checks))

        def prime():
            mx.clear_cache()
            i = idx_fixed[:, None, :, None]
            o = [(mx.take_along_axis(keys, i, 2), mx.take_along_axis(values, i, 2)) for _ in range(iters)]
            mx.eval(o)
            del o

        names = list(V)
        for n in names:  # bench-style warm-up: 3 single evals each
            for _ in range(3):
                mx.eval(V[n][0]())
        samples = {n: [] for n in names}
        t_T = time.perf_counter()
        share = args.budget_s / len(Ts)
        plain = [n for n in names if V[n][2] is None]
        cold = [n for n in names if V[n][2] is not None]
        for rep in range(args.reps):
            # plain variants rotated; the cache-state ones last, then an untimed batch that refills
            # the buffer cache with the sizes the plain ones use, so no plain variant runs cold
            rot = plain[rep % len(plain):] + plain[:rep % len(plain)] + cold
            for n in rot:
                fn, mode, prep = V[n]
                if prep == "clear":
                    mx.clear_cache()
                elif prep == "prime":
                    prime()
                cache_mb = mx.get_cache_memory() / 2**20
                b, e, w = batch(fn, iters, mode)
                s = dict(T=T, variant=n, rep=rep, build_ms=b * 1e3 / iters, encode_ms=e * 1e3 / iters,
                         wait_ms=w * 1e3 / iters, total_ms=(b + e + w) * 1e3 / iters, cache_mb_before=round(cache_mb, 1))
                samples[n].append(s)
                out["raw"].append(s)
            if cold:
                batch(lambda: (*select_kv(), route(), *gather(idx_fixed)), iters, "one")
            if time.perf_counter() - t_T > share and rep >= 2:
                emit(dict(T=T, note=f"time share reached after {rep + 1} rounds"))
                break

        med = {}
        for n in names:
            ss = samples[n]
            steady = ss[1:] or ss
            tot = sorted(x["total_ms"] for x in steady)
            m = dict(T=T, variant=n, mode=V[n][1], prep=V[n][2], n=len(steady),
                     median_ms=statistics.median(tot), p10_ms=tot[len(tot) // 10], p90_ms=tot[(9 * len(tot)) // 10],
                     min_ms=tot[0], first_ms=ss[0]["total_ms"],
                     build_ms=statistics.median(x["build_ms"] for x in steady),
                     encode_ms=statistics.median(x["encode_ms"] for x in steady),
                     wait_ms=statistics.median(x["wait_ms"] for x in steady))
            base = n.split("@")[0]
            pk = "select_kv" if base == "select_kv_reimpl" else base
            if pk in PRIMS or base.startswith("gather"):
                m["predicted"] = predicted(T, k, iters, PRIMS["gather" if base.startswith("gather") else pk], V[n][1])
            m = {a: (round(b, 4) if isinstance(b, float) else b) for a, b in m.items()}
            med[n] = m["median_ms"]
            emit(m)
            out["summary"].append(m)

        def d(a, b):
            return round(med[a] - med[b], 4) if a in med and b in med else None

        rp = [r for r in out["replay"] if r["T"] == T]
        der = dict(
            T=T,
            select_minus_route_ms=d("select_kv", "route"),
            gather_fixed_ms=med.get("gather_fixed"),
            select_minus_route_plus_indep_gather_ms=d("select_kv", "route_plus_gather_indep"),
            extra_node_effect_select_ms=d("select_kv_extra_node", "select_kv_reimpl"),
            extra_node_effect_route_ms=d("route_extra_node", "route"),
            reimpl_minus_select_ms=d("select_kv_reimpl", "select_kv"),
            old_over_new_select=(round(med["select_kv_old"] / med["select_kv"], 3) if "select_kv_old" in med else None),
            old_over_new_route=(round(med["route_old"] / med["route"], 3) if "route_old" in med else None),
            idxcopy_effect_ms=d("select_kv_idxcopy", "select_kv"),
            host_idx_effect_ms=d("gather_fixed_host", "gather_fixed"),
            async1_effect_select_ms=d("select_kv@async1", "select_kv"),
            async1_effect_route_ms=d("route@async1", "route"),
            cleared_effect_select_ms=d("select_kv@cleared", "select_kv"),
            cleared_effect_gather_ms=d("gather_fixed@cleared", "gather_fixed"),
            cleared_effect_route_ms=d("route@cleared", "route"),
            primed_effect_select_ms=d("select_kv@primed", "select_kv"),
            primed_effect_gather_ms=d("gather_fixed@primed", "gather_fixed"),
            replay_select_kv_ms=[r.get("select_kv_kernel_ms") for r in rp],
            replay_route_ms=[r.get("route_kernel_ms") for r in rp],
            steady_select_kv_ms=med.get("select_kv"), steady_route_ms=med.get("route"),
        )
        emit(der)
        out["derived"].append(der)
        q = kidx = keys = values = idx_fixed = idx_host = V = None
        mx.clear_cache()

    out["meta"]["wall_s"] = round(time.perf_counter() - t_start, 1)
    emit(dict(done=True, wall_s=out["meta"]["wall_s"]))
    if os.environ.get("OUT"):
        p = Path(os.environ["OUT"]) / "diag_select_kv.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(out, indent=1))
        print("wrote", p)


if __name__ == "__main__":
    main()
