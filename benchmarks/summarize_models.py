"""The README's efficiency table from bench_models JSON files: decode, ratios, roofline, prefill, memory.

    python benchmarks/summarize_models.py benchmarks/results/bench_models_paper-4b_16bit.json ...

A run keeps all three models loaded, so its peak memory includes the other two models'
weights; a model's own peak subtracts them (weights_bytes; computed from the same build when
a file predates that field: shapes only, nothing is allocated).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_models import ARCHS, build, weights_bytes  # noqa: E402


def resident(results):
    """Weights of each loaded model, bytes."""
    bits = 0 if results["bits"] == 16 else results["bits"]
    return results.get("weights_bytes") or {a: weights_bytes(build(a, results["model"], bits, False)) for a in ARCHS}


def table(results):
    rows = {(r["arch"], r["context"]): r for r in results["rows"]}
    weights = resident(results)
    own = lambda arch, peak: peak - (sum(weights.values()) - weights[arch])  # noqa: E731
    out = [f"{results['config']}, {results['bits']}-bit, prefill chunk {results.get('prefill_step', 2048)}:",
           "| context | arch | decode tok/s (runs) | x Transformer | x YOCO | roofline | prefill tok/s (x T; x T in our loop) | "
           "KV+index GB | own decode peak GB | own prefill peak GB |", "|" + " --- |" * 10]
    for (arch, ctx), r in rows.items():
        t, y = rows.get(("transformer", ctx)), rows.get(("yoco", ctx))
        ratio = lambda b: f"{r['decode_tps'] / b['decode_tps']:.2f}" if b else "-"  # noqa: E731
        pre = f"{r['prefill_tps']:,.0f}" if "prefill_tps" in r else "-"
        if "prefill_tps" in r and t and "prefill_tps" in t and r is not t:
            pre += f" ({r['prefill_tps'] / t['prefill_tps']:.1f}x"
            if "prefill_tps_other_loop" in t:  # the Transformer through clsa_mlx's loop too
                pre += f"; {r['prefill_tps'] / t['prefill_tps_other_loop']:.1f}x"
            pre += ")"
        peak = f"{own(arch, r['peak_memory']) / 1e9:.2f}" if "peak_memory" in r else "-"
        runs = "/".join(f"{x:.3g}" for x in r.get("decode_tps_runs", []))
        out.append(f"| {ctx // 1024}K | {arch} | {r['decode_tps']:.3g} ({runs}) | {ratio(t)} | {ratio(y)} | "
                   f"{100 * r['roofline_share']:.0f}% | {pre} | {r['cache_bytes'] / 1e9:.3f} | "
                   f"{own(arch, r['decode_peak_memory']) / 1e9:.2f} | {peak} |")
    return "\n".join(out)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(table(json.loads(Path(path).read_text())) + "\n")
