"""The published Phi-4-mini-flash-reasoning configuration (its config.json's architecture keys)
and its checkpoint's tensor names and shapes. The 434 names follow the model's remote code
(`modeling_phi4flash.py`): no `lm_head.weight` (tied), Mamba's `A_log` / `D`, the conv weight
as torch's [channels, 1, width]."""

import math

PUBLISHED_CONFIG = {
    "architectures": ["Phi4FlashForCausalLM"], "model_type": "phi4flash", "vocab_size": 200064,
    "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 32, "num_attention_heads": 40,
    "num_key_value_heads": 20, "max_position_embeddings": 262144, "sliding_window": 512, "hidden_act": "silu",
    "layer_norm_eps": 1e-5, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "pad_token_id": 0,
    "bos_token_id": 1, "eos_token_id": 2, "mb_per_layer": 2, "mamba_d_state": 16, "mamba_d_conv": 4,
    "mamba_expand": 2, "mamba_dt_rank": "auto", "mamba_conv_bias": True, "mamba_proj_bias": False,
}


def published_index(cfg=PUBLISHED_CONFIG):
    """{name: shape} of every tensor in the checkpoint of configuration `cfg`."""
    D, F, V, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    H, Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, E, N, K = D // H, cfg.get("mamba_expand", 2) * D, cfg.get("mamba_d_state", 16), cfg.get("mamba_d_conv", 4)
    r = cfg.get("mamba_dt_rank", "auto")
    r = math.ceil(D / 16) if r == "auto" else r
    out = {"model.embed_tokens.weight": (V, D), "model.final_layernorm.weight": (D,),
           "model.final_layernorm.bias": (D,)}
    if not cfg.get("tie_word_embeddings", True):
        out["lm_head.weight"] = (V, D)
    for i in range(L):
        p = f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[p + norm + ".weight"] = out[p + norm + ".bias"] = (D,)
        out[p + "mlp.fc1.weight"], out[p + "mlp.fc2.weight"] = (2 * F, D), (D, F)
        a = p + "attn."
        if i % 2 == 0 and i <= L // 2:  # Mamba
            out.update({a + "in_proj.weight": (2 * E, D), a + "conv1d.weight": (E, 1, K), a + "conv1d.bias": (E,),
                        a + "x_proj.weight": (r + 2 * N, E), a + "dt_proj.weight": (E, r), a + "dt_proj.bias": (E,),
                        a + "A_log": (E, N), a + "D": (E,), a + "out_proj.weight": (D, E)})
        elif i % 2 == 0:  # GMU
            out.update({a + "in_proj.weight": (E, D), a + "out_proj.weight": (D, E)})
        else:
            q = H * hd if i > L // 2 + 1 else (H + 2 * Hkv) * hd
            out.update({a + "Wqkv.weight": (q, D), a + "Wqkv.bias": (q,), a + "out_proj.weight": (D, H * hd),
                        a + "out_proj.bias": (D,), a + "inner_cross_attn.subln.weight": (2 * hd,)})
            for lam in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
                out[a + "inner_cross_attn." + lam] = (hd,)
    return out


# The published template's shape: <|role|>content<|end|> per message, then <|assistant|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def tokenizer():
    """Byte-level BPE without merges plus the model's chat specials (as its tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


def write_hf_folder(folder, cfg, state_dict, shards=2, list_window=False):
    """A folder laid out as the model is published: config.json (auto_map to the remote code),
    `model-0000N-of-0000M.safetensors` in bf16 with their index, tokenizer.json and its config,
    generation_config.json (the end-of-turn ids)."""
    import json
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {**cfg, "architectures": ["Phi4FlashForCausalLM"], "torch_dtype": "bfloat16",
              "auto_map": {"AutoConfig": "configuration_phi4flash.Phi4FlashConfig",
                           "AutoModelForCausalLM": "modeling_phi4flash.Phi4FlashForCausalLM"}}
    if list_window:
        L, W = cfg["num_hidden_layers"], cfg["sliding_window"]
        config["sliding_window"] = [W if i < L // 2 and i % 2 else None for i in range(L)]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    names = sorted(state_dict)
    weight_map, total = {}, 0
    for s in range(shards):
        part = names[s::shards]
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {k: state_dict[k].detach().to(torch.bfloat16).contiguous() for k in part}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
        total += sum(t.numel() * 2 for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    tok = tokenizer()
    tok.save_pretrained(str(folder))
    ends = [tok.convert_tokens_to_ids(t) for t in ("<|end|>", "<|endoftext|>")]  # a chat turn ends at <|end|>
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": ends}))
    return folder
