"""Build the training data folder: corpus text, sentencepiece tokenizer, corpus token ids.

  python training/prepare.py DIR
"""

import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from training.data import corpus, train_tokenizer  # noqa: E402


def main(out):
    import sentencepiece as spm

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = corpus()
    (out / "corpus.txt").write_text(text)
    train_tokenizer(out / "corpus.txt", out / "tokenizer")
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    ids = np.array(sp.encode(text), dtype=np.uint16)
    np.save(out / "corpus_ids.npy", ids)
    print(f"{len(text) / 1e6:.1f} MB of text, {len(ids) / 1e6:.2f}M tokens, vocab {sp.get_piece_size()} -> {out}")


if __name__ == "__main__":
    main(sys.argv[1])
