"""Checkpoints written by real torch in every input layout the converter reads (test helpers).

The FLA name map here is written out independently of clsa_mlx/convert.py (from
the two codebases' state dicts), so the tests check the converter's mapping, not echo it.
"""

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from torch_ref.model import Model, save_official, tiny_args  # noqa: E402

# name -> tiny_args overrides. "fla" says whether FLA's config can express it (see README).
VARIANTS = {
    "retention-dense": dict(overrides=dict(), fla=True),
    "swa-dense": dict(overrides=dict(sliding_window=8), fla=False),
    "retention-clsa": dict(overrides=dict(index_topk=6, cross_qk_norm=True), fla=True),
    "swa-clsa": dict(overrides=dict(sliding_window=8, n_self_kv_heads=2, qk_norm=True, cross_qk_norm=True,
                                    cross_rope=False, rope_style="standard", index_topk=6), fla=True),
}


def make_model(variant: str, seed: int = 0, **extra):
    torch.manual_seed(seed)
    args = tiny_args(**{**VARIANTS[variant]["overrides"], **extra})
    model = Model(args).eval()
    with torch.no_grad():  # norms start at 1: perturb them so a swapped norm would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model, args


def state_dict(model, dtype=None):
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    return {k: v.to(dtype) for k, v in sd.items()} if dtype is not None else sd


# ---- FLA / HF names --------------------------------------------------------------------

_LAYER = [
    ("mixer_layer_norm.", "attn_norm."), ("final_layer_norm.", "mlp_norm."),
    ("mixer.out_proj.", "attn.o_proj."), ("mixer.gt_proj.", "attn.gk_proj."), ("mixer.", "attn."),
    ("ffn.fc1.", "mlp.gate_proj."), ("ffn.gate.", "mlp.up_proj."), ("ffn.fc2.", "mlp.down_proj."),
]


def official_to_fla(name: str) -> str:
    top = {"embed_tokens.weight": "model.embeddings.weight", "output_projection.weight": "lm_head.weight",
           "layer_norm.weight": "model.norm.weight", "cross_decoder.kv_layer_norm.weight":
           "model.shared_kv_builder.kv_norm.weight"}
    if name in top:
        return top[name]
    for part, fla in (("self_decoder.layers.", "model.self_layers."), ("cross_decoder.layers.", "model.cross_layers.")):
        if name.startswith(part):
            i, rest = name[len(part):].split(".", 1)
            for a, b in _LAYER:
                if rest.startswith(a):
                    rest = b + rest[len(a):]
                    break
            return f"{fla}{i}.{rest}"
    assert name.startswith("cross_decoder."), name
    return "model.shared_kv_builder." + name[len("cross_decoder."):]


def fla_config(args) -> dict:
    assert args.self_decoder == "gated_retention" and args.rope_style == "yoco" or \
        args.self_decoder == "swa" and args.rope_style == "standard" and not args.cross_rope
    cfg = {
        "model_type": "yoco", "architectures": ["YOCOForCausalLM"], "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers, "num_self_decoder_layers": args.n_layers // 2,
        "intermediate_size": args.hidden_dim, "hidden_act": "swish", "norm_eps": args.norm_eps,
        "vocab_size": args.vocab_size, "tie_word_embeddings": False, "max_position_embeddings": 2048,
        "bos_token_id": 0, "eos_token_id": 1, "fuse_norm": True, "torch_dtype": "float32",
        "self_decoder_attn": {
            "type": args.self_decoder, "num_heads": args.n_self_heads, "num_v_heads": args.n_self_kv_heads,
            "window_size": args.sliding_window, "rope_theta": args.rope_theta, "rope_inv_freq": "yoco",
            "gate_logit_normalizer": args.gate_logit_normalizer, "mode": "chunk",
        },
        "cross_decoder_attn": {
            "num_heads": args.n_attn_heads, "num_kv_heads": args.n_attn_kv_heads, "qk_norm": args.cross_qk_norm,
            "rope_theta": args.rope_theta, "rope_inv_freq": "yoco", "qkv_bias": False,
        },
    }
    # CLSA extension keys (top level, our names)
    for k in ("index_topk", "index_head_dim", "qk_norm", "cross_rope"):
        cfg[k] = getattr(args, k)
    return cfg


# ---- writers -----------------------------------------------------------------------------


def write_official(model, args, folder, dtype=None):
    save_official(model, args, folder)
    if dtype is not None:
        torch.save(state_dict(model, dtype), os.path.join(folder, "checkpoint.pth"))
    return Path(folder)


def write_fairseq(model, args, folder):
    save_official(model, args, folder)
    sd = {"decoder.model." + k: v for k, v in state_dict(model).items()}
    ckpt = {
        "cfg": {"model": {"_name": "yoco", "dim": args.dim}, "task": {"tokens_per_sample": 2048}},
        "model": sd,
        "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "num_updates": 10}],
        "extra_state": {"epoch": 1, "train_iterator": {"iterations_in_epoch": 3}},
        "last_optimizer_state": {"state": {0: {"step": torch.tensor(10.0)}}},
    }
    torch.save(ckpt, os.path.join(folder, "checkpoint.pth"))
    return Path(folder)


def _split(sd, n):
    keys = list(sd)
    return [{k: sd[k] for k in keys[i::n]} for i in range(n)]


def write_hf(model, args, folder, fmt="safetensors", names="fla", shards=1):
    folder = Path(folder)
    folder.mkdir(parents=True)
    sd = state_dict(model)
    if names == "fla":
        sd = {official_to_fla(k): v for k, v in sd.items()}
        config = fla_config(args)
    else:
        config = asdict(args)
    with open(folder / "config.json", "w") as f:
        json.dump(config, f, indent=2)
    parts = _split(sd, shards)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        base, index = "model{}.safetensors", "model.safetensors.index.json"
        save = lambda part, path: save_file(part, str(path), metadata={"format": "pt"})  # noqa: E731
    else:
        base, index = "pytorch_model{}.bin", "pytorch_model.bin.index.json"
        save = lambda part, path: torch.save(part, path)  # noqa: E731
    if shards == 1:
        save(parts[0], folder / base.format(""))
        return folder
    weight_map = {}
    for i, part in enumerate(parts):
        name = base.format(f"-{i + 1:05d}-of-{shards:05d}")
        save(part, folder / name)
        weight_map.update({k: name for k in part})
    with open(folder / index, "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f, indent=2)
    return folder


LAYOUTS = {
    "official": lambda m, a, d: write_official(m, a, d),
    "fairseq": lambda m, a, d: write_fairseq(m, a, d),
    "hf-safetensors-official-names": lambda m, a, d: write_hf(m, a, d, "safetensors", "official"),
    "fla-safetensors": lambda m, a, d: write_hf(m, a, d, "safetensors", "fla"),
    "fla-safetensors-sharded": lambda m, a, d: write_hf(m, a, d, "safetensors", "fla", shards=3),
    "fla-bin": lambda m, a, d: write_hf(m, a, d, "bin", "fla"),
    "fla-bin-sharded": lambda m, a, d: write_hf(m, a, d, "bin", "fla", shards=2),
}


def write_tokenizer(folder):
    """The byte-level tokenizer of clsa_mlx.tiny (259 tokens, chat template)."""
    from clsa_mlx.tiny import byte_tokenizer

    tok = byte_tokenizer()
    tok.save_pretrained(str(folder))
    return len(tok)
