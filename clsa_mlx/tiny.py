"""Tiny random-weight model folders with a byte-level tokenizer: for tests and benchmarks."""

import json
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .config import ModelArgs
from .loading import add_model_file
from .model import Model

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<s>", "</s>", "<|end|>"]


def byte_tokenizer():
    """256 byte tokens plus a few specials; no merges, so any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(byte_chars))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", chat_template=CHAT_TEMPLATE
    )


def tiny_args(**overrides) -> ModelArgs:
    base = dict(
        dim=64, n_layers=4, hidden_dim=128, n_self_heads=4, n_attn_heads=4, n_attn_kv_heads=2,
        vocab_size=len(SPECIAL_TOKENS) + 256, sliding_window=16, qk_norm=True, cross_rope=False,
        index_topk=8, index_head_dim=16,
    )
    return ModelArgs(**{**base, **overrides})


def save_model_folder(model: Model, folder, tokenizer=None):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
    with open(folder / "config.json", "w") as f:
        json.dump(asdict(model.args), f, indent=2, sort_keys=True)
    add_model_file(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder


def make_tiny_folder(folder, seed: int = 0, **overrides):
    mx.random.seed(seed)
    model = Model(tiny_args(**overrides))
    mx.eval(model.parameters())
    return save_model_folder(model, folder, byte_tokenizer())
