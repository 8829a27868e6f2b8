"""Inference: sampling and batched generation with a KV cache (the only generation code in lmforge)."""
from .generate import generate, left_pad
from .sampling import apply_temperature, greedy, sample, top_k_filter, top_p_filter

__all__ = ["generate", "left_pad", "sample", "greedy", "apply_temperature", "top_k_filter", "top_p_filter"]
