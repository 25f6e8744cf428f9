"""`python chat.py`: interactive long-context chat, or one-shot answers for scripts."""

import atexit
import os
import signal
import sys
import time
from pathlib import Path

import click
import mlx.core as mx
from mlx_lm.sample_utils import make_sampler

from .conversation import PREFILL_STEP, ChatError, Conversation, model_identity
from .loading import load, one_line, printable, resolve, shipped_model
from .prefix_cache import FOLDER, PrefixCache

HELP = """commands:
  /file PATH     add a document (prefilled now; ask about it in the next question)
  /docs          the documents in this conversation
  /system TEXT   set the system prompt (starts a new conversation)
  /reset         forget the conversation
  /save FILE     save the session (prompt cache + conversation) to FILE.safetensors;
                 `mlx_lm generate --prompt-cache-file FILE --prompt ...` continues it too
  /load FILE     resume a saved session of this model
  /stats         context, cache and memory figures
  /help          this text
  /quit          leave (also Ctrl-D; Ctrl-C stops a reply or a prefill)
a line of three double quotes starts and ends a question of several lines"""
HISTORY = os.environ.get("CLSA_MLX_HISTORY", "~/.cache/clsa-mlx/history")  # typed lines across runs; "" = none


class Progress:
    """Prefill progress on stderr for long inputs, from the start: tokens done / total, tok/s,
    time left; one line redrawn in a terminal, a line per step otherwise."""

    def __init__(self, min_tokens: int = PREFILL_STEP):
        self.min_tokens, self.t0, self.tty = min_tokens, None, sys.stderr.isatty()

    def __call__(self, done: int, total: int):
        if total < self.min_tokens:
            return
        if self.t0 is None or done == 0:
            self.t0 = time.perf_counter()
            line = f"[prefill] 0/{total:,} tokens"
        else:
            rate = done / max(time.perf_counter() - self.t0, 1e-9)
            line = f"[prefill] {done:,}/{total:,} tokens, {rate:,.0f} tok/s, {(total - done) / rate:.0f}s left"
        if self.tty:
            print("\r" + line + "\x1b[K", end="\n" if done >= total else "", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)


class StopFlag:
    """Ctrl-C while a reply streams sets the flag instead of raising, so the reply ends cleanly."""

    def __enter__(self):
        self.stopped = False
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, *_):
        self.stopped = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)

    def __call__(self):
        return self.stopped


class Thoughts:
    """A reasoning model's <think> ... </think> (Phi-4-mini-flash-reasoning): dimmed in a terminal,
    else between [thinking] and [/thinking] lines. A tag split over tokens waits until whole."""

    TAGS = ("<think>", "</think>")

    def __init__(self, tty: bool):
        self.shown = ("\x1b[2m", "\x1b[0m") if tty else ("[thinking]\n", "\n[/thinking]\n")
        self.held, self.inside = "", False

    def __call__(self, piece: str) -> str:
        text, out = self.held + piece, ""
        while True:
            tag = self.TAGS[self.inside]
            i = text.find(tag)
            if i < 0:
                break
            out, text, self.inside = out + text[:i] + self.shown[self.inside], text[i + len(tag):], not self.inside
        tag = self.TAGS[self.inside]
        n = next((n for n in range(len(tag) - 1, 0, -1) if text.endswith(tag[:n])), 0)
        self.held = text[len(text) - n:] if n else ""
        return out + text[: len(text) - n]

    def end(self) -> str:
        """What is held back, and the end of a thought the reply stopped inside."""
        text, self.held = self.held, ""
        return text + (self.shown[1] if self.inside else "")


def reply(conv: Conversation, question: str, out=sys.stdout, **gen):
    progress = Progress()
    thoughts = Thoughts(out.isatty())

    def prefill_progress(done, total):
        if stop.stopped and done < total:  # Ctrl-C inside the question's prefill: stop at this chunk
            raise KeyboardInterrupt
        progress(done, total)

    with StopFlag() as stop:
        for piece in conv.ask(question, progress=prefill_progress, stop=stop, **gen):
            print(thoughts(printable(piece, keep="\n\t")), end="", file=out, flush=True)
    print(thoughts.end(), file=out)
    say_dropped(conv, out)
    return stop.stopped


def say_dropped(conv: Conversation, out=sys.stdout):
    if conv.dropped:  # --drop-oldest made room
        print(f"[dropped the {conv.dropped} oldest turn(s) to fit the context]", file=out)


def _cut(text: str, n: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def command(conv: Conversation, line: str) -> bool:
    """Runs one /command; returns False to leave."""
    name, _, arg = line.strip().partition(" ")
    arg = arg.strip()
    if name in ("/quit", "/exit", "/q"):
        return False
    if name == "/help":
        print(HELP)
    elif name == "/reset":
        conv.reset()
        print("[conversation cleared]")
    elif name == "/system":
        conv.reset(arg)
        print("[system prompt set; new conversation]")
    elif name == "/stats":
        print(f"[{conv.stats()}]")
    elif name == "/docs":
        names = conv.document_names()
        print("[" + (", ".join(names) + f"; context {conv.used}/{conv.limit}" if names else "no documents") + "]")
    elif name in ("/file", "/save", "/load") and not arg:
        raise ChatError(f"{name} needs a path")
    elif name == "/file":
        n = conv.add_document(arg, progress=Progress())
        say_dropped(conv)
        how = "from the document cache" if conv.reused else "added"
        print(f"[{conv.document_names()[-1]}: {n} tokens {how}; context {conv.used}/{conv.limit}]")
    elif name == "/save":
        saved = conv.save(arg)
        say_dropped(conv)
        print(f"[saved {saved}: {conv.used} tokens]")
    elif name == "/load":
        conv.load(arg)
        print(f"[loaded {printable(arg)}: {conv.used} tokens, {len(conv.messages) // 2} turns]")
        if conv.messages:
            q, a = conv.messages[-2]["content"].rsplit("Question: ", 1)[-1], conv.messages[-1]["content"]
            print(f"[last question: {_cut(q)!r} -> {_cut(a)!r}]")
        if conv.document_names():  # pending ones included
            print(f"[documents: {', '.join(conv.document_names())}]")
    else:
        raise ChatError(f"unknown command {name}; /help lists them")
    return True


def read_question(first: str, read=input) -> str:
    """A line, or with a line of three double quotes, the lines up to the closing one."""
    if first.strip() != '"""':
        return first
    lines = []
    while (line := read("... ")).strip() != '"""':
        lines.append(line)
    return "\n".join(lines)


def turn(conv: Conversation, line: str, gen: dict) -> bool:
    """One typed line: a /command or a question. Returns False to leave."""
    try:
        if line.startswith("/"):
            return command(conv, line)
        if reply(conv, line, **gen):
            print("[stopped]")
        print(f"[{conv.stats()}]")
    except ChatError as e:
        print(f"[error] {e}")
    except KeyboardInterrupt:
        print("\n[interrupted]")
    except Exception as e:  # a tokenizer or chat template that fails on this input: the session goes on
        print(f"[error] {type(e).__name__}: {one_line(e)}; the conversation is unchanged")
    return True


def _history(readline):
    if not HISTORY:
        return
    try:
        Path(HISTORY).expanduser().parent.mkdir(parents=True, exist_ok=True)
        readline.read_history_file(str(Path(HISTORY).expanduser()))
    except OSError:  # none yet, or not writable: history for this run only
        pass
    readline.set_history_length(1000)
    atexit.register(lambda: _save_history(readline))


def _save_history(readline):
    try:
        readline.write_history_file(str(Path(HISTORY).expanduser()))
    except OSError:
        pass


def repl(conv: Conversation, gen: dict):
    try:
        import readline  # line editing and history for input()

        _history(readline)
    except ImportError:
        pass
    print(f"[clsa-mlx chat: context limit {conv.limit} tokens; /help for commands, Ctrl-D to quit]")
    armed = False  # one Ctrl-C at the prompt (say, a moment after a reply ended) keeps the session
    while True:
        try:
            line = read_question(input(">> "))
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            if armed:
                print()
                return
            print("\n[Ctrl-C again or Ctrl-D to leave]")
            armed = True
            continue
        armed = False
        if line.strip() and not turn(conv, line.strip() if line.startswith("/") else line, gen):
            return


def script(conv: Conversation, text: str, gen: dict):
    """Piped input that starts with a /command: each line is run as if typed at the prompt."""
    lines = iter(text.splitlines())
    for line in lines:
        line = read_question(line, lambda _: next(lines, '"""'))
        if line.strip():
            print(f">> {line}")
            if not turn(conv, line, gen):
                return


def _number(ctx, param, value):
    if value != value:  # nan passes every range
        raise click.BadParameter("not a number")
    return value


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", help="Model folder or Hugging Face id (default: the model shipped with clsa-mlx).")
@click.option("--system", help="System prompt.")
@click.option("--file", "files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Document to put into the context before the first question (repeatable).")
@click.option("--prompt", help="Ask one question, print only the answer, exit. Without it, piped stdin is the "
              "question, or, when it starts with a /command, lines run as if typed.")
@click.option("--temp", type=click.FloatRange(min=0, max=1e6), default=0.0, show_default=True, callback=_number)
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True, callback=_number)
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--min-p", type=click.FloatRange(0, 1), default=0.0, show_default=True, callback=_number)
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), help="Random seed for sampling.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=512, show_default=True, help="Per reply.")
@click.option("--max-context", type=click.IntRange(min=16), help="Context limit in tokens (default: model and memory).")
@click.option("--drop-oldest", is_flag=True, help="On overflow, drop the oldest turns instead of refusing.")
@click.option("--prefill-step-size", type=click.IntRange(min=16), default=PREFILL_STEP, show_default=True,
              help="Prompt tokens per prefill step; smaller steps hold less scratch memory on long documents.")
@click.option("--document-cache-gb", type=click.FloatRange(min=0, max=1e6), default=8.0, show_default=True,
              callback=_number,
              help=f"Disk kept for prefilled documents in {FOLDER or 'no folder'} (CLSA_MLX_DOCUMENT_CACHE "
                   "names another folder, empty: none); a document prefilled once starts the next conversation "
                   "at once. 0: memory only.")
def main(model, system, files, prompt, temp, top_p, top_k, min_p, seed, max_tokens, max_context, drop_oldest,
         prefill_step_size, document_cache_gb):
    """Chat with a CLSA / YOCO model about long documents. Under `mlx.launch` the model is
    sharded over the ranks; every rank reads the same input and rank 0 prints."""
    if seed is not None:
        mx.random.seed(seed)
    group = mx.distributed.init()
    if group.rank() > 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")
    piped = prompt is None and not sys.stdin.isatty() and group.size() == 1  # mlx.launch always pipes stdin
    if piped:
        try:
            prompt = sys.stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError:
            sys.exit("error: the piped input is not UTF-8 text")
    try:
        path = resolve(model) if model else shipped_model()
        m, tokenizer = load(path, group=group)
        model_id = model_identity(path)
        prefixes = PrefixCache(model_id, FOLDER if document_cache_gb > 0 else None, document_cache_gb)
        conv = Conversation(m, tokenizer, model_id, system, max_context, drop_oldest, prefill_step_size, group,
                            prefixes, model_path=path.absolute())
        for note in conv.notes:
            print(f"[note] {note}", file=sys.stderr)
        for f in files:
            conv.add_document(f, progress=Progress())
    except (ChatError, OSError, ValueError) as e:
        sys.exit(f"error: {one_line(e, 600)}")
    gen = dict(max_tokens=max_tokens, sampler=make_sampler(temp, top_p, min_p, top_k=top_k))
    if prompt is not None and piped and prompt.lstrip().startswith("/"):
        return script(conv, prompt, gen)
    if prompt is not None:
        if not prompt.strip():
            sys.exit("error: empty prompt")
        try:
            reply(conv, prompt.strip(), **gen)
        except ChatError as e:
            sys.exit(f"error: {e}")
        except Exception as e:  # a tokenizer or chat template that fails on this input
            sys.exit(f"error: {type(e).__name__}: {one_line(e)}")
        return
    repl(conv, gen)


if __name__ == "__main__":
    main()
