"""The benchmark code paths run briefly on CPU so they cannot rot (figures here mean nothing)."""

import json

import pytest

from benchmarks import bench_batch, bench_models, summarize_models

pytestmark = pytest.mark.e2e  # subprocesses, terminals, servers or training: pytest -m e2e


def test_bench_models_micro(tmp_path):
    results = bench_models.run("micro", [48, 200], bits=0, steps=6, prefill_max=200, transformer_max=200)
    rows = {(r["arch"], r["context"]): r for r in results["rows"]}
    assert set(rows) == {(a, c) for a in bench_models.ARCHS for c in (48, 200)}
    for r in rows.values():
        assert r["decode_tps"] > 0 and r["prefill_tps"] > 0 and r["prefill_tps_other_loop"] > 0
        assert 0 < r["roofline_share"]
        assert r["decode_peak_memory"] > r["cache_bytes"]
    # the shared cache: YOCO/CLSA hold one global K/V, the Transformer one per layer
    assert rows[("yoco", 200)]["cache_bytes"] < rows[("transformer", 200)]["cache_bytes"]
    # CLSA reads the k routed rows, dense YOCO the whole context, in every cross layer
    assert rows[("clsa", 200)]["decode_bytes"] < rows[("yoco", 200)]["decode_bytes"]
    assert set(rows[("clsa", 200)]["breakdown_ms"]) == {"self layers", "K/V + routing + gather", "cross layers", "head"}
    table = summarize_models.table(results).splitlines()
    assert len(table) == 3 + len(rows) and all(line.count("|") == 11 for line in table[1:])
    bench_models.plot(results, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
    json.dumps(results)


def test_bench_models_quantized_builds():
    model = bench_models.build("clsa", bench_models.CONFIGS["micro"], bits=4)
    assert model.cross_decoder.layers[0].mixer.q_proj.bits == 4
    assert not hasattr(model.cross_decoder.indexer.q_proj, "bits")  # the router stays exact


def test_profile_step_micro(tmp_path, monkeypatch):
    import math
    import subprocess
    import sys

    import mlx.core as mx

    from benchmarks import profile_step
    from clsa_mlx.model import DecoderLayer

    monkeypatch.setattr(DecoderLayer, "__call__", DecoderLayer.__call__)  # restored even if the test fails
    eager = DecoderLayer.__call__
    model = bench_models.build("clsa", bench_models.CONFIGS["micro"], bits=0)
    other = bench_models.build("yoco", bench_models.CONFIGS["micro"], bits=0)
    switch = profile_step.compile_decode(model)
    y, outs = mx.array([[3]]), {}
    for on in (False, True):  # the compiled decode blocks compute what the eager ones do
        switch.on, calls = on, switch.calls
        mx.random.seed(0)  # the same random cache for both
        outs[on] = model(y, cache=bench_models.filled_cache(model, 100))
        assert (switch.calls > calls) == on
        calls = switch.calls
        other(y, cache=bench_models.filled_cache(other, 100))  # another model's layers stay eager
        assert switch.calls == calls
        row = profile_step.profile(model, 100, steps=6)
        for k in ("build_ms", "dispatch_ms", "synced_ms", "pipelined_ms"):
            assert math.isfinite(row[k]) and row[k] > 0, k
        assert row["ops"] > 0
    assert mx.allclose(outs[False], outs[True], atol=1e-2).item()
    for m in (model, bench_models.build("transformer", bench_models.CONFIGS["micro"], bits=0)):
        parts = profile_step.prefill_breakdown(m, 100, chunk=40, reps=1)
        assert parts["step (one eval)"] > 0 and parts["attention"] > 0 and parts["ffn"] > 0
        assert (parts["shared K/V + index keys"] > 0) == (m is model)
    switch.restore()
    assert DecoderLayer.__call__ is eager
    out = tmp_path / "p.jsonl"
    cmd = [sys.executable, "benchmarks/profile_step.py", "--config", "micro", "--contexts", "64", "--steps", "6",
           "--archs", "yoco", "clsa", "--variants", "unfused", "fused", "compiled", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    rows = {(r["arch"], r["variant"]): r for r in map(json.loads, out.read_text().splitlines())}
    assert len(rows) == 6 and all(math.isfinite(r["pipelined_ms"]) for r in rows.values())
    for arch in ("yoco", "clsa"):
        assert rows[(arch, "fused")]["ops"] < rows[(arch, "unfused")]["ops"]
    # the first architecture's compiled blocks do not leak into the second's eager rows
    assert rows[("clsa", "unfused")]["ops"] - rows[("clsa", "fused")]["ops"] == \
        rows[("yoco", "unfused")]["ops"] - rows[("yoco", "fused")]["ops"]
    subprocess.run([sys.executable, "benchmarks/profile_step.py", "--plot", str(out)], check=True)
    assert out.with_suffix(".png").stat().st_size > 1000


def test_prefill_parts_micro(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "p.jsonl"
    subprocess.run([sys.executable, "benchmarks/prefill_parts.py", "--config", "micro", "--archs", "yoco", "clsa",
                    "--prompts", "100", "--prefill-step", "40", "--iters", "2", "--reps", "1", "--out", str(out)],
                   check=True, capture_output=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["arch"] for r in rows] == ["yoco", "clsa"]
    for r in rows:
        assert all(v > 0 for v in r["layer_parts_ms"].values()) and len(r["layer_parts_ms"]) == 14
        assert all(e < 0.05 for e in r["window_max_abs_error_vs_ref"].values())  # bf16, blocks vs one call
        assert all(v[0] > 0 for v in r["loops"]["100"].values()) and len(r["loops"]["100"]) == 4


def test_prefill_parts_window_forms_switch_and_restore():
    import os

    from benchmarks.prefill_parts import window_form
    from clsa_mlx import window

    compiled = window.window_attention_blocks_compiled
    with window_form("eager blocks"):
        assert window.window_attention_blocks_compiled is window.window_attention_blocks
    with window_form("one call"):
        assert os.environ["CLSA_MLX_WINDOW_BLOCKS"] == "0"
    assert window.window_attention_blocks_compiled is compiled and "CLSA_MLX_WINDOW_BLOCKS" not in os.environ


def test_bench_batch_micro(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "benchmarks/bench_batch.py", "--config", "micro", "--contexts", "300",
                        "--long", "600", "--batches", "1", "3", "--steps", "3", "--out-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((tmp_path / "bench_batch_micro.json").read_text())
    ran = {(x["arch"], x["context"], x["batch"]): x for x in data["rows"] if x["fits"]}
    assert set(ran) == {(a, c, b) for a in bench_batch.ARCHS for c in (300, 600) for b in (1, 3)
                        if c == 300 or a != "transformer"}
    assert all(x["tok_s"] > 0 and x["peak_gb"] > 0 for x in ran.values())
    # per sequence, the shared cache is smaller than the Transformer's per-layer one
    assert ran[("clsa", 300, 1)]["cache_gb_per_seq"] < ran[("transformer", 300, 1)]["cache_gb_per_seq"]
    assert data["summary"]["300"]["largest"]["clsa"]["largest_batch"] == 3
    assert data["machine"]["mlx"] and (tmp_path / "bench_batch_micro.png").stat().st_size > 1000


def test_shard_bytes_halves_what_each_rank_holds():
    from benchmarks.shard_bytes import per_rank

    c = bench_models.CONFIGS["micro"]
    one, two = (per_rank("clsa", c, 0, n, [64]) for n in (1, 2))
    hd = c["dim"] // c["heads"]
    assert one["cache_bytes_per_token"] == 2 * c["kv_heads"] * hd * 2 + c["d_idx"] * 2
    assert two["cache_bytes_per_token"] == 2 * c["kv_heads"] // 2 * hd * 2 + c["d_idx"] * 2  # index keys stay whole
    assert one["weights_bytes"] / 2 < two["weights_bytes"] < one["weights_bytes"]  # embedding and head stay whole
    assert two["allreduces_per_token"] == 2 * c["n_layers"] and one["allreduces_per_token"] == 0
    llama_two = per_rank("transformer", c, 0, 2, [64])
    assert llama_two["cache_bytes_per_token"] == c["n_layers"] * 2 * c["kv_heads"] // 2 * hd * 2


def test_eval_quality_micro(tmp_path, monkeypatch):
    """Lookups through Conversation, dense twin and CLSA, perplexity, coverage, JSON and PNG:
    on the shipped model over a few documents (the GPU run is the one that counts)."""
    import lzma
    import sys

    import clsa_mlx
    from benchmarks import eval_quality
    from training.data import part_of
    from training.facts import facts

    group = next(f"stdlib:m{i}" for i in range(100) if part_of(f"stdlib:m{i}") == "heldout")
    text = "".join(f"VALUE_{i} = {i * 7}\n# the routing picks the top keys once per token\n" for i in range(60))
    (tmp_path / "data").mkdir()
    with lzma.open(tmp_path / "data" / "docs.jsonl.xz", "wt") as f:
        f.write(json.dumps(dict(name="consts.py", text=text, group=group, facts=facts("consts.py", text))) + "\n")
    monkeypatch.setattr(sys, "argv", ["eval_quality.py", "--model", str(clsa_mlx.shipped_model()), "--data",
                                      str(tmp_path / "data"), "--lengths", "300", "--samples", "1", "--kinds", "value",
                                      "kv", "--ppl-length", "64", "--ppl-windows", "1", "--coverage-length", "300",
                                      "--out-dir", str(tmp_path / "out")])
    eval_quality.main()
    results = json.loads((tmp_path / "out" / "quality.json").read_text())
    row = results["lookups"]["300"]
    assert set(row) == {"value", "kv"} and {"dense", "clsa"} <= set(row["value"])
    assert row["kv"]["clsa"]["n"] == 1 and row["kv"]["examples"][0]["question"].startswith("What is the value of key")
    assert row["value"]["examples"][0]["answer"] in text  # a lookup quotes the held-out document
    assert results["perplexity"]["clsa"] > 1 and 0 < results["coverage"] <= 1
    assert (tmp_path / "out" / "quality.png").stat().st_size > 1000


def test_routing_bytes_counts_what_the_emulated_kernels_access():
    # The counted model of a decode token's routing traffic against the same routing run on
    # the SIMT emulator, which counts each element its launches touch.
    import simt

    from benchmarks import routing_bytes

    if simt.compiler() is None:
        pytest.skip("no C++ compiler")
    for T, D, k in ((8192, 32, 256), (20000, 128, 2048)):
        counted = sum(routing_bytes.routing_bytes(T, D, k).values())
        assert abs(routing_bytes.emulated_bytes(T, D, k) / counted - 1) < 0.1


def test_compare_bench_takes_medians_per_version(tmp_path, monkeypatch):
    import sys

    from benchmarks import compare_bench

    def run(name, ms):
        rows = [dict(T=t, route_kernel_ms=m, select_kv_kernel_ms=2 * m) for t, m in zip((8192, 65536), ms)]
        (tmp_path / name).write_text(json.dumps(dict(rows=rows)))
        return str(tmp_path / name)

    after = ",".join(run(f"a{i}.json", ms) for i, ms in enumerate(([1.0, 5.0], [3.0, 4.0], [2.0, 9.0])))
    monkeypatch.setattr(sys, "argv", ["compare_bench.py", "--out", str(tmp_path / "cmp"), f"after={after}",
                                      f"before={run('b.json', [7.0, 8.0])}"])
    compare_bench.main()
    got = json.loads((tmp_path / "cmp.json").read_text())
    assert got["after"]["runs"] == 3 and got["after"]["route_kernel_ms"] == {"8192": 2.0, "65536": 5.0}
    assert got["before"]["select_kv_kernel_ms"] == {"8192": 14.0, "65536": 16.0}
    assert got["after"]["route_kernel_b32_ms"] == {} and (tmp_path / "cmp.png").stat().st_size > 1000


def test_compare_quality_counts_the_real_lookups_of_each_version(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from benchmarks.compare_quality import real_share
    from training.facts import KINDS

    def results(exact):
        row = {k: {a: dict(exact=exact[i], n=10) for a in ("clsa", "dense")} for i, k in enumerate(KINDS)}
        row["kv"] = {a: dict(exact=1.0, n=10) for a in ("clsa", "dense")}  # synthetic: not counted
        return dict(lookups={"1024": row, "4096": row}, machine=dict(device="cpu", mlx="0", date="today"))

    old, new = results([0.5, 0.2, 0.0, 1.0, 0.1]), results([0.9, 0.3, 0.0, 1.0, 0.6])
    assert real_share(old, 1024, "clsa") == (18, 50) and real_share(new, 4096, "dense") == (28, 50)
    for name, r in (("old", old), ("new", new)):
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_quality.py"
    subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "cmp"),
                    f"old={tmp_path / 'old.json'}", f"new={tmp_path / 'new.json'}"], check=True, capture_output=True)
    table = json.loads((tmp_path / "cmp.json").read_text())["real_lookups"]
    assert table["new"]["4096"]["clsa"] == [28, 50] and (tmp_path / "cmp.png").stat().st_size > 10_000
