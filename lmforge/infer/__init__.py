"""Inference: sampling, batched generation with a KV cache, and the paged-KV continuous-batching engine
(the only generation code in lmforge)."""
from .beam import BeamHypothesis, beam_search
from .engine import LLMEngine
from .generate import generate, left_pad
from .request import RequestOutput, SamplingParams
from .sampling import apply_temperature, greedy, sample, top_k_filter, top_p_filter

__all__ = ["LLMEngine", "beam_search", "BeamHypothesis", "SamplingParams", "RequestOutput", "generate", "left_pad", "sample", "greedy",
           "apply_temperature", "top_k_filter", "top_p_filter"]
