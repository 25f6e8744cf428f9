"""CLSA and YOCO long-context models on MLX."""

from .config import ModelArgs
from .generate import ContextOverflowError, generate, stream_generate
from .loading import load, load_model, shipped_model
from .model import Model

__all__ = [
    "ContextOverflowError", "Model", "ModelArgs", "generate", "load", "load_model", "shipped_model", "stream_generate",
]
