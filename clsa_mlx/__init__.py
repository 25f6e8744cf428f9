"""CLSA and YOCO long-context models on MLX."""

from .config import ModelArgs
from .generate import ContextOverflowError, generate, stream_generate
from .loading import load, load_model, register_with_mlx_lm
from .model import Model

register_with_mlx_lm()

__all__ = [
    "ContextOverflowError", "Model", "ModelArgs", "generate", "load", "load_model", "stream_generate",
]
