"""Checkpoint layouts of YOCO / CLSA: official, fairseq and FLA tensor names, and the
configs (params.json, FLA's YOCOConfig, our own names) -> ModelArgs."""

import re
from dataclasses import fields

from .config import ModelArgs
from .loading import OneLineError

# official runtime fields of params.json that do not describe the model (the official YOCO code's ModelArgs)
OFFICIAL_RUNTIME_KEYS = ("max_batch_size", "model_parallel_size", "load_checkpoint")
REQUIRED_KEYS = ("dim", "n_layers", "hidden_dim", "n_self_heads", "n_attn_heads", "n_attn_kv_heads", "vocab_size")
MODEL_ARG_NAMES = tuple(f.name for f in fields(ModelArgs))
# tensors some exporters persist that are not weights
IGNORED_SUFFIXES = (".rotary.inv_freq", ".rotary_emb.inv_freq")
FAIRSEQ_PREFIX = "decoder.model."


class ConvertError(OneLineError):
    """A conversion problem, naming the file or key."""


# --------------------------------------------------------------------------------------
# names


def _fla_layer(rest: str) -> str:
    for a, b in (
        ("attn_norm.", "mixer_layer_norm."), ("mlp_norm.", "final_layer_norm."),
        ("attn.o_proj.", "mixer.out_proj."), ("attn.gk_proj.", "mixer.gt_proj."), ("attn.", "mixer."),
        ("mlp.gate_proj.", "ffn.fc1."), ("mlp.up_proj.", "ffn.gate."), ("mlp.down_proj.", "ffn.fc2."),
    ):
        if rest.startswith(a):
            return b + rest[len(a):]
    return rest


def fla_to_official(name: str) -> str:
    """FLA/HF-style YOCO name -> official name; unknown names are kept."""
    if name.startswith("model.embeddings."):
        return "embed_tokens." + name[len("model.embeddings."):]
    if name.startswith("lm_head."):
        return "output_projection." + name[len("lm_head."):]
    if name.startswith("model.norm."):
        return "layer_norm." + name[len("model.norm."):]
    m = re.match(r"model\.(self|cross)_layers\.(\d+)\.(.*)$", name)
    if m:
        return f"{m[1]}_decoder.layers.{m[2]}.{_fla_layer(m[3])}"
    if name.startswith("model.shared_kv_builder.kv_norm."):
        return "cross_decoder.kv_layer_norm." + name[len("model.shared_kv_builder.kv_norm."):]
    if name.startswith("model.shared_kv_builder."):
        return "cross_decoder." + name[len("model.shared_kv_builder."):]
    return name


_FLA_LAYER_INV = (
    ("mixer_layer_norm.", "attn_norm."), ("final_layer_norm.", "mlp_norm."), ("mixer.out_proj.", "attn.o_proj."),
    ("mixer.gt_proj.", "attn.gk_proj."), ("mixer.", "attn."), ("ffn.fc1.", "mlp.gate_proj."),
    ("ffn.gate.", "mlp.up_proj."), ("ffn.fc2.", "mlp.down_proj."),
)


def official_to_fla(name: str) -> str:
    """The inverse of fla_to_official (used to name a missing tensor the way the source names it)."""
    for a, b in (("embed_tokens.", "model.embeddings."), ("output_projection.", "lm_head."),
                 ("layer_norm.", "model.norm."), ("cross_decoder.kv_layer_norm.", "model.shared_kv_builder.kv_norm.")):
        if name.startswith(a):
            return b + name[len(a):]
    m = re.match(r"(self|cross)_decoder\.layers\.(\d+)\.(.*)$", name)
    if m:
        rest = m[3]
        for a, b in _FLA_LAYER_INV:
            if rest.startswith(a):
                rest = b + rest[len(a):]
                break
        return f"model.{m[1]}_layers.{m[2]}.{rest}"
    if name.startswith("cross_decoder."):
        return "model.shared_kv_builder." + name[len("cross_decoder."):]
    return name


def normalize_names(weights: dict, where: str):
    """-> (weights under official names, {official name: name in the file}).

    The origin map also names *expected* tensors the way the source would (FLA names for an FLA
    checkpoint, with the `decoder.model.` prefix for a fairseq one), for error messages."""
    weights = {k: v for k, v in weights.items() if not k.endswith(IGNORED_SUFFIXES) and k != "decoder.version"}
    if any(k.startswith(FAIRSEQ_PREFIX) for k in weights):
        origin = {k.removeprefix(FAIRSEQ_PREFIX): k for k in weights}
        weights = {k.removeprefix(FAIRSEQ_PREFIX): v for k, v in weights.items()}
    else:
        origin = {k: k for k in weights}
    if any(k.startswith(("model.", "lm_head.")) for k in weights):
        mapped, morigin = {}, {}
        for k, v in weights.items():
            new = fla_to_official(k)
            if new in mapped:
                raise ConvertError(f"{where}: tensors {morigin[new]} and {origin[k]} both map to {new}")
            mapped[new], morigin[new] = v, origin[k]
        weights, origin = mapped, morigin
        origin = _NamesInSource(origin, official_to_fla)
    elif any(o.startswith(FAIRSEQ_PREFIX) for o in origin.values()):
        origin = _NamesInSource(origin, lambda k: FAIRSEQ_PREFIX + k)
    return weights, origin


class _NamesInSource(dict):
    def __init__(self, known, guess):
        super().__init__(known)
        self.guess = guess

    def get(self, key, default=None):
        return self[key] if key in self else self.guess(key)


# --------------------------------------------------------------------------------------
# configs


def _make_args(kw: dict, where: str) -> ModelArgs:
    missing = [k for k in REQUIRED_KEYS if k not in kw]
    if missing:
        raise ConvertError(f"{where}: missing {', '.join(missing)}")
    try:
        return ModelArgs(**kw)
    except (ValueError, TypeError) as e:
        raise ConvertError(f"{where}: {e}") from None


def params_to_args(params: dict, where: str, strict: bool = True) -> ModelArgs:
    """Official params.json (plus our CLSA keys), or a config.json written with our names."""
    kw = {}
    for k, v in params.items():
        if k in MODEL_ARG_NAMES:
            kw[k] = v
        elif strict and k not in OFFICIAL_RUNTIME_KEYS:
            raise ConvertError(f"{where}: unknown key {k!r}")
    return _make_args(kw, where)


def fla_config_to_args(cfg: dict, weights: dict, where: str) -> ModelArgs:
    """FLA `YOCOConfig` (config.json, model_type 'yoco') -> ModelArgs.

        hidden_size -> dim;  num_hidden_layers -> n_layers (must be 2 x num_self_decoder_layers);
        intermediate_size -> hidden_dim (or read off mlp.gate_proj when null);  vocab_size;
        norm_eps (FLA default 1e-6);  self_decoder_attn.type -> self_decoder (gated_retention | swa;
        gated_deltanet refused);  .num_heads -> n_self_heads;  .num_v_heads -> n_self_kv_heads (swa);
        .window_size -> sliding_window;  .gate_logit_normalizer;  .rope_theta -> rope_theta (must equal
        cross_decoder_attn.rope_theta);  cross_decoder_attn.num_heads / num_kv_heads -> n_attn_heads /
        n_attn_kv_heads;  .qk_norm -> cross_qk_norm.
        RoPE: gated_retention needs rope_inv_freq 'yoco' (interleaved, official frequencies) ->
        rope_style 'yoco'; FLA's swa layer uses Llama-style RoPE -> rope_style 'standard'. FLA always
        rotates the cross path (interleaved), which we express only when it matches the self-decoder's
        style ('yoco'), or drop with cross_rope: false.
        Refused: qkv_bias, attnres_block_size, hidden_act other than swish/silu.
        Our CLSA keys may sit at the top level and win: index_topk, index_head_dim, qk_norm,
        cross_qk_norm, cross_rope, rope_style, embed_scale, n_self_kv_heads, max_seq_len.
        tie_word_embeddings with no lm_head in the file: the head is a copy of the embedding.
    """
    sd = cfg.get("self_decoder_attn") or {}
    if not isinstance(sd, dict):
        raise ConvertError(f"{where}: self_decoder_attn must be an object, not {type(sd).__name__}")
    sd = dict(sd)
    cd = dict(cfg.get("cross_decoder_attn") or {})
    kind = sd.get("type", "gated_deltanet")
    if kind not in ("gated_retention", "swa"):
        raise ConvertError(f"{where}: self_decoder_attn.type {kind!r} is not supported (gated_retention or swa)")
    n_self, n_all = cfg.get("num_self_decoder_layers", 10), cfg.get("num_hidden_layers", 21)
    if n_all != 2 * n_self:
        raise ConvertError(
            f"{where}: num_hidden_layers {n_all} must be 2 x num_self_decoder_layers {n_self} (half self, half cross)"
        )
    if sd.get("qkv_bias") or cd.get("qkv_bias"):
        raise ConvertError(f"{where}: qkv_bias is not supported (the model has no biases)")
    if cfg.get("attnres_block_size") is not None:
        raise ConvertError(f"{where}: attnres_block_size is not supported")
    if cfg.get("hidden_act", "swish") not in ("swish", "silu"):
        raise ConvertError(f"{where}: hidden_act {cfg['hidden_act']!r} is not supported (swish)")
    theta_self, theta_cross = sd.get("rope_theta", 10000.0), cd.get("rope_theta", 10000.0)
    if theta_self != theta_cross:
        raise ConvertError(f"{where}: self and cross rope_theta differ ({theta_self} vs {theta_cross})")
    dim = cfg.get("hidden_size", 2048)
    hidden = cfg.get("intermediate_size")
    if hidden is None:
        w = weights.get("self_decoder.layers.0.ffn.fc1.weight")
        if w is None:
            raise ConvertError(f"{where}: no intermediate_size and no FFN weight to infer it from")
        hidden = w.shape[0]
    kw = dict(
        dim=dim, n_layers=n_all, hidden_dim=hidden, vocab_size=cfg.get("vocab_size", 32000),
        norm_eps=cfg.get("norm_eps", 1e-6), rope_theta=theta_self, self_decoder=kind,
        n_self_heads=sd.get("num_heads", 6), n_attn_heads=cd.get("num_heads", 32),
        gate_logit_normalizer=sd.get("gate_logit_normalizer", 16.0),
        cross_qk_norm=bool(cd.get("qk_norm", False)),
        model_type="clsa" if cfg.get("index_topk") else "yoco",
    )
    kw["n_attn_kv_heads"] = cd.get("num_kv_heads", kw["n_attn_heads"])
    if kind == "swa":
        kw["sliding_window"] = sd.get("window_size")
        kw["n_self_kv_heads"] = sd.get("num_v_heads", kw["n_self_heads"])
        kw["rope_style"] = "standard"  # FLA's SWA layer is fla.layers.attn.Attention: Llama-style RoPE
    else:
        if sd.get("rope_inv_freq", "fla") != "yoco":
            raise ConvertError(
                f"{where}: self_decoder_attn.rope_inv_freq {sd.get('rope_inv_freq', 'fla')!r} is not supported; "
                "official YOCO weights need 'yoco'"
            )
        kw["rope_style"] = "yoco"
    # our extension keys (CLSA) may sit at the top level of config.json and win
    for k in ("index_topk", "index_head_dim", "qk_norm", "cross_qk_norm", "cross_rope", "rope_style",
              "embed_scale", "n_self_kv_heads", "max_seq_len"):
        if k in cfg:
            kw[k] = cfg[k]
    kw.setdefault("cross_rope", True)
    if kw["cross_rope"]:
        cross_style = "yoco" if cd.get("rope_inv_freq", "fla") == "yoco" else None
        if cross_style is None or cross_style != kw["rope_style"]:
            raise ConvertError(
                f"{where}: the cross-decoder RoPE (interleaved, rope_inv_freq {cd.get('rope_inv_freq', 'fla')!r}) "
                f"does not match the self-decoder's ({kw['rope_style']}); set cross_rope false or use 'yoco' in both"
            )
    return _make_args(kw, where)
