"""Kernel vs reference over a sweep of random shapes, on the GPU (Metal or CUDA).

    python benchmarks/check_kernels_gpu.py [--out results.json] [--quick]

Routing: identical indices; for random-normal inputs (where fp32 summation order may
reorder near-ties) the kernel's selection must be a valid top-k of the float64 scores
up to rounding, i.e. identical score sets. Small-integer inputs (exact scores, many
ties) must give identical indices. select_kv: identical gathered rows (non-contiguous
cache views). Sparse attention: within dtype tolerance of the reference.
On a machine without a GPU kernel backend it runs the references against themselves
(a dry run of the script).
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

from clsa_mlx import kernels, sparse  # noqa: E402

DT = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
ATOL = {"float32": 2e-5, "float16": 4e-3, "bfloat16": 3e-2}


def f32(a):
    return np.array(a.astype(mx.float32))


def make_idx_inputs(B, L, T, D, dtype, kind, seed):
    rng = np.random.default_rng(seed)
    if kind == "int":
        q = rng.integers(-3, 4, size=(B, L, D)).astype(np.float32)
        k = rng.integers(-3, 4, size=(B, T, D)).astype(np.float32)
    else:
        q = rng.standard_normal((B, L, D), dtype=np.float32)
        k = rng.standard_normal((B, T, D), dtype=np.float32)
    return mx.array(q).astype(DT[dtype]), mx.array(k).astype(DT[dtype])


def check_route(be, B, L, T, D, k, offset, dtype, kind, seed, strided=False, start=None):
    q, kk = make_idx_inputs(B, L, T + (7 if strided else 0), D, dtype, kind, seed)
    if strided:  # a view into a longer cache buffer, as KVCache returns it
        kk = kk[:, :T]
    lo = [0] * B if start is None else start
    start = None if start is None else mx.array(start)
    got = sparse.route(q, kk, k, offset, start) if be else sparse.route_ref(q, kk, k, offset, start)
    ref = sparse.route_ref(q, kk, k, offset, start)
    mx.eval(got, ref)
    got, ref = np.array(got), np.array(ref)
    exact = bool((got == ref).all())
    ok = exact
    if not exact and kind == "normal":
        # Identical score sets up to fp32 rounding of the scores.
        s = np.einsum("bld,btd->blt", f32(q).astype(np.float64), f32(kk).astype(np.float64))
        ok = True
        for b in range(B):
            for l in range(L):
                n = min(T, offset + l + 1)
                m = max(0, min(k, n - lo[b]))
                g = got[b, l]
                if not ((g[m:] == -1).all() and (m == 0 or ((np.diff(g[:m]) > 0).all() and g[0] >= lo[b] and g[m - 1] < n))):
                    ok = False
                    continue
                if m == 0:  # a row with no valid position: nothing selected, checked above
                    continue
                row = s[b, l, lo[b]:n]
                g = g - lo[b]
                tol = 1e-5 * max(1.0, np.abs(row).max())
                want = np.sort(row)[::-1][:m]
                have = np.sort(row[g[:m]])[::-1]
                ok &= bool(np.allclose(have, want, rtol=0, atol=tol))
    return ok, exact


def check_select_kv(be, B, Hkv, T, hd, D, k, dtype, kind, seed, start=None):
    q, kk = make_idx_inputs(B, 1, T + 5, D, dtype, kind, seed)
    kk = kk[:, :T]
    keys = mx.random.normal((B, Hkv, T + 9, hd)).astype(DT[dtype])[:, :, :T]
    values = mx.random.normal((B, Hkv, T + 9, hd)).astype(DT[dtype])[:, :, :T]
    start = None if start is None else mx.array(start)
    select = sparse.select_kv if be else sparse.select_kv_ref
    ks, vs, idx = select(q, kk, keys, values, k, start)
    i4 = mx.maximum(idx, 0)[:, None, :, None]
    unfilled = (idx < 0)[:, None, :, None]
    wk = mx.where(unfilled, 0, mx.take_along_axis(keys, i4, 2)).astype(keys.dtype)
    wv = mx.where(unfilled, 0, mx.take_along_axis(values, i4, 2)).astype(values.dtype)
    ref_idx = sparse.route_ref(q, kk, k, T - 1, start)[:, 0]
    mx.eval(ks, vs, wk, wv, idx, ref_idx)
    gather_ok = bool((f32(ks) == f32(wk)).all() and (f32(vs) == f32(wv)).all())
    idx_exact = bool((np.array(idx) == np.array(ref_idx)).all())
    return gather_ok and (idx_exact or kind == "normal"), idx_exact


def check_attention(be, B, Hkv, G, L, T, hd, k, dtype, seed):
    mx.random.seed(seed)
    dt = DT[dtype]
    q = mx.random.normal((B, Hkv * G, L, hd)).astype(dt)
    keys = mx.random.normal((B, Hkv, T + 3, hd)).astype(dt)[:, :, :T]
    values = mx.random.normal((B, Hkv, T + 3, hd)).astype(dt)[:, :, :T]
    qi = mx.random.normal((B, L, 32))
    ki = mx.random.normal((B, T, 32))
    idx = sparse.route_ref(qi, ki, k, T - L)
    scale = hd**-0.5
    got = sparse.sparse_attention(q, keys, values, idx, scale) if be else None
    ref = sparse.sparse_attention_ref(q, keys, values, idx, scale)
    if got is None:
        got = ref
    mx.eval(got, ref)
    err = float(np.abs(f32(got) - f32(ref)).max())
    if dtype != "float32":
        return err <= ATOL[dtype] * 4, dict(max_abs_err=err)
    # fp32: MLX's reference SDPA on CUDA may run its matmuls in TF32, so both are
    # judged against a float64 numpy oracle.
    want = naive_attention(q, keys, values, idx, scale)
    e_kernel = float(np.abs(f32(got) - want).max())
    e_ref = float(np.abs(f32(ref) - want).max())
    return e_kernel <= 1e-4, dict(max_abs_err=err, err_vs_f64=e_kernel, ref_err_vs_f64=e_ref)


def naive_attention(q, keys, values, idx, scale):
    q, kk, vv = (f32(x).astype(np.float64) for x in (q, keys, values))
    idx = np.array(idx)
    B, Hq, L, hd = q.shape
    G = Hq // kk.shape[1]
    out = np.zeros_like(q)
    for b in range(B):
        for l in range(L):
            sel = idx[b, l][idx[b, l] >= 0]
            ks, vs = kk[b][:, sel], vv[b][:, sel]  # [Hkv, n, hd]
            qq = q[b, :, l].reshape(-1, G, hd)  # [Hkv, G, hd]
            s = np.einsum("hgd,hnd->hgn", qq, ks) * scale
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[b, :, l] = np.einsum("hgn,hnd->hgd", p, vs).reshape(-1, hd)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="small shapes only (CPU dry run)")
    ap.add_argument("--only", default="route,select_kv,sparse_attention", help="checks to run")
    args = ap.parse_args()
    be = kernels.backend()
    Ts = [1, 7, 64, 65, 255, 256, 257, 2047, 2048, 2049, 5003, 65537, 131072, 1_000_003, 1 << 20]
    if args.quick:
        Ts = [t for t in Ts if t <= 5003]
    rows, fails = [], 0
    t_start = time.time()
    seed = 0

    errors = {}

    def safe(fn, *a, **kw):
        try:
            return fn(*a, **kw)
        except Exception as e:  # record, keep sweeping
            msg = repr(e)[:2000]
            if msg not in errors:
                errors[msg] = 0
                print("ERROR", msg, flush=True)
            errors[msg] += 1
            return False, None

    def record(kind, params, ok, extra):
        nonlocal fails
        fails += not ok
        rows.append(dict(check=kind, ok=ok, **params, **extra))
        if not ok:
            print("FAIL", kind, params, extra, flush=True)

    only = args.only.split(",")
    for T in Ts if "route" in only else []:
        for k in (64, 2048):
            for dtype in DT:
                for data in ("int", "normal"):
                    seed += 1
                    big = T > 200_000
                    cases = [dict(B=1, L=1, offset=T - 1, D=128)]
                    if not big:
                        cases += [
                            dict(B=2, L=3, offset=max(0, T - 3), D=64),  # fused rows
                            dict(B=1, L=9, offset=max(0, T - 9), D=40),  # matmul path
                        ]
                        if T <= 2049:
                            cases.append(dict(B=2, L=T, offset=0, D=32))  # prefill rows
                    # a left-padded batch: rows with no, few (< k) and half of the positions valid;
                    # 9 rows pass `start` in device memory, 4 in constant memory (two libraries)
                    pad = [0, max(0, T - 5), T, T // 2]
                    cases.append(dict(B=4, L=1, offset=T - 1, D=64, start=pad))
                    if not big:
                        cases.append(dict(B=4, L=5, offset=max(0, T - 5), D=32, start=pad))
                        cases.append(dict(B=9, L=2, offset=max(0, T - 2), D=32, start=pad + [1, 2, 3, 4, 5]))
                    if T == 131072 and k == 2048 and data == "int":  # many rows: the call runs in pieces
                        cases.append(dict(B=1, L=2048, offset=T - 2048, D=128))
                    for c in cases:
                        p = dict(T=T, k=k, dtype=dtype, data=data, **c)
                        ok, exact = safe(check_route, be, c["B"], c["L"], T, c["D"], k, c["offset"], dtype, data, seed,
                                         strided=c["B"] > 1, start=c.get("start"))
                        record("route", p, ok, dict(exact=exact))
    for T in [t for t in Ts if t > 64] if "select_kv" in only else []:
        for k in (64, 2048):
            if T <= k:
                continue
            for dtype in DT:
                for Hkv, hd in ((1, 128), (4, 64)):
                    seed += 1
                    p = dict(T=T, k=k, dtype=dtype, Hkv=Hkv, hd=hd, B=2 if T < 200_000 else 1)
                    ok, exact = safe(check_select_kv, be, p["B"], Hkv, T, hd, 128, k, dtype, "int", seed)
                    record("select_kv", p, ok, dict(idx_exact=exact))
                    pad = [0, T - k // 2, T - 1]  # left-padded rows: full, under k, one valid
                    ok, exact = safe(check_select_kv, be, 3, Hkv, T, hd, 128, k, dtype, "int", seed, start=pad)
                    record("select_kv", dict(p, B=3, start=pad), ok, dict(idx_exact=exact))
    att_Ts = [t for t in Ts if 1 <= t <= 131072] + ([1 << 20] if not args.quick else [])
    for T in att_Ts if "sparse_attention" in only else []:
        for k in (64, 2048):
            for dtype in DT:
                for G in (1, 5):
                    for L, hd in ((1, 128), (7, 64), (33, 128)):
                        if T > 200_000 and L > 7:
                            continue
                        seed += 1
                        B, Hkv = (2, 2) if T < 10_000 else (1, 4)
                        p = dict(T=T, k=k, dtype=dtype, G=G, L=min(L, T), hd=hd, B=B, Hkv=Hkv)
                        ok, errs = safe(check_attention, be, B, Hkv, G, min(L, T), T, hd, k, dtype, seed)
                        record("sparse_attention", p, ok, errs or dict(max_abs_err=None))
    summary = dict(
        backend=be or "reference (dry run)",
        device=str(mx.default_device()),
        mlx=mx.__version__,
        python=platform.python_version(),
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        checks=len(rows),
        failures=fails,
        route_exact=sum(bool(r["exact"]) for r in rows if r["check"] == "route"),
        route_total=sum(r["check"] == "route" for r in rows),
        seconds=round(time.time() - t_start, 1),
    )
    for kind in ("route", "select_kv", "sparse_attention"):
        summary[f"{kind}_ok"] = f"{sum(r['ok'] for r in rows if r['check'] == kind)}/{sum(r['check'] == kind for r in rows)}"
    errs = {}
    for r in rows:
        if r["check"] == "sparse_attention":
            if r["max_abs_err"] is not None:
                errs[r["dtype"]] = max(errs.get(r["dtype"], 0.0), r["max_abs_err"])
    summary["attention_max_abs_err_vs_ref"] = errs
    f64 = [r for r in rows if r.get("err_vs_f64") is not None]
    if f64:
        summary["fp32_attention_max_err_vs_f64"] = dict(
            kernel=max(r["err_vs_f64"] for r in f64), reference=max(r["ref_err_vs_f64"] for r in f64)
        )
    summary["errors"] = errors
    # The dispatch uses the references for an instantiation that failed its self-test;
    # any such fallback would make this sweep compare a reference with itself.
    summary["self_test_fallbacks"] = {str(key): why for key, why in sparse.fallbacks().items()}
    fails += len(summary["self_test_fallbacks"])
    summary["failures"] = fails
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(dict(summary=summary, rows=rows), indent=1))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
