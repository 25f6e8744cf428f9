"""Phi-4-mini-flash (SambaY) against the fp32 PyTorch reference (torch_ref/phi4flash.py), random
weights at small configurations with every layer kind: 8 and 12 layers, 2 K/V heads per stripe,
window 8, prompts shorter and longer than it. Logits within 1e-4 for the whole prompt, chunked
prefill and token by token; batched = one at a time; the scan's chunked form = its step form."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from mlx_lm.generate import BatchGenerator, generate_step
from mlx_lm.models.cache import ArraysCache, KVCache

from clsa_mlx.models import phi4flash as pf
from torch_ref.phi4flash import Phi4Flash, randomize

# fp32 on the CPU; MLX CUDA's fp32 matmuls of different shapes differ by up to 6e-4 (as in test_batch.py)
TOL = 1e-4 if mx.default_device() == mx.cpu else 2e-3


def small_config(layers=8, **overrides):
    return {**dict(model_type="phi4flash", vocab_size=96, hidden_size=64, intermediate_size=96,
                   num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4, sliding_window=8,
                   mamba_d_state=8, tie_word_embeddings=True), **overrides}


def build(cfg, seed=0):
    ref = randomize(Phi4Flash(cfg), seed).eval()
    model = pf.Model(pf.ModelArgs.from_dict(cfg))
    weights = {k: mx.array(v.detach().numpy()) for k, v in ref.state_dict().items()}
    model.load_weights(list(model.sanitize(weights).items()), strict=True)
    mx.eval(model.parameters())
    return ref, model


def ref_logits(ref, ids):
    with torch.no_grad():
        return ref(torch.tensor([ids])).numpy()[0]


def diff(a, b):
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


@pytest.fixture(scope="module", params=[8, 12])
def pair(request):
    return build(small_config(request.param), seed=request.param)


def tokens(n, seed=0):
    return np.random.default_rng(seed).integers(0, 96, n).tolist()


@pytest.mark.parametrize("n", [5, 8, 23])
def test_whole_prompt(pair, n):
    ref, model = pair
    ids = tokens(n, n)
    assert diff(model(mx.array([ids]))[0], ref_logits(ref, ids)) < TOL


@pytest.mark.parametrize("chunks", [(3, 4, 9, 1, 6), (11, 12), (1,) * 23])
def test_chunked_and_token_by_token(pair, chunks):
    ref, model = pair
    ids = tokens(sum(chunks), 7)
    cache, out, start = model.make_cache(), [], 0
    for c in chunks:
        out.append(model(mx.array([ids[start:start + c]]), cache=cache)[0])
        mx.eval([x.state for x in cache])
        start += c
    assert diff(mx.concatenate(out), ref_logits(ref, ids)) < TOL
    assert cache[-1].offset == len(ids)


def test_untied_head_and_list_window():
    cfg = small_config(tie_word_embeddings=False)
    ref, model = build({**cfg}, seed=5)
    listed = pf.ModelArgs.from_dict({**cfg, "sliding_window": [None, 8, None, 8, None, None, None, None]})
    assert listed.sliding_window == 8 and "lm_head" in model
    ids = tokens(13, 2)
    assert diff(model(mx.array([ids]))[0], ref_logits(ref, ids)) < TOL


def test_scan_chunked_equals_steps():
    rng = np.random.default_rng(0)
    B, D, N = 2, 12, 5
    A = -mx.array(rng.uniform(0.5, 16, (D, N)), mx.float32)
    Dv = mx.array(rng.normal(size=D), mx.float32)
    h0 = mx.array(rng.normal(size=(B, D, N)), mx.float32)
    for L in (1, 2, 7, 50, 129):
        x, Bm, C = (mx.array(rng.normal(size=s), mx.float32) for s in ((B, L, D), (B, L, N), (B, L, N)))
        dt = mx.array(rng.uniform(0, 0.5, (B, L, D)), mx.float32)
        y, h = pf.ssm_scan(x, dt, A, Bm, C, Dv, h0)
        y_ref, h_ref = pf.ssm_scan_ref(x, dt, A, Bm, C, Dv, h0)
        assert diff(y, y_ref) < 1e-5 and diff(h, h_ref) < 1e-5, L


def test_caches_and_what_prompts_run(pair):
    ref, model = pair
    L = model.args.num_hidden_layers
    cache = model.make_cache()
    assert len(cache) == L // 2 + 2 and len(model.self_decoder.layers) == L // 2 + 1
    model(mx.array([tokens(20)]), cache=cache)
    mx.eval([c.state for c in cache])
    kinds = [type(c).__name__ for c in cache]
    assert kinds == ["ArraysCache", "RotatingKVCache"] * (L // 4) + ["ArraysCache", "KVCache"]
    assert cache[1].keys.shape[2] <= 8 + 19  # a window layer keeps its window (plus the chunk)
    assert cache[-1].offset == 20 and cache[-1].keys.shape[1] == 2 and cache[-1].keys.shape[3] == 16


def test_prompt_caches_do_not_read_the_cross_decoder():
    # The caches of a prompt chunk depend on layers up to L/2 + 1 only, so evaluating them (as
    # mlx-lm's prompt loop does) computes nothing of the GMU and cross layers.
    _, model = build(small_config(), seed=1)
    ids = mx.array([tokens(12)])
    want = model.make_cache()
    model(ids, cache=want)
    for layer in model.layers[model.args.num_hidden_layers // 2 + 2:]:
        layer.attn.out_proj.weight = mx.full(layer.attn.out_proj.weight.shape, mx.nan)
    got = model.make_cache()
    logits = model(ids, cache=got)
    mx.eval([c.state for c in got])
    for a, b in zip(got, want):
        for x, y in zip(tree_flatten(a.state), tree_flatten(b.state)):
            assert x[1] is None and y[1] is None or mx.array_equal(x[1], y[1])
    assert mx.isnan(logits).all()


def greedy(logits):
    return mx.argmax(logits, axis=-1)


def one_at_a_time(model, prompt, n, cache=None, logprobs=None):
    out = []
    for t, lp in generate_step(mx.array(prompt), model, max_tokens=n, sampler=greedy, prompt_cache=cache):
        out.append(int(t))
        if logprobs is not None:
            logprobs.append(lp)
    return out


def drive(gen):
    out, logprobs = {}, {}
    while True:
        _, responses = gen.next()
        if not responses and not gen._unprocessed_sequences and not len(gen._prompt_batch):
            return out, logprobs
        for r in responses:
            out.setdefault(r.uid, []).append(r.token)
            logprobs.setdefault(r.uid, []).append(r.logprobs)


def test_batched_equals_one_at_a_time(pair):
    # mlx-lm's BatchGenerator: right-padded prompt chunks of 16 (the conv and SSM states of
    # each row taken at its own end), rows that finish early, prompt caches of different
    # lengths merged in (left padding): tokens equal and log-probabilities within 1e-4.
    _, model = pair
    ps = [tokens(n, n) for n in (3, 11, 20, 37)]
    max_tokens = [6, 3, 6, 5]
    gen = BatchGenerator(model, max_tokens=6, prefill_step_size=16, prefill_batch_size=4)
    uids = gen.insert(ps, max_tokens)
    out, logprobs = drive(gen)
    for uid, p, n in zip(uids, ps, max_tokens):
        want = []
        assert out[uid] == one_at_a_time(model, p, n, logprobs=want)
        assert max(diff(a, b) for a, b in zip(logprobs[uid], want)) < TOL

    heads, caches = [p[: len(p) // 2 + 1] for p in ps], []
    for h in heads:
        c = model.make_cache()
        model(mx.array([h]), cache=c)
        mx.eval([x.state for x in c])
        caches.append(c)
    gen = BatchGenerator(model, max_tokens=5, prefill_step_size=16)
    uids = gen.insert([p[len(h):] for p, h in zip(ps, heads)], [5] * 4, caches=caches, all_tokens=heads)
    out, logprobs = drive(gen)
    for uid, p in zip(uids, ps):
        want = []
        assert out[uid] == one_at_a_time(model, p, 5, logprobs=want)
        assert max(diff(a, b) for a, b in zip(logprobs[uid], want)) < TOL


def test_shapes_at_the_published_configuration():
    from tests.phi4flash_fixtures import published_index

    args = pf.ModelArgs.from_dict(published_config())
    model = pf.Model(args)  # arrays are lazy: nothing of 3.8B parameters is allocated here
    shapes = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    assert shapes == published_index()
    assert len(shapes) == 434


def published_config():
    from tests.phi4flash_fixtures import PUBLISHED_CONFIG

    return dict(PUBLISHED_CONFIG)


def hf_config(**overrides):
    return small_config(vocab_size=272, **overrides)  # 256 bytes + the chat specials


@pytest.mark.parametrize("list_window", [False, True])
def test_load_the_published_folder_layout(tmp_path, list_window):
    import clsa_mlx
    from tests.phi4flash_fixtures import write_hf_folder

    cfg = hf_config()
    ref = randomize(Phi4Flash(cfg), 4)
    folder = write_hf_folder(tmp_path / "hf", cfg, ref.state_dict(), list_window=list_window)
    model, tok = clsa_mlx.load(str(folder))
    assert isinstance(model, pf.Model) and model.args.sliding_window == 8
    got = dict(tree_flatten(model.parameters()))
    for k, v in ref.state_dict().items():
        assert got[k].dtype == mx.bfloat16
        assert mx.array_equal(got[k], mx.array(v.to(torch.bfloat16).float().numpy()).astype(mx.bfloat16)), k
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert tok.decode(prompt) == "<|user|>hi<|end|><|assistant|>"
    assert tok.eos_token_ids == {tok.convert_tokens_to_ids("<|end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}
    text = clsa_mlx.generate(model, tok, prompt, max_tokens=4)
    assert isinstance(text, str)


@pytest.mark.parametrize("bits", [None, 4, 8])
def test_convert_and_quantize(tmp_path, bits):
    import clsa_mlx
    from clsa_mlx.convert import convert
    from tests.phi4flash_fixtures import write_hf_folder

    cfg = hf_config(intermediate_size=128)
    ref = randomize(Phi4Flash(cfg), 6)
    src = write_hf_folder(tmp_path / "hf", cfg, {**ref.state_dict(), "lm_head.weight": ref.model.embed_tokens.weight})
    dst = convert(str(src), str(tmp_path / "mlx"), quantize=bits is not None, q_bits=bits, progress=False)
    model, tok = clsa_mlx.load(str(dst))
    assert tok.convert_tokens_to_ids("<|end|>") in tok.eos_token_ids
    saved = {}
    for f in dst.glob("model*.safetensors"):
        saved.update(mx.load(str(f)))
    assert "lm_head.weight" not in saved
    for k, v in saved.items():
        if pf.full_precision(k):
            assert v.dtype == mx.float32, k
    quantized = {k.rsplit(".", 1)[0] for k in saved if k.endswith(".scales")}
    ids = mx.array([tokens(12, 3)])
    base = clsa_mlx.load(str(src))[0]  # the published bf16 weights as they are
    if bits is None:
        assert not quantized
        assert mx.array_equal(model(ids), base(ids))
    else:  # every quantized weight within one quantization step of the original
        assert "model.layers.0.mlp.fc1" in quantized and "model.embed_tokens" in quantized
        assert not any(k.endswith(("x_proj", "dt_proj")) for k in quantized)
        p = "model.layers.0.mlp.fc1."
        got = mx.dequantize(saved[p + "weight"], saved[p + "scales"], saved[p + "biases"], 64, bits)
        w = base.layers[0].mlp.fc1.weight.astype(mx.float32)
        g = w.reshape(-1, 64)
        step = (g.max(1) - g.min(1)) / (2**bits - 1) + mx.abs(g).max(1) / 128  # plus bf16 rounding
        assert float((mx.abs(got - w).reshape(-1, 64).max(1) / step).max()) <= 1
        assert mx.isfinite(model(ids)).all()
    assert isinstance(clsa_mlx.generate(model, tok, "hello", max_tokens=3), str)


def test_converted_folder_runs_in_mlx_lm(tmp_path):
    # mlx-lm builds the folder through its `model_file` (--trust-remote-code): our class, our output.
    from mlx_lm import generate as mlx_lm_generate
    from mlx_lm import load as mlx_lm_load

    import clsa_mlx
    from clsa_mlx.convert import convert
    from tests.phi4flash_fixtures import write_hf_folder

    cfg = hf_config()
    src = write_hf_folder(tmp_path / "hf", cfg, randomize(Phi4Flash(cfg), 8).state_dict())
    dst = convert(str(src), str(tmp_path / "mlx"), progress=False)
    model, tok = clsa_mlx.load(str(dst))
    theirs, their_tok = mlx_lm_load(str(dst), trust_remote_code=True)
    assert isinstance(theirs, pf.Model)
    prompt = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], add_generation_prompt=True)
    want = clsa_mlx.generate(model, tok, prompt, max_tokens=6)
    assert mlx_lm_generate(theirs, their_tok, prompt, max_tokens=6) == want
    dst = convert(str(src), str(tmp_path / "mlx8"), quantize=True, q_bits=8, progress=False)
    theirs, their_tok = mlx_lm_load(str(dst), trust_remote_code=True)
    assert theirs.layers[0].mlp.fc1.bits == 8
    assert isinstance(mlx_lm_generate(theirs, their_tok, prompt, max_tokens=6), str)


def test_left_padded_batch_prompt(pair):
    # A left-padded batch prompt (mlx-lm's batch caches with left_padding): every row's logits
    # equal its own run's; the padding enters neither the conv, the SSM state nor attention.
    from mlx_lm.models.cache import BatchKVCache, BatchRotatingKVCache

    _, model = pair
    ps = [tokens(n, n) for n in (4, 13, 19)]
    T = max(map(len, ps))
    pad = [T - len(p) for p in ps]
    cache = [ArraysCache(2, left_padding=pad) if isinstance(c, ArraysCache) else
             BatchKVCache(pad) if isinstance(c, KVCache) else BatchRotatingKVCache(8, pad) for c in model.make_cache()]
    out = model(mx.array([[0] * n + p for n, p in zip(pad, ps)]), cache=cache)
    for i, (n, p) in enumerate(zip(pad, ps)):
        assert diff(out[i, n:], model(mx.array([p]))[0]) < TOL
    step = model(mx.array([[5], [6], [7]]), cache=cache)
    for i, p in enumerate(ps):
        assert diff(step[i, -1], model(mx.array([p + [5 + i]]))[0, -1]) < TOL


@pytest.mark.parametrize("tty", [False, True])
def test_chat_shows_thinking_whatever_the_token_cuts(tty):
    from clsa_mlx.chat import Thoughts

    text = "<think>Let me see: 2+2 is 4.</think>The answer is 4 <b>x</b> <thin"
    rng = np.random.default_rng(0)
    for _ in range(100):
        t = Thoughts(tty)
        cuts = sorted(rng.choice(np.arange(1, len(text)), rng.integers(0, 20), replace=False).tolist())
        got = "".join(t(text[a:b]) for a, b in zip([0] + cuts, cuts + [len(text)])) + t.end()
        on, off = t.shown
        assert got == on + "Let me see: 2+2 is 4." + off + "The answer is 4 <b>x</b> <thin"
    t = Thoughts(tty)
    assert t("<think>stopped inside") + t.end() == t.shown[0] + "stopped inside" + t.shown[1]


@pytest.mark.parametrize("kv_heads", [2, 8])
def test_other_head_groupings(kv_heads):
    ref, model = build(small_config(num_key_value_heads=kv_heads), seed=kv_heads)
    ids = tokens(14, kv_heads)
    cache = model.make_cache()
    out = [model(mx.array([ids[:9]]), cache=cache)[0]] + [model(mx.array([[t]]), cache=cache)[0] for t in ids[9:]]
    assert diff(mx.concatenate(out), ref_logits(ref, ids)) < TOL


def test_convert_mixed_bits(tmp_path):
    import clsa_mlx
    from clsa_mlx.convert import ConvertError, convert
    from tests.phi4flash_fixtures import write_hf_folder

    cfg = hf_config(num_hidden_layers=16, intermediate_size=128)
    src = write_hf_folder(tmp_path / "hf", cfg, randomize(Phi4Flash(cfg), 9).state_dict())
    dst = convert(str(src), str(tmp_path / "mixed"), quantize=True, quant_recipe="mixed_4_6", progress=False)
    q = json.loads((dst / "config.json").read_text())["quantization"]
    assert q["bits"] == 4 and q["model.embed_tokens"]["bits"] == 6
    assert q["model.layers.1.attn.Wqkv"]["bits"] == 6 and q["model.layers.3.attn.Wqkv"]["bits"] == 4
    assert q["model.layers.0.mlp.fc2"]["bits"] == 6 and q["model.layers.0.mlp.fc1"]["bits"] == 4
    assert q["model.layers.4.mlp.fc2"]["bits"] == 6 and q["model.layers.5.mlp.fc2"]["bits"] == 4
    assert "model.layers.0.attn.x_proj" not in q and "model.layers.0.attn.dt_proj" not in q
    model, tok = clsa_mlx.load(str(dst))
    assert isinstance(clsa_mlx.generate(model, tok, "hello", max_tokens=3), str)
    with pytest.raises(ConvertError, match="need -q"):
        convert(str(src), str(tmp_path / "no"), quant_recipe="mixed_4_6", progress=False)


@pytest.mark.e2e
def test_clsa_serve_answers_from_a_converted_folder(tmp_path):
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from clsa_mlx.convert import convert
    from tests.phi4flash_fixtures import write_hf_folder

    cfg = hf_config()
    src = write_hf_folder(tmp_path / "hf", cfg, randomize(Phi4Flash(cfg), 10).state_dict())
    dst = convert(str(src), str(tmp_path / "mlx"), quantize=True, q_bits=8, progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "clsa_mlx.serve", "--model", str(dst), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
                time.sleep(0.5)
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body,
                                     {"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(req, timeout=120).read())
        assert reply["usage"]["completion_tokens"] == 5 and reply["usage"]["prompt_tokens"] == 5
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_prompt_cache_file_round_trip(pair, tmp_path):
    # mlx-lm's prompt-cache files (mlx_lm.cache_prompt, --prompt-cache-file) hold every cache kind here.
    from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

    _, model = pair
    ids = tokens(19, 4)
    cache = model.make_cache()
    model(mx.array([ids[:15]]), cache=cache)
    save_prompt_cache(str(tmp_path / "c.safetensors"), cache)
    loaded = load_prompt_cache(str(tmp_path / "c.safetensors"))
    assert [type(c).__name__ for c in loaded] == [type(c).__name__ for c in cache]
    want = one_at_a_time(model, ids, 4)
    assert one_at_a_time(model, ids[15:], 4, cache=loaded) == want


@pytest.mark.parametrize("bad, words", [
    (dict(num_hidden_layers=10), "multiple of 4"), (dict(num_key_value_heads=3), "K/V heads"),
    (dict(sliding_window=[None, 8, None, 16, None, None, None, None]), "one window size"),
    (dict(mamba_d_conv=1), "mamba_d_conv"), (dict(mb_per_layer=3), "mb_per_layer"),
])
def test_bad_config_is_one_line(tmp_path, bad, words):
    import clsa_mlx
    from tests.phi4flash_fixtures import write_hf_folder

    cfg = hf_config()
    folder = write_hf_folder(tmp_path / "hf", cfg, randomize(Phi4Flash(cfg), 1).state_dict())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **bad}))
    with pytest.raises(ValueError, match=words) as e:
        clsa_mlx.load(str(folder))
    assert "config.json" in str(e.value) and "\n" not in str(e.value)
