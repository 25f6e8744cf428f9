"""One-shot generation on a tiny random-weight CLSA model built on the spot.

The text it prints is noise (the weights are random); it proves the whole path runs:
model folder -> clsa_mlx.load -> chat template -> stream_generate with the shared routing.
"""

import sys
import tempfile

from . import generate, load
from .tiny import make_tiny_folder


def main(prompt: str = "Hello, CLSA!"):
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = load(make_tiny_folder(tmp, sliding_window=8, index_topk=16))
        messages = [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        print(f"[tiny random model: {model.args.n_layers} layers, top-k {model.args.index_topk}; output is noise]")
        generate(model, tokenizer, ids, max_tokens=48, verbose=True)


if __name__ == "__main__":
    main(" ".join(sys.argv[1:]) or "Hello, CLSA!")
