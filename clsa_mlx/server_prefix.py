"""mlx-lm's server keeps a chat's shared prefix (a document) in its prompt cache.

The server stores a prompt-cache entry at the end of each segment of a prompt, and splits a chat
only after its system messages. A new question about a document in a user message then found only
the last request's longer entry, which a window or retention cache cannot be trimmed back to, so
the document was prefilled again. `install()` adds one split where the next question will differ:
after the last `Question: ` of the last user message (how a question about documents reads to the
model), else at that message's start; the server keeps the cache there (a "system" entry) and
serves the next question from it as a shorter prefix. Why a wrapper: the split is made in one
server method (`ResponseGenerator._tokenize`), which no model or cache hook reaches."""

import dataclasses
import sys

QUESTION = "Question: "


def _without_question(request):
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


def _split(segments, types, n):
    """`segments` with one more end at token n, if it falls inside the user segment."""
    start = 0
    for i, (segment, kind) in enumerate(zip(segments, types)):
        if kind == "user" and start < n < start + len(segment):
            k = n - start
            return ([*segments[:i], segment[:k], segment[k:], *segments[i + 1:]],
                    [*types[:i], "system", "user", *types[i + 1:]])
        start += len(segment)
    return segments, types


def install():
    """Wrap the running `mlx_lm.server`'s tokenizer step (once); elsewhere nothing happens."""
    server = sys.modules.get("mlx_lm.server")
    if server is None or hasattr(server.ResponseGenerator._tokenize, "splits_shared_prefix"):
        return
    tokenize = server.ResponseGenerator._tokenize

    def _tokenize(self, tokenizer, request, args):
        prompt, segments, types, state, vision = tokenize(self, tokenizer, request, args)
        cut = _without_question(request) if "user" in types else None
        if cut is not None:
            try:
                head = tokenize(self, tokenizer, cut, args)[0]
            except Exception:  # a template that refuses the cut message: serve without the split
                head = []
            n = next((i for i, (a, b) in enumerate(zip(head, prompt)) if a != b), len(head))
            segments, types = _split(segments, types, n)
        return prompt, segments, types, state, vision

    _tokenize.splits_shared_prefix = True
    server.ResponseGenerator._tokenize = _tokenize
