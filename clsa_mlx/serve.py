"""`clsa-serve`: an OpenAI-compatible server for CLSA / YOCO models, built on mlx-lm's server
(its request handling, `BatchGenerator`, continuous batching and prompt cache). It serves only the
model named at start, built from this package (no folder's code runs), and checks every request
against that model before it is queued: token ids inside the vocabulary, numbers typed and in
range, the prompt within `max_seq_len`, `max_tokens` capped by the context left. A request that
fails gets an error reply and the rest go on; a request whose client has gone stops at once. A
document's prefix is kept for the next question, in memory and in a bounded folder on disk."""

import argparse
import copy
import ctypes
import gc
import hashlib
import io
import json
import logging
import math
import select
import socket
import sys
import time
import weakref
from http.server import ThreadingHTTPServer
from pathlib import Path

import mlx.core as mx
from mlx_lm import server as mlx_server
from mlx_lm.models.cache import LRUPromptCache

from . import mlx_lm_hooks as hooks
from .conversation import context_limit, model_identity
from .loading import load, one_line, resolve, shipped_model
from .prefix_cache import FOLDER, MIN_TOKENS, PrefixCache

MAX_BODY = 64 << 20
MAX_STOPS = 16
ROLES = ("system", "developer", "user", "assistant", "tool")
TEMPLATE_OWN_ARGS = {"add_generation_prompt", "chat_template", "continue_final_message", "conversation", "documents",
                     "max_length", "messages", "padding", "return_dict", "return_tensors", "tokenize", "tools",
                     "truncation"}
FLOATS = {"temperature": (0, 100), "top_p": (0, 1), "min_p": (0, 1), "repetition_penalty": (0, 100),
          "presence_penalty": (-100, 100), "frequency_penalty": (-100, 100), "xtc_probability": (0, 1),
          "xtc_threshold": (0, 1)}
CONTEXT_SIZES = ("repetition_context_size", "presence_context_size", "frequency_context_size")


class RequestError(ValueError):
    def __init__(self, message: str, status: int = 400, param=None):
        super().__init__(message)
        self.status, self.param = status, param


class GenerationError(RuntimeError):
    """The generation step that served this request failed (e.g. out of memory)."""


class ClientGone(Exception):
    pass


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def check_body(body: dict, served: str, names: set, vocab: int, limit: int) -> dict:
    """The request body with its model named canonically, or a RequestError naming the field.
    Checks only what needs no tokenizer; `APIHandler.handle_completion` checks the tokens."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    model = body.get("model", "default_model")
    if not isinstance(model, str) or model not in names:
        raise RequestError(f"model {str(model)[:80]!r} is not served here; this server serves only {served!r}",
                           404, "model")
    if body.get("draft_model", "default_model") != "default_model" or body.get("adapters") is not None:
        raise RequestError("draft models and adapters are fixed when the server starts", param="draft_model")
    for name in ("stream", "logprobs"):
        if name in body and not isinstance(body[name], bool):
            raise RequestError(f"{name} must be true or false", param=name)
    ints = {"max_tokens": (1, 1 << 31), "max_completion_tokens": (1, 1 << 31), "top_k": (0, vocab),
            "top_logprobs": (-1, 11), "num_draft_tokens": (0, 64), "seed": (0, (1 << 63) - 1), "n": (1, 1),
            **{k: (0, max(limit, 1 << 16)) for k in CONTEXT_SIZES}}
    for name, (lo, hi) in ints.items():
        v = body.get(name)
        if v is not None and not (_is_int(v) and lo <= v <= hi):
            raise RequestError(f"{name} must be an integer from {lo} to {hi}, got {str(v)[:40]}", param=name)
    for name, (lo, hi) in FLOATS.items():
        v = body.get(name)
        if v is not None and not (_is_number(v) and lo <= v <= hi):
            raise RequestError(f"{name} must be a number from {lo} to {hi}, got {str(v)[:40]}", param=name)
    if "xtc_probability" in body or "xtc_threshold" in body:  # mlx-lm takes only floats there
        body.update({k: float(body[k]) for k in ("xtc_probability", "xtc_threshold") if body.get(k) is not None})
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict) or len(bias) > 1024:
            raise RequestError("logit_bias must be an object of at most 1024 token ids", param="logit_bias")
        for k, v in bias.items():
            t = int(k) if isinstance(k, str) and k.strip().isdigit() else None
            if t is None or not 0 <= t < vocab:
                raise RequestError(f"logit_bias: {str(k)[:40]!r} is not a token id of this model (0..{vocab - 1})",
                                   param="logit_bias")
            if not (_is_number(v) and -100 <= v <= 100):
                raise RequestError(f"logit_bias[{t}] must be a number from -100 to 100", param="logit_bias")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stops, list) and len(stops) <= MAX_STOPS
                                 and all(isinstance(s, str) and 0 < len(s) <= 1024 for s in stops)):
        raise RequestError(f"stop must be a string or a list of at most {MAX_STOPS} non-empty strings", param="stop")
    options = body.get("stream_options")
    if options is not None:
        if not (isinstance(options, dict) and all(isinstance(options.get(k, False), bool)
                                                  for k in ("include_usage", "include_progress"))):
            raise RequestError("stream_options must be an object of true/false values", param="stream_options")
        body["stream_options"] = {"include_usage": options.get("include_usage", False), **options}
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not (isinstance(kwargs, dict) and len(kwargs) <= 32 and all(
            isinstance(k, str) and k not in TEMPLATE_OWN_ARGS and (v is None or isinstance(v, (str, bool, int, float)))
            for k, v in kwargs.items())):
        raise RequestError("chat_template_kwargs must be an object of plain values (not the template's own "
                           "arguments)", param="chat_template_kwargs")
    if "messages" in body:
        check_messages(body)
    elif "prompt" in body:
        p = body["prompt"]
        if not (isinstance(p, str) and p or isinstance(p, list) and p and all(_is_int(t) for t in p)):
            raise RequestError("prompt must be a non-empty string or list of token ids", param="prompt")
    return {**body, "model": served}


def check_messages(body: dict):
    messages = body["messages"]
    if not (isinstance(messages, list) and messages):
        raise RequestError("messages must be a non-empty list", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(f"messages[{i}] must be an object whose role is one of {', '.join(ROLES)}",
                               param="messages")
        content = m.get("content")
        parts = content if isinstance(content, list) else []
        text_parts = all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                         for p in parts)
        if not (content is None or isinstance(content, (str, list))) or not text_parts:
            raise RequestError(f"messages[{i}].content must be a string or a list of text parts (this model reads "
                               "text only)", param="messages")
    if body.get("tools") is not None and not (isinstance(body["tools"], list)
                                              and all(isinstance(t, dict) for t in body["tools"])):
        raise RequestError("tools must be a list of objects", param="tools")
    mapping = body.get("role_mapping")
    if mapping is not None and not (isinstance(mapping, dict) and all(isinstance(v, str) for v in mapping.values())):
        raise RequestError("role_mapping must be an object of strings", param="role_mapping")


def _ids_key(ids) -> str:
    return hashlib.sha256(json.dumps(list(ids)).encode()).hexdigest()


class PromptCache(LRUPromptCache):
    """mlx-lm's prompt cache. A document prefix (a "system" entry of at least MIN_TOKENS, which
    the prefix split makes at a question's start) is also written to `disk`, and read back when a
    request starts with it and memory holds no longer match (`hint`: the prefix, set per request)."""

    def __init__(self, max_size: int, disk, model, max_bytes: int = 1 << 63):
        super().__init__(max_size, max_bytes)
        self.disk, self.model, self.hint = disk, model, None  # model(): the served model, for the file's check

    def insert_cache(self, model, tokens, prompt_cache, *, cache_type="assistant"):
        super().insert_cache(model, tokens, prompt_cache, cache_type=cache_type)
        if self.disk is not None and cache_type == "system" and len(tokens) >= MIN_TOKENS:
            self.disk.put(_ids_key(tokens), prompt_cache, list(tokens))

    def fetch_nearest_cache(self, model, tokens):
        cache, rest = super().fetch_nearest_cache(model, tokens)
        hint, self.hint = self.hint, None
        if (self.disk is None or not hint or len(tokens) - len(rest) >= len(hint) or len(hint) >= len(tokens)
                or tokens[: len(hint)] != hint):
            return cache, rest
        hit = self.disk.get(_ids_key(hint), list(hint), self.model())
        if hit is None:
            return cache, rest
        kept, ids = hit
        logging.info(f"document prefix of {len(ids)} tokens read from {self.disk.folder}")
        LRUPromptCache.insert_cache(self, model, ids, kept, cache_type="system")
        return copy.deepcopy(kept), tokens[len(ids):]


class ModelProvider(mlx_server.ModelProvider):
    """Serves the one model named at start, loaded by `clsa_mlx.load`: our classes, never a
    folder's `model_file`; no adapters or draft models chosen by a request."""

    def __init__(self, cli_args):
        super().__init__(cli_args)
        path = resolve(cli_args.model)
        self.name = cli_args.served_model_name or cli_args.model
        self.names = {"default_model", self.name, cli_args.model, str(path), str(path.resolve())}

    def _load(self, model_path, adapter_path=None, draft_model_path=None):
        self.reset()
        gc.collect()
        mx.clear_cache()
        model, tokenizer = load(model_path, tokenizer_config=self._tokenizer_config, adapter_path=adapter_path)
        self.model_key = (model_path, adapter_path, None)
        self.model, self.tokenizer, self.processor = model, tokenizer, None
        self.context_limit = context_limit(model)
        self.is_batchable = all(hasattr(c, "merge") for c in model.make_cache())

    def load(self, model_path, adapter_path=None, draft_model_path=None):
        if model_path not in self.names:
            raise RequestError(f"model {model_path!r} is not served here", 404)
        return super().load("default_model", None, "default_model")


class ResponseGenerator(hooks.ResponseGenerator):
    """mlx-lm's: the request queue, the generation thread, its batches and prompt cache. Requests
    arrive tokenized and checked (`request.tokenized`); a failed generation step fails the
    requests it was serving and the thread goes on; a request whose client has gone is stopped
    at the next step."""

    def __init__(self, model_provider, prompt_cache):
        self.waiting = weakref.WeakSet()  # the response queues of the requests the thread has taken
        self.load_error = None
        super().__init__(model_provider, prompt_cache)
        self.budget = hooks.use_step_budget(self)

    def prepared(self, request):
        done = getattr(request, "tokenized", None)
        if done is None:
            return None
        self.prompt_cache.hint = request.prefix
        prompt, segments, types, state, vision = done
        return list(prompt), [list(s) for s in segments], list(types), state, vision

    def on_request(self, item):
        q = item[0]
        if not hasattr(q, "item"):  # note whether a token went out
            put = q.put

            def put_noting(x, *a, **k):
                q.started = q.started or isinstance(x, mlx_server.Response)
                put(x, *a, **k)

            q.item, q.started, q.put = item, False, put_noting
        self.waiting.add(q)

    def on_failure(self, e):
        """The failed step's requests are served again, each alone (as mlx-lm serves a request
        with a seed), but for those that fail alone and streams with tokens already sent: they get
        the error. (A reply that is not streamed goes out whole, so it can start over.)"""
        if self.model_provider.model is None:  # the model did not load: nothing to serve
            self.load_error, self._stop = e, True
            return
        logging.error(f"generation failed: {one_line(e)}")
        for q in list(self.waiting):
            _, request, args = q.item
            if getattr(request, "alone", False) or q.started and request.client.stream:
                q.put(GenerationError(f"generation failed: {one_line(e, 200)}"))
            else:
                request.alone = True
                args.seed = 0 if args.seed is None else args.seed
                self.requests.put(q.item)
        self.waiting = weakref.WeakSet()
        gc.collect()
        mx.clear_cache()

    def tokenize(self, request, chat_template_kwargs):
        """(prompt, segments, segment types, state, vision) of a request, as mlx-lm makes them,
        with the document prefix split; a text prompt may be a list of token ids."""
        tokenizer = self.model_provider.tokenizer
        if request.request_type == "text" and isinstance(request.prompt, list):
            ids = list(request.prompt)
            return ids, [ids], ["assistant"], "normal", None
        args = argparse.Namespace(chat_template_kwargs=chat_template_kwargs)
        return hooks.tokenize_with_prefix_split(hooks.MLX_TOKENIZE, self, tokenizer, request, args)

    def generate(self, request, args, progress_callback=None):
        client, ctx = request.client, None

        def stop():
            if ctx is not None:
                ctx.stop()
            self.budget.interrupt()

        def progress(done, total):
            if client.gone():
                stop()
                raise ClientGone()
            cached = max(ctx.prompt_cache_count, 0) if ctx is not None else 0
            if progress_callback is not None:
                progress_callback(cached + done, cached + total)
            client.progress(cached + done, cached + total)  # over the whole prompt, its cached part done

        def watched(responses, kept):
            """The responses, until the client goes; a request served again after a failed step
            (a new context) starts over: what `kept` holds of the first try is dropped."""
            nonlocal ctx
            try:
                for r in responses:
                    if client.gone():
                        raise ClientGone()
                    if isinstance(r, mlx_server.GenerationContext):
                        ctx = r
                        kept.clear()
                        continue
                    yield r
            except BaseException:
                stop()
                raise

        try:
            ctx, responses = super().generate(request, args, progress_callback=progress)
            request.stop = stop
            if client.stream:
                responses = watched(responses, [])
            else:  # all of it first: a failure becomes an error reply, not a cut connection
                kept = []
                for r in watched(responses, kept):
                    kept.append(r)
                responses = iter(kept)
        except ClientGone:
            raise
        except Exception as e:  # from the generation thread: mlx-lm would answer 404
            client.error_status = getattr(e, "status", 500)
            raise
        return ctx, responses


class APIHandler(mlx_server.APIHandler):
    """mlx-lm's request handling; every request checked against the served model first."""

    def handle(self):
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError, ClientGone):
            pass

    def refuse(self, e: RequestError):
        body = json.dumps({"error": {"message": str(e), "type": "invalid_request_error" if e.status < 500
                                     else "server_error", "param": e.param, "code": e.status}}).encode()
        self.send_response(e.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self._set_cors_headers()
        self.end_headers()
        self.wfile.write(body)

    def _set_completion_headers(self, status_code: int = 200):
        if status_code == 404 and getattr(self, "error_status", None):  # mlx-lm answers a failed request 404
            status_code = self.error_status
        super()._set_completion_headers(status_code)

    @property
    def provider(self):
        return self.response_generator.model_provider

    def do_POST(self):
        self.error_status = None
        if self.path not in ("/v1/completions", "/v1/chat/completions", "/chat/completions"):
            return super().do_POST()
        origin, allowed = self.headers.get("Origin"), self.response_generator.cli_args.allowed_origins
        if origin is not None and origin not in allowed and "*" not in allowed:  # a web page's request
            return self.refuse(RequestError(f"requests from {origin[:80]} are not allowed (--allowed-origins)", 403))
        length = self.headers.get("Content-Length", "")
        if not length.isdigit() or int(length) > MAX_BODY:
            return self.refuse(RequestError(f"Content-Length must be a number of bytes up to {MAX_BODY}",
                                            413 if length.isdigit() else 411))
        raw = self.rfile.read(int(length))
        model = self.provider.model
        if model is None:
            return self.refuse(RequestError("the model is still loading", 503))
        try:
            body = json.loads(raw.decode("utf-8"))
            a = model.args
            body = check_body(body, self.provider.name, self.provider.names, a.vocab_size, a.max_seq_len)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            return self.refuse(RequestError(f"the request body is not JSON: {one_line(e, 120)}"))
        except RequestError as e:
            return self.refuse(e)
        if self.path.endswith("/chat/completions") and "messages" not in body:
            return self.refuse(RequestError("a chat request needs messages", param="messages"))
        if self.path == "/v1/completions" and "prompt" not in body:
            return self.refuse(RequestError("a completion request needs a prompt", param="prompt"))
        raw = json.dumps(body).encode()
        self.headers.replace_header("Content-Length", str(len(raw)))
        self.rfile = io.BytesIO(raw)
        super().do_POST()

    def handle_completion(self, request, stop_words):
        model, tokenizer = self.provider.model, self.provider.tokenizer
        vocab, limit, seq_len = model.args.vocab_size, self.provider.context_limit, model.args.max_seq_len
        try:
            try:
                done = self.response_generator.tokenize(request, self.chat_template_kwargs)
                stop_ids = [tokenizer.encode(s, add_special_tokens=False) for s in stop_words]
            except Exception as e:
                raise RequestError(f"the request could not be tokenized: {one_line(e, 200)}") from None
            prompt = done[0]
            for where, ids in [("prompt", prompt), *(("stop", s) for s in stop_ids)]:
                bad = next((t for t in ids if not (_is_int(t) and 0 <= t < vocab)), None)
                if bad is not None:
                    raise RequestError(f"{where}: token {str(bad)[:40]} is not a token id of this model "
                                       f"(0..{vocab - 1})", param=where)
            if len(prompt) >= limit:
                why = (f"the model's context limit (max_seq_len) is {limit} tokens" if limit == seq_len else
                       f"this server's context limit is {limit} tokens (one request's cache must fit in half the "
                       f"memory; the model's max_seq_len is {seq_len})")
                raise RequestError(f"the prompt is {len(prompt)} tokens; {why}, the reply included",
                                   param="messages" if request.messages else "prompt")
        except RequestError as e:
            return self.refuse(e)
        self.max_tokens = min(self.max_tokens, limit - len(prompt))
        segments, types = done[1], done[2]
        k = max((i + 1 for i, t in enumerate(types) if t == "system"), default=0)
        request.tokenized, request.client = done, self
        request.prefix = prompt[: sum(len(s) for s in segments[:k])] or None
        try:
            super().handle_completion(request, stop_words)
        except (BrokenPipeError, ConnectionResetError, ClientGone):
            getattr(request, "stop", lambda: None)()
        except Exception as e:  # mid-stream: the headers are out, the error goes as an event
            if not self.stream:
                raise
            error = {"message": f"generation failed: {one_line(e, 200)}", "type": "server_error"}
            self.wfile.write(f"data: {json.dumps({'error': error})}\n\ndata: [DONE]\n\n".encode())

    def gone(self) -> bool:
        """Has the client closed its connection? (Readable with nothing to read.)"""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def progress(self, done, total):
        if self.stream and (self.stream_options or {}).get("include_progress"):
            event = {"object": "prompt.progress", "processed": done, "total": total}
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
            self.wfile.flush()

    def handle_models_request(self):
        model = self.provider.model
        entry = {"id": self.provider.name, "object": "model", "created": self.created, "owned_by": "clsa-mlx",
                 "context_length": self.provider.context_limit if model is not None else None}
        wanted = self.path.split("?")[0].rstrip("/")[len("/v1/models"):].lstrip("/")
        if wanted and wanted not in self.provider.names:
            return self.refuse(RequestError(f"model {wanted[:80]!r} is not served here", 404))
        body = json.dumps(entry if wanted else {"object": "list", "data": [entry]}).encode()
        self._set_completion_headers(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default 5 resets clients that connect together


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clsa-serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder or hub id (default: the shipped model)")
    p.add_argument("--served-model-name", default=None, help="the model's id in requests and /v1/models")
    p.add_argument("--adapter-path", default=None, help="an mlx-lm LoRA adapter folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--allowed-origins", type=lambda x: x.split(","), default=[], help="CORS origins, comma-separated")
    p.add_argument("--chat-template", default="")
    p.add_argument("--chat-template-args", type=json.loads, default={})
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--max-tokens", type=int, default=512, help="default max_tokens of a request")
    p.add_argument("--decode-concurrency", type=int, default=32, help="requests decoded together")
    p.add_argument("--prompt-concurrency", type=int, default=8, help="prompts prefilled together")
    p.add_argument("--prefill-step-size", type=int, default=2048)
    p.add_argument("--prompt-cache-size", type=int, default=10, help="prompt-cache entries kept in memory")
    p.add_argument("--prompt-cache-bytes", type=mlx_server._parse_size, default=None)
    p.add_argument("--prefix-cache-dir", default=str(FOLDER or ""), help="document prefixes kept on disk ('' for none)")
    p.add_argument("--prefix-cache-gb", type=float, default=8.0, help="bound of that folder")
    p.add_argument("--buffer-cache-gb", type=float, default=None,
                   help="bound of MLX's cache of freed buffers (default: MLX's own)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--trust-remote-code", action="store_true", help=argparse.SUPPRESS)
    return p


def _cli_args(args) -> argparse.Namespace:
    """The settings mlx-lm's server classes read, with what we fix: no remote code, no draft model,
    no KV quantization, no pipeline."""
    return argparse.Namespace(**{**vars(args), **dict(
        draft_model=None, num_draft_tokens=3, trust_remote_code=False, use_default_chat_template=False, kv_bits=None,
        kv_group_size=64, quantized_kv_start=0, pipeline=False)})


def start(args):
    """-> (the HTTP server, the response generator), the model loaded; raises on a bad model."""
    hooks.check()
    if mx.distributed.init().size() > 1:
        raise ValueError("clsa-serve runs one process; for a model sharded over several, run mlx_lm.server "
                         "under mlx.launch (docs/serving.md)")
    hooks.use_batch_generator()
    provider = ModelProvider(args)
    disk = None
    if args.prefix_cache_dir:
        disk = PrefixCache(model_identity(resolve(args.model)), Path(args.prefix_cache_dir).expanduser(),
                           args.prefix_cache_gb, in_memory=0)
    cache = PromptCache(args.prompt_cache_size, disk, lambda: provider.model, args.prompt_cache_bytes or 1 << 63)
    generator = ResponseGenerator(provider, cache)
    while provider.model is None and generator.generation_available():
        time.sleep(0.05)
    if provider.model is None:
        generator.stop_and_join()
        raise ValueError(one_line(generator.load_error or "the model did not load"))
    info = socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    HTTPServer.address_family = info[0]
    return HTTPServer(info[4], lambda *a, **kw: APIHandler(generator, *a, **kw)), generator


def fixed_mmap_threshold():
    """glibc raises its mmap threshold whenever a large block is freed, and from then on keeps
    freed buffers of that size (MLX's arrays on the CPU) in its heap: a server's memory then grows
    with the mix of request shapes. A fixed threshold gives them back (Linux only)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).mallopt(-3, 1 << 17)  # M_MMAP_THRESHOLD, glibc's default start
        except (OSError, AttributeError):
            pass


def main(argv=None):
    fixed_mmap_threshold()
    args = parser().parse_args(argv)
    if args.trust_remote_code:
        sys.exit("clsa-serve: --trust-remote-code is not accepted: our model classes are built in, and with it "
                 "mlx-lm would run code from any folder a client names")
    logging.basicConfig(level=args.log_level, format="%(asctime)s - %(levelname)s - %(message)s")
    args.model = args.model or str(shipped_model())
    if args.buffer_cache_gb is not None:
        mx.set_cache_limit(int(args.buffer_cache_gb * 1e9))
    try:
        httpd, generator = start(_cli_args(args))
    except (OSError, ValueError, RuntimeError) as e:
        sys.exit(f"clsa-serve: {one_line(e)}")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logging.warning(f"listening on {args.host}: anyone who can reach it can use the model")
    host, port = httpd.server_address[:2]
    print(f"clsa-serve: {generator.model_provider.name} on http://{host}:{port}/v1", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
        generator.stop_and_join()


if __name__ == "__main__":
    main()
