"""The model and its parts: the transformer (and later LoRA, value/reward heads, HF interop)."""

from lmforge.model.transformer import KVCache, Transformer

__all__ = ["KVCache", "Transformer"]
