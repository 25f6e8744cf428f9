"""Tensor parallel (`Model.shard`) over two local processes on MLX's ring backend: the same
logits and greedy tokens as one process, 1/N of the global K/V per rank, mlx-lm's own commands."""

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import clsa_mlx
from benchmarks.shard_bytes import Ranks  # a stand-in group: shard refuses before any message
from clsa_mlx.generate import stream_generate
from clsa_mlx.model import Model
from clsa_mlx.tiny import byte_tokenizer, make_tiny_folder, save_model_folder, tiny_args

pytestmark = pytest.mark.e2e  # subprocesses, terminals, servers or training: pytest -m e2e

ARCHS = {
    "clsa": {},
    "clsa-retention": dict(sliding_window=None, self_decoder="gated_retention"),
    "yoco-swa": dict(index_topk=0),
    "yoco-retention": dict(index_topk=0, sliding_window=None, self_decoder="gated_retention"),
}
# byte tokenizer: one token per character, past the window (16) and top-k (8)
PROMPT = "Sharded heads, one shared routing: every rank picks the same tokens. " * 2
WORKER = Path(__file__).with_name("sharded_worker.py")


def launch(*command, n=2, timeout=300):
    launcher = Path(sys.executable).with_name("mlx.launch")  # the script pip installs with mlx
    return subprocess.run([str(launcher), "--backend", "ring", "-n", str(n), "--", *command],
                          capture_output=True, text=True, timeout=timeout)


def run_sharded(folder, out, n=2):
    out.mkdir()
    (out / "prompt.txt").write_text(PROMPT)  # mlx.launch passes its command through a shell: no spaces
    r = launch(sys.executable, str(WORKER), str(folder), str(out), n=n)
    assert r.returncode == 0, r.stdout + r.stderr
    return [json.loads((out / f"rank{i}.json").read_text()) for i in range(n)]


def one_process(folder):
    model, tokenizer = clsa_mlx.load(folder)
    tokens = tokenizer.encode(PROMPT)
    logits = np.array(model(mx.array(tokens)[None])[0])
    greedy = [r.token for r in stream_generate(model, tokenizer, tokens, max_tokens=24)]
    cache = model.make_cache()
    model(mx.array(tokens)[None], cache=cache)
    return model, logits, greedy, cache[len(model.self_decoder.layers)].nbytes


@pytest.mark.parametrize("arch", list(ARCHS))
def test_two_ranks_equal_one_process(tmp_path, arch):
    folder = make_tiny_folder(tmp_path / "m", seed=3, **ARCHS[arch])
    model, logits, greedy, kv_bytes = one_process(folder)
    ranks = run_sharded(folder, tmp_path / "out")
    for r in ranks:
        assert r["size"] == 2
        np.testing.assert_allclose(np.array(r["logits"]), logits, atol=2e-5, rtol=1e-4)
        assert r["greedy"] == greedy
        assert r["kv_heads"] == model.args.n_attn_kv_heads // 2  # each rank caches its half of the global K/V
        assert r["kv_bytes"] * 2 == kv_bytes
    assert ranks[0]["sampled"] == ranks[1]["sampled"]  # ranks seeded differently sample as one


def quantizable(path, module):
    return isinstance(module, (nn.Linear, nn.Embedding)) and "indexer" not in path


def test_quantized_two_ranks_equal_one_process(tmp_path):
    mx.random.seed(4)
    model = Model(tiny_args())
    nn.quantize(model, group_size=32, bits=8, class_predicate=quantizable)
    folder = save_model_folder(model, tmp_path / "q", byte_tokenizer())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization": {"group_size": 32, "bits": 8}}))
    _, logits, greedy, _ = one_process(folder)
    for r in run_sharded(folder, tmp_path / "out"):
        np.testing.assert_allclose(np.array(r["logits"]), logits, atol=2e-5, rtol=1e-4)
        assert r["greedy"] == greedy


def test_head_counts_that_do_not_split_are_refused():
    with pytest.raises(ValueError, match=r"cannot shard over 3 ranks: n_self_heads 4, n_self_kv_heads 4, n_attn_heads 4, "
                                         r"n_attn_kv_heads 2, hidden_dim 128 not divisible by 3"):
        Model(tiny_args()).shard(Ranks(3))
    model = Model(tiny_args())
    nn.quantize(model, group_size=64, bits=8, class_predicate=quantizable)
    with pytest.raises(ValueError, match="out_proj has 64 input columns, 32 per rank is not a multiple of the "
                                         "quantization group size 64"):
        model.shard(Ranks(2))


def test_chat_under_mlx_launch_answers_once_like_one_process(tmp_path):
    folder = make_tiny_folder(tmp_path / "m", seed=3)
    args = ["-m", "clsa_mlx.chat", "--model", str(folder), "--max-tokens", "12"]
    alone = subprocess.run([sys.executable, *args, "--prompt", PROMPT], capture_output=True, text=True, timeout=120)
    assert alone.returncode == 0, alone.stderr
    r = subprocess.run([str(Path(sys.executable).with_name("mlx.launch")), "--backend", "ring", "-n", "2", "--",
                        sys.executable, *args], input=f"{PROMPT.strip()}\n/save s\n/quit\n", capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("[clsa-mlx chat") == 1  # rank 0 alone prints
    assert alone.stdout.strip() in r.stdout
    assert "/save: sessions of a model sharded over 2 ranks are not supported" in r.stdout
    assert not list(tmp_path.glob("s*.safetensors"))


def test_mlx_lm_server_under_mlx_launch_shards_and_answers_as_one_process(tmp_path):
    from test_server import PROMPTS, complete, serve

    folder = make_tiny_folder(tmp_path / "m", seed=5)
    with serve(folder, tmp_path / "one.log") as (port, _):
        alone = [complete(port, p) for p in PROMPTS]
    launcher = [str(Path(sys.executable).with_name("mlx.launch")), "--backend", "ring", "-n", "2", "--"]
    with serve(folder, tmp_path / "two.log", launcher) as (port, log):
        assert [complete(port, p) for p in PROMPTS] == alone
        with ThreadPoolExecutor(len(PROMPTS)) as pool:  # batched, through mlx-lm's BatchGenerator
            assert list(pool.map(lambda p: complete(port, p), PROMPTS)) == alone
        log.seek(0)
        assert "generation thread died" not in log.read()
