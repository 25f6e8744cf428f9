"""Every place where clsa-mlx reaches into mlx-lm's private internals, each checked against the
mlx-lm versions it was written for (`SUPPORTED`); `check()` refuses any other version with one
line. Everything else of ours uses mlx-lm's public classes and functions."""

import dataclasses
import sys

import mlx.core as mx
import mlx_lm
from mlx_lm import server as mlx_server
from mlx_lm.generate import BatchGenerator as MlxBatchGenerator
from mlx_lm.generate import PromptProcessingBatch, _right_pad_prompts

from .generate import prefill

SUPPORTED = ("0.32.",)  # the mlx-lm releases whose server and batch internals these hooks were checked against
QUESTION = "Question: "


def check(version: str = mlx_lm.__version__):
    if not version.startswith(SUPPORTED):
        raise RuntimeError(f"mlx-lm {version}: clsa-mlx's server hooks were written for mlx-lm "
                           f"{' / '.join(SUPPORTED)}x (pip install 'mlx-lm>=0.32.2,<0.33')")


# -- The document prefix: one more prompt-cache split, where the next question will differ --------
#
# mlx-lm's server stores a prompt-cache entry at the end of each segment of a prompt, and splits a
# chat only after its system messages. A window or retention cache cannot be trimmed back to a
# shorter prefix, so a new question about a document would prefill the document again. The split
# is made in one private method, `ResponseGenerator._tokenize`, which returns
# (prompt, segments, segment_types, initial_state, vision) in mlx-lm 0.32.


def without_question(request):
    """The request with its last user message cut to what another question shares, or None."""
    *head, last = request.messages
    content = last.get("content")
    if not isinstance(content, str):
        return None
    i = content.rfind(QUESTION)
    if i < 0 and not head:
        return None  # a lone message: only the template's header is shared
    kept = content[: i + len(QUESTION)] if i >= 0 else ""
    return dataclasses.replace(request, messages=[*head, {**last, "content": kept}])


def split_segments(segments, types, n):
    """`segments` with one more end at token n, if it falls inside the user segment."""
    start = 0
    for i, (segment, kind) in enumerate(zip(segments, types)):
        if kind == "user" and start < n < start + len(segment):
            k = n - start
            return ([*segments[:i], segment[:k], segment[k:], *segments[i + 1:]],
                    [*types[:i], "system", "user", *types[i + 1:]])
        start += len(segment)
    return segments, types


def tokenize_with_prefix_split(tokenize, self, tokenizer, request, args):
    """mlx-lm's `_tokenize` (passed as `tokenize`) with the document prefix as its own segment."""
    prompt, segments, types, state, vision = tokenize(self, tokenizer, request, args)
    cut = without_question(request) if "user" in types else None
    if cut is not None:
        try:
            head = tokenize(self, tokenizer, cut, args)[0]
        except Exception:  # a template that refuses the cut message: serve without the split
            head = []
        n = next((i for i, (a, b) in enumerate(zip(head, prompt)) if a != b), len(head))
        segments, types = split_segments(segments, types, n)
    return prompt, segments, types, state, vision


MLX_TOKENIZE = mlx_server.ResponseGenerator._tokenize


class ResponseGenerator(mlx_server.ResponseGenerator):
    """mlx-lm's ResponseGenerator with the document-prefix split and three overridable points:
    `prepared(request)` (a request tokenized before it was queued), `on_request(item)` (each request
    the generation thread takes) and `on_failure(exception)` (the generation loop raised; it is
    then started again)."""

    def _tokenize(self, tokenizer, request, args):
        done = self.prepared(request)
        if done is not None:
            return done
        return tokenize_with_prefix_split(MLX_TOKENIZE, self, tokenizer, request, args)

    def _next_request(self, timeout=None):
        item = super()._next_request(timeout)
        if item is not None:
            self.on_request(item)
        return item

    def _run_generate(self):
        while not self._stop:
            try:
                self._generate()
                return
            except Exception as e:  # a failed step must not take the server down with it
                self.on_failure(e)

    def prepared(self, request):
        return None

    def on_request(self, item):
        pass

    def on_failure(self, e):
        raise e


def install():
    """For `mlx_lm.server` run on one of our folders (the folder's model_file calls this): wrap
    its `_tokenize` with the prefix split, once. Elsewhere, or on another mlx-lm, nothing happens;
    `clsa-serve` subclasses instead."""
    server = sys.modules.get("mlx_lm.server")
    if server is None or not mlx_lm.__version__.startswith(SUPPORTED):
        return
    tokenize = server.ResponseGenerator._tokenize
    if hasattr(tokenize, "splits_shared_prefix"):
        return

    def _tokenize(self, tokenizer, request, args):
        return tokenize_with_prefix_split(tokenize, self, tokenizer, request, args)

    _tokenize.splits_shared_prefix = True
    server.ResponseGenerator._tokenize = _tokenize


# -- The batch path's prompt loop ----------------------------------------------------------------
#
# mlx-lm's `PromptProcessingBatch.prompt` frees MLX's buffer cache after every chunk; each chunk
# needs the same scratch again, so a long document prefilled 1.9x slower than through our loop.
# `BatchGenerator` makes its prompt batches in `_make_batch` and `__init__`; ours are the same
# objects with the class below.


class PromptBatch(PromptProcessingBatch):
    """One prompt: the project's `prefill`. Several: mlx-lm's padded loop, keeping the buffers."""

    def prompt(self, tokens):
        if len(self.uids) != len(tokens):
            raise ValueError("The batch length doesn't match the number of inputs")
        if not tokens:
            return
        for kept, new in zip(self.tokens, tokens):
            kept += new
        if len(tokens) == 1:
            prefill(self.model, tokens[0], self.prompt_cache, self.prefill_step_size, stream=mx.default_stream(
                mx.default_device()))
            return
        lengths = [len(p) for p in tokens]
        padding = [max(lengths) - n for n in lengths]
        if max(padding) > 0:
            x = _right_pad_prompts(tokens, max_length=max(lengths))
            for c in self.prompt_cache:
                c.prepare(lengths=lengths, right_padding=padding)
        else:
            x = mx.array(tokens)
        while x.shape[1] > 0:
            n = min(self.prefill_step_size, x.shape[1])
            self.model(x[:, :n], cache=self.prompt_cache)
            mx.eval([c.state for c in self.prompt_cache])
            x = x[:, n:]
        if max(padding) > 0:
            for c in self.prompt_cache:
                c.finalize()
            mx.eval([c.state for c in self.prompt_cache])


class BatchGenerator(MlxBatchGenerator):
    """mlx-lm's BatchGenerator with `PromptBatch` prompt batches."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._prompt_batch.__class__ = PromptBatch

    def _make_batch(self, n):
        batch = super()._make_batch(n)
        batch.__class__ = PromptBatch
        return batch


def use_batch_generator(cls=BatchGenerator):
    """mlx-lm's server makes its `BatchGenerator` by that name in its module: make ours there (in
    this process, which serves only our models)."""
    check()
    mlx_server.BatchGenerator = cls


class StepBudget(mlx_server.TimeBudget):
    """mlx-lm's server decodes for up to half a second before it removes the requests whose clients
    have gone (`TimeBudget`); this budget also ends as soon as `interrupt()` was called."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._interrupted, self._steps = False, 0

    def interrupt(self):
        self._interrupted = True

    def __iter__(self):
        self._steps = 0
        return super().__iter__()

    def __next__(self):
        if self._interrupted and self._steps > 0:  # one step first: it sees which requests stopped
            self._interrupted = False
            raise StopIteration()
        self._steps += 1
        return super().__next__()


def use_step_budget(generator: mlx_server.ResponseGenerator) -> StepBudget:
    check()
    generator._time_budget = budget = StepBudget()
    return budget

