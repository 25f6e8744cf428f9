"""`generate` / `stream_generate`: mlx-lm's loop and arguments, plus the model's context limit
and a prompt loop that keeps its scratch buffers."""

import numbers
import time
from dataclasses import replace
from typing import List, Union

import mlx.core as mx
from mlx_lm.generate import generation_stream, wired_limit
from mlx_lm.generate import stream_generate as _mlx_lm_stream_generate
from mlx_lm.tokenizer_utils import TokenizerWrapper

RESERVE_MAX = 4096  # cache room for generated tokens allocated up front (beyond it the cache grows)


class ContextOverflowError(ValueError):
    pass


def encode(tokenizer, prompt: Union[str, List[int], mx.array], vocab_size: int) -> List[int]:
    """Token ids of `prompt`, each checked against the vocabulary (an id past the embedding reads
    outside it)."""
    if isinstance(prompt, str):
        bos = getattr(tokenizer, "bos_token", None)
        ids = tokenizer.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos))
    else:
        ids = prompt.tolist() if isinstance(prompt, mx.array) else list(prompt)
    for i, t in enumerate(ids):
        if not isinstance(t, numbers.Integral) or isinstance(t, bool) or not 0 <= t < vocab_size:
            raise ValueError(f"prompt token {i}: {repr(t)[:40]} is not a token id of this model (0..{vocab_size - 1})")
    return [int(t) for t in ids]


def context_used(model, prompt_cache) -> int:
    return prompt_cache[len(model.self_decoder.layers)].offset if prompt_cache else 0


def prefill(model, tokens, cache, step: int = 2048, progress=None, chunk_seconds=None, stream=None):
    """Run `tokens` into `cache`, `step` at a time. Unlike mlx-lm's loop it keeps MLX's buffer
    cache between chunks: every chunk needs the same scratch, and freeing it costs a re-allocation.
    With `chunk_seconds`, chunks start at 256 tokens and double or halve (up to `step`) to take
    about that long: Python sees Ctrl-C only between chunks, and a slow machine then still
    honours it within about that time. `stream`: where it runs (mlx-lm's generation stream by default)."""
    tokens, n, start = mx.array(tokens), len(tokens), 0
    size = min(step, 256) if chunk_seconds else step
    if progress:
        progress(0, n)  # the start: a progress line (and its clock) from the first chunk on
    with mx.stream(stream or generation_stream):
        while start < n:
            t0 = time.perf_counter()
            model(tokens[start:start + size][None], cache=cache)
            mx.eval([c.state for c in cache])
            start += size
            if progress:
                progress(min(start, n), n)
            if chunk_seconds:
                seconds = time.perf_counter() - t0
                if seconds < chunk_seconds / 2:
                    size = min(step, 2 * size)
                elif seconds > chunk_seconds:
                    size = max(min(step, 256), size // 2)


def same_random_state(group):
    """Every rank of a sharded model must sample the same token: start them from one seed."""
    if group is not None and group.size() > 1:
        seed = mx.distributed.all_sum(mx.random.state[0], group=group, stream=generation_stream)
        mx.random.seed(seed.view(mx.uint64).item())


def stream_generate(model, tokenizer, prompt, max_tokens: int = 256, group=None, chunk_seconds=None, **kwargs):
    """Yields mlx-lm `GenerationResponse`s. Refuses a prompt that does not fit the model's
    context (`max_seq_len`) and stops generation at that limit. The prompt but its last token
    goes through `prefill` (`chunk_seconds`: its chunk timing, not for a sharded model, whose
    ranks must run the same chunks); mlx-lm's loop takes it from there. A model sharded over
    `group` runs the same on every rank."""
    if not isinstance(max_tokens, numbers.Integral) or isinstance(max_tokens, bool):
        raise ValueError(f"max_tokens must be an integer, got {max_tokens!r}")
    if kwargs.get("kv_bits"):
        raise ValueError("kv_bits: KV-cache quantization is not supported for CLSA/YOCO caches")
    step = kwargs.get("prefill_step_size", 2048)
    if not isinstance(step, int) or step < 1:
        raise ValueError(f"prefill_step_size must be a positive integer, got {step!r}")
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    tokens = encode(tokenizer, prompt, model.args.vocab_size)
    cache = kwargs["prompt_cache"] = kwargs.get("prompt_cache") or model.make_cache()
    limit = model.args.max_seq_len
    if limit > 0:
        used = context_used(model, cache) + len(tokens)
        if used >= limit:
            raise ContextOverflowError(
                f"context overflow: {used} tokens needed, the model's limit is {limit}"
            )
        room = limit - used
        max_tokens = room if max_tokens < 0 else min(max_tokens, room)
    model.reserve(cache, len(tokens) + (min(max_tokens, RESERVE_MAX) if max_tokens > 0 else RESERVE_MAX))
    head, tail = tokens[:-1], tokens[-1:]
    same_random_state(group)
    progress = kwargs.pop("prompt_progress_callback", None) or (lambda *_: None)
    t0 = time.perf_counter()
    if head:
        with wired_limit(model, [generation_stream]):
            prefill(model, head, cache, step, lambda done, _: progress(done, len(tokens)), chunk_seconds)
    head_s = time.perf_counter() - t0
    kwargs["prompt_progress_callback"] = lambda done, _: progress(len(head) + done, len(tokens))
    try:
        for r in _mlx_lm_stream_generate(model, tokenizer, tail, max_tokens, **kwargs):
            yield replace(r, prompt_tokens=len(tokens), prompt_tps=len(tokens) / (head_s + r.prompt_tokens / r.prompt_tps))
    finally:
        if group is not None and group.size() > 1:
            # mlx-lm computes one step ahead; its all-reduces must end before the ranks' next
            # collective on another stream, or the ranks pair the wrong messages.
            mx.synchronize(generation_stream)


def generate(model, tokenizer, prompt, verbose: bool = False, group=None, **kwargs) -> str:
    """The whole reply; `verbose` prints it as it streams (on rank 0 only, when sharded)."""
    verbose = verbose and (group is None or group.rank() == 0)
    text, response = "", None
    for response in stream_generate(model, tokenizer, prompt, group=group, **kwargs):
        if verbose:
            print(response.text, end="", flush=True)
        text += response.text
    if verbose and response is not None:
        print(
            f"\nPrompt: {response.prompt_tokens} tokens, {response.prompt_tps:.1f} tok/s"
            f"\nGeneration: {response.generation_tokens} tokens, {response.generation_tps:.1f} tok/s"
            f"\nPeak memory: {response.peak_memory:.3f} GB"
        )
    return text
