"""Reference models built on jaxfp4 layers (a Llama-family decoder)."""

from jaxfp4.models.llama import KVCache, Llama, LlamaConfig, generate

__all__ = ["KVCache", "Llama", "LlamaConfig", "generate"]
