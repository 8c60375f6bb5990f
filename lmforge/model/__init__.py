"""The model and its parts: the transformer, Hugging Face interop (`lmforge.model.hf`, imported
by path since it needs lmforge.io), and later LoRA and value/reward heads."""

from lmforge.model.transformer import KVCache, Transformer

__all__ = ["KVCache", "Transformer"]
