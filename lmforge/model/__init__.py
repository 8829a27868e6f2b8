"""The model: config (<-> HF config.json), layers, transformer, KV cache, HF checkpoint I/O."""
from .config import (PRESETS, ModelConfig, llama_33m, llama_125m, llama_tiny, mistral_tiny, mixtral_tiny, preset,
                     qwen2_0_5b)
from .kv_cache import KVCache
from .transformer import Transformer

__all__ = [
    "ModelConfig", "Transformer", "KVCache", "PRESETS", "preset",
    "llama_tiny", "llama_33m", "llama_125m", "qwen2_0_5b", "mistral_tiny", "mixtral_tiny",
]
