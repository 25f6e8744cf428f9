import shutil

import mlx.core as mx
import pytest
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_sampler

import clsa_mlx
from clsa_mlx.tiny import make_tiny_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_folder(tmp_path_factory.mktemp("tiny") / "model", index_topk=8)


@pytest.fixture(scope="module")
def loaded(folder):
    return clsa_mlx.load(folder)


def greedy_tokens(model, tokenizer, prompt, n, **kw):
    return [r.token for r in clsa_mlx.stream_generate(model, tokenizer, prompt, max_tokens=n, **kw)]


def test_load_and_stream_generate_fields(loaded):
    model, tokenizer = loaded
    responses = list(clsa_mlx.stream_generate(model, tokenizer, "The cat sat on the mat", max_tokens=12))
    last = responses[-1]
    assert len(responses) == 12 and last.generation_tokens == 12
    assert last.prompt_tokens == len(tokenizer.encode("The cat sat on the mat"))
    assert last.prompt_tps > 0 and last.generation_tps > 0 and last.peak_memory >= 0
    assert clsa_mlx.generate(model, tokenizer, "The cat sat on the mat", max_tokens=12) == "".join(
        r.text for r in responses)


def test_mlx_lm_loads_and_generates_the_same(folder, loaded):
    import mlx_lm

    model, tokenizer = loaded
    prompt = "Once upon a time, in a long document"
    theirs = mlx_lm.generate(*mlx_lm.load(str(folder), trust_remote_code=True), prompt, max_tokens=10)
    assert theirs == clsa_mlx.generate(model, tokenizer, prompt, max_tokens=10)


@pytest.mark.parametrize("command", ["generate", "benchmark"])
def test_mlx_lm_commands_run_the_folder_without_python(folder, loaded, command):
    # What a user types: no `import clsa_mlx`; the folder's model_file builds the model.
    import subprocess
    import sys

    args = ["--prompt", "Once upon a time", "--max-tokens", "10", "--ignore-chat-template"] if command == "generate" else \
        ["-p", "32", "-g", "8", "-n", "1", "-b", "4"]  # batch 4: mlx-lm's batch_generate

    def run(*extra):
        return subprocess.run([sys.executable, "-m", "mlx_lm", command, "--model", str(folder), *args, *extra],
                              capture_output=True, text=True, timeout=300)

    refused = run()
    assert refused.returncode != 0 and "trust_remote_code" in refused.stderr
    assert "Model type clsa not supported" not in refused.stderr
    r = run("--trust-remote-code")
    assert r.returncode == 0, r.stderr[-2000:]
    if command == "generate":
        model, tokenizer = loaded
        assert clsa_mlx.generate(model, tokenizer, "Once upon a time", max_tokens=10) in r.stdout
    else:
        assert "Averages: prompt_tps=" in r.stdout + r.stderr


def test_greedy_generation_equals_full_forward_argmax(loaded):
    model, tokenizer = loaded
    prompt = tokenizer.encode("x" * 5 + "needle in a haystack " * 2)
    out = greedy_tokens(model, tokenizer, prompt, 10)
    seq = prompt + out
    logits = model(mx.array(seq)[None])
    expect = mx.argmax(logits[0, len(prompt) - 1:-1], axis=-1).tolist()
    assert out == expect


def test_prompt_cache_save_load_and_continue(loaded, tmp_path):
    model, tokenizer = loaded
    prompt = tokenizer.encode("A long document about routing. " * 2)
    straight = greedy_tokens(model, tokenizer, prompt, 12)

    cache = model.make_cache()
    model(mx.array(prompt[:-1])[None], cache)
    save_prompt_cache(str(tmp_path / "s.safetensors"), cache, {"model": "tiny"})
    loaded_cache, meta = load_prompt_cache(str(tmp_path / "s.safetensors"), return_metadata=True)
    assert meta["model"] == "tiny"
    assert greedy_tokens(model, tokenizer, prompt[-1:], 12, prompt_cache=loaded_cache) == straight


def test_generation_leaves_every_token_in_the_cache_and_trim_rewinds(loaded):
    model, tokenizer = loaded
    prompt = tokenizer.encode("abc")
    cache = model.make_cache()
    a = greedy_tokens(model, tokenizer, prompt, 4, prompt_cache=cache)
    assert cache[len(model.self_decoder.layers)].offset == len(prompt) + 4
    assert trim_prompt_cache(cache, 5) == 5
    assert greedy_tokens(model, tokenizer, prompt[-1:], 4, prompt_cache=cache) == a


def test_context_overflow(folder, tmp_path):
    import json

    limited = tmp_path / "limited"
    shutil.copytree(folder, limited)
    config = json.loads((limited / "config.json").read_text())
    (limited / "config.json").write_text(json.dumps({**config, "max_seq_len": 24}))
    model, tokenizer = clsa_mlx.load(limited)
    with pytest.raises(clsa_mlx.ContextOverflowError, match="limit is 24"):
        clsa_mlx.generate(model, tokenizer, list(range(30)), max_tokens=4)
    out = greedy_tokens(model, tokenizer, list(range(20)), 100)
    assert len(out) == 4


def test_load_model_without_tokenizer_and_bad_paths(folder, tmp_path):
    model = clsa_mlx.load_model(folder)
    assert isinstance(model, clsa_mlx.Model) and model.args.index_topk == 8
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        clsa_mlx.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        clsa_mlx.load_model(tmp_path / "empty")


def test_hub_id_resolves_offline_from_the_local_cache(folder, tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "models--someone--tiny-clsa" / "snapshots" / ("a" * 40)
    shutil.copytree(folder, snapshot)
    (tmp_path / "hub" / "models--someone--tiny-clsa" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny-clsa" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    model = clsa_mlx.load_model("someone/tiny-clsa")
    assert model.args.index_topk == 8


def test_sampler_and_logits_processors_pass_through(loaded):
    model, tokenizer = loaded
    seen = []

    def processor(tokens, logits):
        seen.append(tokens.size)
        return logits

    mx.random.seed(3)
    out = greedy_tokens(model, tokenizer, "hi", 5, sampler=make_sampler(temp=0.8, top_k=5),
                        logits_processors=[processor])
    # mlx-lm's loop computes one step ahead, so the processor sees the last token too
    assert len(out) == 5 and len(seen) == 6


def test_chunked_prefill_matches_mlx_lm_loop_and_reports_progress(loaded):
    from mlx_lm.generate import stream_generate as mlx_lm_stream_generate

    model, tokenizer = loaded
    prompt = tokenizer.encode("A long document about routing and windows. " * 3)
    seen = []
    ours = list(clsa_mlx.stream_generate(model, tokenizer, prompt, max_tokens=8, prefill_step_size=8,
                                         prompt_progress_callback=lambda done, total: seen.append((done, total))))
    cache = model.make_cache()
    model.reserve(cache, len(prompt) + 8)
    theirs = list(mlx_lm_stream_generate(model, tokenizer, prompt, max_tokens=8, prefill_step_size=8,
                                         prompt_cache=cache))
    assert [r.token for r in ours] == [r.token for r in theirs]
    assert ours[-1].prompt_tokens == len(prompt) and ours[-1].prompt_tps > 0
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and seen[-1] == (len(prompt), len(prompt))
    assert seen[0] == (0, len(prompt)) and {t for _, t in seen} == {len(prompt)} and (8, len(prompt)) in seen


def test_shipped_folder_carries_the_current_model_file():
    # The shipped folder's copy is what mlx-lm runs for it; it must not drift from the package's.
    import json
    from pathlib import Path

    from clsa_mlx import loading

    folder = clsa_mlx.shipped_model()
    assert json.loads((folder / "config.json").read_text())["model_file"] == loading.MODEL_FILE
    assert (folder / loading.MODEL_FILE).read_bytes() == (Path(loading.__file__).parent / "model_file.py").read_bytes()


def test_timed_prefill_chunks_grow_and_shrink_and_change_no_token(loaded, monkeypatch):
    """chunk_seconds (the chat's): chunks start at 256 tokens, double while fast, halve while
    slow, never past the step; the tokens are those of fixed chunks."""
    import importlib

    gen = importlib.import_module("clsa_mlx.generate")  # the module (clsa_mlx.generate is also the function)
    model, tokenizer = loaded
    prompt = (tokenizer.encode("A long document about routing and windows. ") * 200)[:2500]  # 2499 prefilled
    fixed = greedy_tokens(model, tokenizer, prompt, 6, prefill_step_size=1024)
    for chunk_seconds, expect in ((1e9, [256, 512, 1024, 707]), (1e-9, [256, 256, 256])):
        seen = []
        timed = greedy_tokens(model, tokenizer, prompt, 6, prefill_step_size=1024, chunk_seconds=chunk_seconds,
                              prompt_progress_callback=lambda done, total: seen.append(done))
        sizes = [b - a for a, b in zip(seen, seen[1:]) if b > a]
        assert sizes[:len(expect)] == expect and max(sizes) <= 1024
        assert timed == fixed
    ticks = iter(range(10**6))
    monkeypatch.setattr(gen.time, "perf_counter", lambda: 10.0 * next(ticks))  # each chunk "takes" 10 s
    seen = []
    gen.prefill(model, prompt, model.make_cache(), 1024, lambda done, _: seen.append(done), chunk_seconds=1.0)
    assert [b - a for a, b in zip(seen, seen[1:])][:3] == [256, 256, 256]  # never below 256
