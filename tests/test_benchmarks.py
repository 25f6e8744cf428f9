"""The benchmark code paths run briefly on CPU so they cannot rot (figures here mean nothing)."""

import json

from benchmarks import bench_models, summarize_models


def test_bench_models_micro(tmp_path):
    results = bench_models.run("micro", [48, 200], bits=0, steps=6, prefill_max=200, transformer_max=200)
    rows = {(r["arch"], r["context"]): r for r in results["rows"]}
    assert set(rows) == {(a, c) for a in bench_models.ARCHS for c in (48, 200)}
    for r in rows.values():
        assert r["decode_tps"] > 0 and r["prefill_tps"] > 0 and 0 < r["roofline_share"]
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
