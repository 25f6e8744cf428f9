"""PyTorch reference of the YOCO / CLSA model (test oracle, checkpoint writer, trainer).
Not part of the runtime package."""

from .model import (
    CrossDecoder,
    GatedRetention,
    Indexer,
    Model,
    ModelArgs,
    SelfDecoder,
    SlidingWindowAttention,
    apply_rope,
    attend,
    causal_mask,
    indexer_kd_loss,
    load_official,
    retention_parallel,
    retention_recurrent,
    retention_step,
    rope_freqs,
    save_official,
    tiny_args,
    topk_mask,
)
