"""Position encodings: rotary embeddings (RoPE, with HF's scaling variants) and ALiBi slopes.

RoPE follows Hugging Face Llama exactly: the head dimension is split into two halves that rotate
together (`rotate_half`), not interleaved pairs. Inverse frequencies are computed with the same float32
arithmetic as `transformers.modeling_rope_utils`, so logits match to ~1e-6.

Scaling variants (the `rope_scaling` dict, keyed by `rope_type`):
- `linear`:  frequencies divided by `factor` (position interpolation).
- `dynamic`: NTK-aware: the base grows with the current length once it passes `max_position_embeddings`.
- `yarn`:    per-frequency blend of interpolation/extrapolation plus an attention factor that scales
             cos and sin (so attention logits scale by its square).
- `llama3`:  Llama 3.1's piecewise scaling by wavelength.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig


def _base_inv_freq(base: float | torch.Tensor, dim: int) -> torch.Tensor:
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim
    return 1.0 / (base**exponent)


def _yarn(inv_dim: int, base: float, scaling: dict) -> tuple[torch.Tensor, float]:
    """YaRN frequencies and attention factor (arXiv 2309.00071), as transformers computes them."""
    factor = scaling["factor"]
    original = scaling["original_max_position_embeddings"]
    attention_factor = scaling.get("attention_factor")
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (inv_dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, inv_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(inv_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp

    pos_freqs = base ** (torch.arange(0, inv_dim, 2).to(torch.float) / inv_dim)
    inv_extrapolation = 1.0 / pos_freqs
    inv_interpolation = 1.0 / (factor * pos_freqs)
    inv_freq = inv_interpolation * (1 - extrapolation_weight) + inv_extrapolation * extrapolation_weight
    return inv_freq, float(attention_factor)


def _llama3(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths divided by factor, short kept, a smooth blend between."""
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_frequencies(config: ModelConfig, seq_len: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] and the cos/sin scale for this config.

    `seq_len` (a 0-dim tensor: max position + 1) only matters for `dynamic`, whose base depends on it.
    """
    dim = config.head_dim_resolved
    base = config.rope_theta
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "default":
        return _base_inv_freq(base, dim), 1.0
    if rope_type == "linear":
        return _base_inv_freq(base, dim) / scaling["factor"], 1.0
    if rope_type == "dynamic":
        factor = scaling["factor"]
        max_pos = config.max_position_embeddings
        if seq_len is None:
            return _base_inv_freq(base, dim), 1.0
        seq_len = torch.maximum(seq_len, torch.tensor(max_pos, dtype=seq_len.dtype, device=seq_len.device))
        grown = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(grown.float().cpu(), dim), 1.0
    if rope_type == "yarn":
        return _yarn(dim, base, scaling)
    if rope_type == "llama3":
        return _llama3(_base_inv_freq(base, dim), scaling), 1.0
    raise ValueError(f"unknown rope_type {rope_type!r}")


class RotaryEmbedding(nn.Module):
    """Computes the cos/sin tables once per forward; every layer reuses them."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.dynamic = (config.rope_scaling or {}).get("rope_type") == "dynamic"
        inv_freq, self.attention_factor = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # not a checkpoint key, as in HF

    def reset_parameters(self, device: torch.device | str | None = None) -> None:
        """Recompute the buffer (e.g. after building on the meta device, where buffers hold nothing)."""
        inv_freq, self.attention_factor = rope_frequencies(self.config)
        self.inv_freq = inv_freq.to(device if device is not None else self.inv_freq.device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, ±sin) tables [B|1, T, 1, head_dim] in `dtype`, ready for `apply_rope`."""
        inv_freq = self.inv_freq
        if self.dynamic:
            seq_len = position_ids.max() + 1
            inv_freq = rope_frequencies(self.config, seq_len)[0].to(position_ids.device)
        freqs = position_ids[..., None].float() * inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return rope_tables(cos.to(dtype), sin.to(dtype))


def rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, ±sin) shaped [B|1, T, 1, D] for `apply_rope`; computed once per forward for all layers."""
    half = sin.shape[-1] // 2
    signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return cos.unsqueeze(2), signed_sin.unsqueeze(2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, heads, head_dim] by position in HF's layout: x·cos + rotate_half(x)·sin.

    rotate_half(x1, x2) = (-x2, x1) is roll(x, D/2) with the first half negated; the sign lives in
    `signed_sin` (made once per forward by `rope_tables`), so each layer does one roll instead of
    slice/neg/cat, with bit-identical results.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi per-head slopes (Press et al. 2022; BLOOM's handling of non-power-of-two head counts)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != num_heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra_base ** (2 * i + 1) for i in range(num_heads - closest)]
    return torch.tensor(slopes, dtype=torch.float32)
