"""mlx-lm's other tools on our models, through their own entry points: LoRA training (with
adapters below the indexer, where routing must pass no gradient), fuse, adapters at load;
speculative decoding, trimming and save/load of window caches past the window, max_kv_size;
chat sessions as prompt-cache files (mlx_lm generate continues one, the chat refuses cache_prompt's)."""

import json
import subprocess
import sys

import mlx.core as mx
import pytest
from mlx.utils import tree_map
from mlx_lm.generate import generate_step, speculative_generate_step
from mlx_lm.models import llama
from mlx_lm.models.cache import (
    BatchRotatingKVCache,
    RotatingKVCache,
    can_trim_prompt_cache,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)
from mlx_lm.utils import load as mlx_lm_load
from mlx_lm.utils import save_config, save_model

import clsa_mlx
from clsa_mlx.conversation import ChatError, Conversation, model_identity
from clsa_mlx.loading import shipped_model
from clsa_mlx.tiny import byte_tokenizer, make_tiny_folder

pytestmark = pytest.mark.e2e  # subprocesses, terminals, servers or training: pytest -m e2e

PROMPT = "The pass key is"


def run_mlx_lm(*args):
    r = subprocess.run([sys.executable, "-m", "mlx_lm", *map(str, args), "--trust-remote-code"],
                       capture_output=True, text=True, timeout=300)
    assert "You are using a model of type" not in r.stdout + r.stderr  # transformers' warning about our types
    return r


def mlx_lm(*args):
    r = run_mlx_lm(*args)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    folder = make_tiny_folder(root / "m", seed=1)
    (root / "data").mkdir()
    rows = "\n".join(json.dumps({"text": "The pass key is 71942. Remember: the pass key is 71942."}) for _ in range(8))
    for split in ("train", "valid"):
        (root / "data" / f"{split}.jsonl").write_text(rows + "\n")
    # every layer, the self-decoder below the indexer too; ~55 tokens > top-k 8: routing runs
    mlx_lm("lora", "--model", folder, "--train", "--data", root / "data", "--iters", 12, "--num-layers", 4,
           "--batch-size", 2, "--learning-rate", 1e-2, "--adapter-path", root / "adapters", "--val-batches", 1)
    return root, folder


def greedy(model, tokenizer):
    return clsa_mlx.generate(model, tokenizer, PROMPT, max_tokens=12)


def test_lora_trains_below_the_indexer_and_adapters_load(trained):
    root, folder = trained
    base = greedy(*clsa_mlx.load(folder))
    tuned = greedy(*clsa_mlx.load(folder, adapter_path=root / "adapters"))
    assert tuned != base


def test_mlx_lm_fuse_gives_the_adapters_text(trained):
    root, folder = trained
    mlx_lm("fuse", "--model", folder, "--adapter-path", root / "adapters", "--save-path", root / "fused")
    assert (root / "fused" / "clsa_mlx_model.py").is_file()  # still runs in mlx-lm with no code of ours
    fused = greedy(*clsa_mlx.load(root / "fused"))
    assert fused == greedy(*clsa_mlx.load(folder, adapter_path=root / "adapters"))
    gen = lambda *extra: mlx_lm("generate", "--prompt", PROMPT, "--max-tokens", 12, *extra)  # noqa: E731
    assert gen("--model", root / "fused").split("==========")[1] == \
        gen("--model", folder, "--adapter-path", root / "adapters").split("==========")[1]


# Speculative decoding, trimming and max_kv_size: window 8, prompts and generations well past it.
WINDOW_MODELS = {"clsa": dict(sliding_window=8, index_topk=8), "yoco-swa": dict(sliding_window=8, index_topk=0)}
LONG_PROMPT = "The pass key is 71942. Remember it well. The pass key is"


def bigram_draft(folder, tokens, vocab_size):
    """An mlx-lm llama folder (mlx-lm loads a draft without --trust-remote-code) that predicts
    after each token the one that followed it last in `tokens`: often the target's next token,
    not always. One layer that adds nothing: one-hot embeddings, lm_head the bigram table."""
    args = dict(model_type="llama", hidden_size=vocab_size, num_hidden_layers=1, intermediate_size=8,
                num_attention_heads=1, head_dim=8, rms_norm_eps=1e-5, vocab_size=vocab_size, tie_word_embeddings=False)
    model = llama.Model(llama.ModelArgs(**args))
    model.update(tree_map(mx.zeros_like, model.parameters()))
    model.model.embed_tokens.weight = mx.eye(vocab_size)
    model.model.norm.weight = mx.ones((vocab_size,))
    table = mx.zeros((vocab_size, vocab_size))
    for a, b in zip(tokens, tokens[1:]):
        table[:, a] = 0
        table[b, a] = 1
    model.lm_head.weight = table
    save_model(folder, model)
    save_config(args, folder / "config.json")
    byte_tokenizer().save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module", params=list(WINDOW_MODELS))
def speculative(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    folder = make_tiny_folder(root / "target", seed=3, **WINDOW_MODELS[request.param])
    model, tokenizer = clsa_mlx.load(folder)
    prompt = mx.array(tokenizer.encode(LONG_PROMPT))
    greedy = [t for t, _ in generate_step(prompt, model, max_tokens=60)]
    draft = bigram_draft(root / "draft", prompt.tolist() + greedy[:30], model.args.vocab_size)
    return folder, model, prompt, greedy, draft


def test_speculative_decoding_gives_the_greedy_tokens(speculative):
    folder, model, prompt, greedy, draft = speculative
    out = list(speculative_generate_step(prompt, model, mlx_lm_load(str(draft))[0], num_draft_tokens=3, max_tokens=60))
    assert [t for t, _, _ in out] == greedy
    accepted, rounds = sum(d for *_, d in out), sum(not d for *_, d in out)
    assert 0 < accepted < 3 * (rounds - 1)  # drafts accepted, and some rejected


def test_speculative_decoding_with_our_model_as_the_draft(speculative, tmp_path):
    # Past its window the draft's cache is not trimmed after its one-token steps (as mlx-lm's own
    # window caches): it drafts worse, the target's tokens stay the same.
    folder, model, prompt, greedy, _ = speculative
    draft = clsa_mlx.load_model(make_tiny_folder(tmp_path / "draft", seed=4, sliding_window=8))
    out = speculative_generate_step(prompt, model, draft, num_draft_tokens=3, max_tokens=60)
    assert [t for t, _, _ in out] == greedy


def test_mlx_lm_generate_draft_model_gives_the_greedy_text(speculative):
    folder, _, _, _, draft = speculative
    gen = lambda *extra: mlx_lm("generate", "--model", folder, "--prompt", LONG_PROMPT, "--max-tokens", 60,  # noqa: E731
                                *extra).split("==========")[1]
    assert gen("--draft-model", draft) == gen()


def test_speculative_decoding_with_a_retention_model_is_refused(tmp_path):
    folder = make_tiny_folder(tmp_path / "m", sliding_window=None, self_decoder="gated_retention", qk_norm=False)
    model, tokenizer = clsa_mlx.load(folder)
    with pytest.raises(ValueError, match="requires a trimmable prompt cache"):
        next(speculative_generate_step(mx.array(tokenizer.encode(PROMPT)), model, model))


@pytest.fixture(params=list(WINDOW_MODELS))
def window_model(request, tmp_path):
    model = clsa_mlx.load_model(make_tiny_folder(tmp_path / "m", seed=2, **WINDOW_MODELS[request.param]))
    mx.random.seed(5)
    return model, mx.random.randint(0, 256, (1, 40))


def test_trim_of_a_chunk_past_the_window_equals_the_uncached_model(window_model, tmp_path):
    model, tokens = window_model
    uncached = model(tokens)
    cache = model.make_cache()
    model(tokens[:, :24], cache)
    model(tokens[:, 24:30], cache)  # 6 rows: 5 can be taken back
    assert can_trim_prompt_cache(cache) and trim_prompt_cache(cache, 4) == 4
    save_prompt_cache(str(tmp_path / "c.safetensors"), cache)
    loaded = load_prompt_cache(str(tmp_path / "c.safetensors"))
    assert type(loaded[0]) is RotatingKVCache  # mlx-lm's own: the file loads without us
    batch = [c.merge([c]) for c in cache]
    assert isinstance(batch[0], BatchRotatingKVCache)
    for c in (cache, loaded, batch):
        got = [model(tokens[:, 26:27], c), model(tokens[:, 27:32], c)]  # a one-token step, then a chunk
        assert mx.allclose(mx.concatenate(got, axis=1), uncached[:, 26:32], atol=1e-4).item()


def test_trim_past_what_the_window_cache_kept_is_refused(window_model):
    model, tokens = window_model
    cache = model.make_cache()
    model(tokens[:, :24], cache)
    model(tokens[:, 24:25], cache)  # a one-token step: only the window is left, as in mlx-lm
    assert not can_trim_prompt_cache(cache) and trim_prompt_cache(cache, 1) == 0
    model(tokens[:, 25:31], cache)
    with pytest.raises(ValueError, match="only the 5 newest rows past its window"):
        trim_prompt_cache(cache, 6)
    assert {c.offset for c in cache} == {31}  # nothing was trimmed


def test_max_kv_size_is_refused(speculative):
    folder, model, *_ = speculative
    with pytest.raises(ValueError, match="take no max_kv_size"):
        make_prompt_cache(model, max_kv_size=64)
    assert len(make_prompt_cache(model)) == len(model.make_cache())
    r = run_mlx_lm("generate", "--model", folder, "--prompt", PROMPT, "--max-kv-size", 64)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("ValueError: CLSA/YOCO models take no max_kv_size")


# Chat sessions as mlx-lm prompt-cache files, both ways.
@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    (root / "notes.txt").write_text("The value of key bada-ko is 12345.\n" * 20)
    # a window of 64: a session of one exchange fits in it, one with the document goes past it
    return make_tiny_folder(root / "m", index_topk=8, sliding_window=64), root / "notes.txt"


def conversation(folder):
    return Conversation(*clsa_mlx.load(folder), model_identity(folder), model_path=folder)


@pytest.mark.parametrize("shipped, pending_document", [(False, False), (False, True), (True, False)])
def test_mlx_lm_generate_continues_a_saved_session_as_the_chat_does(chat_model, tmp_path, shipped, pending_document):
    # the shipped model's window (256) holds the whole session, which ends in one-token steps
    # (its `<|user|>` is one token): its window caches hold rows allocated ahead of their offset
    folder, doc = (shipped_model(), None) if shipped else chat_model
    conv = conversation(folder)
    "".join(conv.ask("What is the value of RETRIES?", max_tokens=6))
    if pending_document:
        conv.add_document(str(doc))
    saved = conv.save(str(tmp_path / "s"))
    # the file names the model folder, so --model may be left out; after a document the chat writes "Question: "
    question = "What is the value of TIMEOUT?"
    prompt = f"Question: {question}" if pending_document else question
    model = () if pending_document else ("--model", folder)
    out = mlx_lm("generate", *model, "--prompt-cache-file", saved, "--prompt", prompt, "--max-tokens", 12)
    loaded = conversation(folder)
    loaded.load(saved)
    cached = list(loaded.ids)
    streamed = "".join(loaded.ask(question, max_tokens=12))
    # mlx_lm generate feeds after the cache the template's text from `<query>` on
    render = lambda content: conv.tokenizer.apply_chat_template(  # noqa: E731
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    suffix = render(prompt)[render("<query>").index("<query>"):]
    fed = cached + conv.tokenizer.encode(suffix, add_special_tokens=False)
    assert loaded.ids[:len(fed)] == fed  # what the chat fed for the same question
    reply = loaded.messages[-1]["content"]  # the reply's tokens decoded
    assert reply and out.split("==========")[1] == f"\n{reply}\n"
    assert "".join(conv.ask(question, max_tokens=12)) == streamed and conv.messages == loaded.messages


def test_chat_load_refuses_an_mlx_lm_cache_prompt_file_and_keeps_the_session(chat_model, tmp_path):
    folder, doc = chat_model
    mlx_lm("cache_prompt", "--model", folder, "--prompt-cache-file", tmp_path / "p.safetensors",
           "--prompt", doc.read_text())
    conv = conversation(folder)
    "".join(conv.ask("hello", max_tokens=4))
    before = (conv.used, list(conv.messages))
    with pytest.raises(ChatError, match="an mlx_lm.cache_prompt file holds the model's state but not the text"):
        conv.load(str(tmp_path / "p.safetensors"))
    assert (conv.used, conv.messages) == before
