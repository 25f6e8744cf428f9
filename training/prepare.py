"""Build the training data folder: corpus text, sentencepiece tokenizer, corpus token ids, and
the same tokenizer as Hugging Face files with the chat template (DIR/hf) for the model folder.

  python training/prepare.py DIR
"""

import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from training.data import CHAT_TEMPLATE, SPECIALS, corpus, train_tokenizer  # noqa: E402


def write_hf_tokenizer(sp_model, folder):
    """tokenizer.json + tokenizer_config.json that encode exactly as the sentencepiece model."""
    import json
    import shutil

    from transformers import AutoTokenizer

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(sp_model, folder / "tokenizer.model")
    config = dict(tokenizer_class="LlamaTokenizer", legacy=False, add_prefix_space=False, add_bos_token=False,
                  add_eos_token=False, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(folder, additional_special_tokens=SPECIALS)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    # a reply ends with <|end|>; plain text with </s> (mlx-lm reads eos ids from here)
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [tokenizer.eos_token_id, end]}))
    return folder


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
    write_hf_tokenizer(out / "tokenizer.model", out / "hf")
    print(f"{len(text) / 1e6:.1f} MB of text, {len(ids) / 1e6:.2f}M tokens, vocab {sp.get_piece_size()} -> {out}")


if __name__ == "__main__":
    main(sys.argv[1])
