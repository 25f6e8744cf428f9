"""mlx-lm's batch machinery on our models, unchanged: `batch_generate` and `BatchGenerator`
(sequences joining and leaving mid-flight, prompt caches merged in, caches extracted at the
end) give the greedy tokens and the log-probabilities (1e-4) of one-at-a-time generation. Tiny fp32 models, window 16, top-k 8:
prompts shorter and longer than both, rows that pass top-k while others already have."""

import mlx.core as mx
import pytest
from mlx_lm.generate import BatchGenerator, batch_generate, generate_step
from mlx_lm.generate import generate as mlx_lm_generate
from mlx_lm.tokenizer_utils import TokenizerWrapper

from clsa_mlx.model import Model
from clsa_mlx.tiny import byte_tokenizer, tiny_args

ARCHS = {
    "clsa": {},
    "yoco-swa": dict(index_topk=0),
    "yoco-retention": dict(index_topk=0, sliding_window=None, self_decoder="gated_retention"),
}
LENGTHS = (3, 7, 20, 45, 61)  # window 16, top-k 8


def greedy(logits):
    return mx.argmax(logits, axis=-1)


@pytest.fixture(scope="module", params=list(ARCHS))
def model(request):
    mx.random.seed(3)
    m = Model(tiny_args(**ARCHS[request.param]))
    mx.eval(m.parameters())
    return m


def prompts(n=len(LENGTHS), seed=0):
    mx.random.seed(seed)
    return [mx.random.randint(3, 250, (L,)).tolist() for L in LENGTHS[:n]]


def one_at_a_time(model, prompt, n, cache=None, logprobs=None):
    steps = generate_step(mx.array(prompt), model, max_tokens=n, sampler=greedy, prompt_cache=cache)
    tokens = []
    for t, lp in steps:
        tokens.append(int(t))
        if logprobs is not None:
            logprobs.append(lp)
    return tokens


# fp32 on the CPU; MLX CUDA's fp32 matmuls of different batch shapes differ by up to 6e-4 (H200 run,
# measured on an H200)
TOL = 1e-4 if mx.default_device() == mx.cpu else 2e-3


def assert_close(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert float(mx.abs(a - b).max()) < TOL


def run(gen, late=(), at_step=2):
    """Drive a BatchGenerator to the end; `late` prompts are inserted once decoding runs."""
    out, logprobs, finished, step = {}, {}, {}, 0
    while True:
        _, responses = gen.next()
        step += 1
        if step == at_step and late:
            gen.insert(*late)
        for r in responses:
            out.setdefault(r.uid, []).append(r.token)
            logprobs.setdefault(r.uid, []).append(r.logprobs)
            if r.finish_reason is not None:
                finished[r.uid] = r
        if not responses and step > at_step and not gen._unprocessed_sequences and not len(gen._prompt_batch):
            return out, logprobs, finished


def test_batch_generate_matches_mlx_lm_generate(model):
    tok = TokenizerWrapper(byte_tokenizer())
    ps = prompts()
    got = batch_generate(model, tok, ps, max_tokens=10, prefill_step_size=48).texts  # chunks > window
    want = [mlx_lm_generate(model, tok, p, max_tokens=10) for p in ps]
    assert got == want


def test_batch_generator_join_and_leave(model):
    # Rows finish at different lengths (filter), two prompts join while three decode (extend),
    # prompt chunks of 16 tokens are right-padded per row.
    ps = prompts()
    max_tokens = [12, 5, 9, 12, 3]
    gen = BatchGenerator(model, max_tokens=12, prefill_step_size=16, prefill_batch_size=3)
    first = gen.insert(ps[:3], max_tokens[:3])
    out, logprobs, finished = run(gen, late=(ps[3:], max_tokens[3:]), at_step=3)
    assert sorted(out) == first + [3, 4]
    for uid, p, n in zip(range(5), ps, max_tokens):
        want = []
        assert out[uid] == one_at_a_time(model, p, n, logprobs=want), uid
        assert_close(logprobs[uid], want)
        assert finished[uid].finish_reason == "length"


def test_batch_generator_with_prompt_caches_and_extracted_caches(model):
    # Histories of different lengths are merged into the batch caches (left padding); the
    # caches a finished row hands back continue exactly like one-at-a-time generation.
    ps = prompts(4, seed=1)
    heads = [p[: len(p) // 2 + 1] for p in ps]
    caches = []
    for h in heads:
        c = model.make_cache()
        model(mx.array(h)[None], cache=c)
        mx.eval([x.state for x in c])
        caches.append(c)
    gen = BatchGenerator(model, max_tokens=8, prefill_step_size=48)  # a suffix chunk > window
    uids = gen.insert([p[len(h):] for p, h in zip(ps, heads)], [8, 6, 8, 4], caches=caches, all_tokens=heads)
    out, logprobs, finished = run(gen)
    for uid, p, n in zip(uids, ps, [8, 6, 8, 4]):
        want_lp = []
        want = one_at_a_time(model, p, n, logprobs=want_lp)
        assert out[uid] == want, uid
        assert_close(logprobs[uid], want_lp)
        r = finished[uid]  # its cache holds the prompt and every reply token
        assert r.all_tokens == p + want
        follow_up = [65, 66, 67]
        more = one_at_a_time(model, follow_up, 5, cache=r.prompt_cache)
        assert more == one_at_a_time(model, p + want + follow_up, 5), uid
