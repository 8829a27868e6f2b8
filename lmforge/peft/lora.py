"""LoRA, rsLoRA and DoRA on a linear layer: y = base(x) + s·B(A(dropout(x))), DoRA rescaling each output.

- LoRA (Hu et al. 2021): a rank-r update ΔW = s·B·A with A [r, in], B [out, r]; B starts at zero so the
  adapted model starts equal to the base. s = alpha / r.
- rsLoRA (Kalajdzievski 2023): s = alpha / sqrt(r), so the update's size does not shrink as r grows.
- DoRA (Liu et al. 2024): W' = m · (W + ΔW) / ‖W + ΔW‖ with ‖·‖ the L2 norm of each output row and m a
  learned magnitude per output, initialised to ‖W‖. As in the paper (§4.3) and peft, the norm is treated
  as a constant in backward: it is detached, which saves memory and changes little.

Parameter layout and names are peft's (`lora_A.<name>` / `lora_B.<name>` nn.Linear, DoRA's
`lora_magnitude_vector.<name>.weight`), so peft checkpoints map onto them by a rename.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import nn

from ..model.layers import linear
from ..model.nf4 import Linear4bit
from .base import AdapterLayer, adapter_dtype
from .config import AdapterConfig


class DoraMagnitude(nn.Module):
    """DoRA's learned magnitude m [out] (a module with `weight` so the key is peft's `...<name>.weight`)."""

    def __init__(self, magnitude: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(magnitude)


class LoraLinear(AdapterLayer):
    """A frozen linear layer (`base_layer`) plus named LoRA / rsLoRA / DoRA adapters.

    The base is an nn.Linear or an NF4 `Linear4bit` (QLoRA): it is only ever called as `base_layer(x)`,
    and where the math needs its weight (DoRA's norm, merging) `base_weight()` gives it, dequantised."""

    def __init__(self, base_layer: nn.Linear | Linear4bit):
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.scaling: dict[str, float] = {}

    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def base_weight(self) -> torch.Tensor:
        """The base weight [out, in]: the parameter itself, or a dequantised copy of a 4-bit store."""
        base = self.base_layer
        return base.dequantize() if isinstance(base, Linear4bit) else base.weight

    def add_adapter(self, name: str, cfg: AdapterConfig, **kwargs) -> None:
        weight = self.base_weight()
        factory = dict(device=weight.device, dtype=adapter_dtype(weight))
        self.lora_A[name] = nn.Linear(self.in_features, cfg.r, bias=False, **factory)
        self.lora_B[name] = nn.Linear(cfg.r, self.out_features, bias=False, **factory)
        self.lora_dropout[name] = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.scaling[name] = cfg.scaling
        with torch.no_grad():
            if cfg.init == "gaussian":
                nn.init.normal_(self.lora_A[name].weight, std=1.0 / cfg.r)
            else:  # nn.Linear's own init, which the LoRA paper's code and peft keep for A
                nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[name].weight)
        if cfg.method == "dora":
            with torch.no_grad():
                magnitude = self.weight_norm(name)  # = ‖W‖ per output row while B is zero
            self.lora_magnitude_vector[name] = DoraMagnitude(magnitude)

    def delete_adapter(self, name: str) -> None:
        for table in (self.lora_A, self.lora_B, self.lora_dropout, self.lora_magnitude_vector):
            if name in table:
                del table[name]
        self.scaling.pop(name, None)

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        for table in (self.lora_A, self.lora_B, self.lora_magnitude_vector):
            if name in table:
                yield from table[name].parameters()

    def is_dora(self, name: str) -> bool:
        return name in self.lora_magnitude_vector

    # ----- math -----------------------------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """s·B·A [out, in] in the adapter's dtype."""
        return self.scaling[name] * (self.lora_B[name].weight @ self.lora_A[name].weight)

    def weight_norm(self, name: str) -> torch.Tensor:
        """‖W + s·B·A‖ per output row [out], detached (DoRA's constant denominator)."""
        with torch.no_grad():
            delta = self.delta_weight(name)
            return torch.linalg.norm(self.base_weight().to(delta.dtype) + delta, dim=1)

    def adapter_forward(self, x: torch.Tensor, name: str, base_out: torch.Tensor | None) -> torch.Tensor:
        if base_out is None:
            base_out = self.base_layer(x)
        lora_A, lora_B, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        if self.is_dora(name):
            return base_out + self._dora_extra(x.to(lora_A.weight.dtype), name, base_out).to(base_out.dtype)
        if not torch.is_autocast_enabled(x.device.type):
            # Under autocast the matmul picks the dtype; casting a bf16 input (RMSNorm emits bf16 there) up
            # to the fp32 adapter dtype would only copy x, and autocast would copy it back down.
            x = x.to(lora_A.weight.dtype)
        # x·Aᵀ through `linear` (oneDNN for fp32 CPU: ~2x MKL on this skinny product); dropout(p=0) is Identity.
        h = linear(dropout(x), lora_A.weight)
        if h.dtype != base_out.dtype:  # e.g. fp32 adapter on a bf16 base: compute in fp32, then cast (as peft)
            return base_out + (lora_B(h) * self.scaling[name]).to(base_out.dtype)
        # base + s·h·Bᵀ in one addmm: no [tokens, out] temporaries for the scaling and the sum, in forward
        # or backward (the scale lands on the small [tokens, r] side).
        out = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), h.reshape(-1, h.shape[-1]), lora_B.weight.t(),
                          alpha=self.scaling[name])
        return out.view(base_out.shape)

    def _dora_extra(self, x: torch.Tensor, name: str, base_out: torch.Tensor) -> torch.Tensor:
        """What DoRA adds to base(x): (m/‖W+ΔW‖ − 1)·W·x + (m/‖W+ΔW‖)·s·B·A·x.

        The bias is not rescaled (as peft), so merging leaves the bias alone too."""
        dropout = self.lora_dropout[name]
        magnitude = self.lora_magnitude_vector[name].weight
        scale = magnitude / self.weight_norm(name)
        bias = self.base_layer.bias
        if self.training and not isinstance(dropout, nn.Identity):
            # W·x must see the same dropped-out input as the LoRA branch, so it cannot reuse base_out.
            x = dropout(x)
            weight = self.base_weight().to(x.dtype)
            base_no_bias = linear(x, weight)
        else:
            base_no_bias = base_out.to(x.dtype) if bias is None else (base_out - bias).to(x.dtype)
        lora_out = self.lora_B[name](self.lora_A[name](x)) * self.scaling[name]
        return (scale - 1) * base_no_bias + scale * lora_out

    def merged_weights(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) of one linear layer equal to this layer with adapter `name` applied (eval mode)."""
        weight = self.base_weight()
        delta = self.delta_weight(name).detach()
        merged = weight.to(delta.dtype) + delta
        if self.is_dora(name):
            merged = (self.lora_magnitude_vector[name].weight.detach() / self.weight_norm(name))[:, None] * merged
        bias = self.base_layer.bias
        return merged.to(weight.dtype), None if bias is None else bias.detach().clone()

    def unmerged_weights(self, name: str, weight: torch.Tensor,
                         bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Invert `merged_weights` arithmetically (exact up to float rounding). DoRA needs the norm taken
        before merging, which merge.py records as `dora_norm`."""
        delta = self.delta_weight(name).detach()
        current = weight.to(delta.dtype)
        if self.is_dora(name):
            current = current / (self.lora_magnitude_vector[name].weight.detach() / self.dora_norm[name])[:, None]
        return (current - delta).to(weight.dtype), bias

    @property
    def dora_norm(self) -> dict[str, torch.Tensor]:
        """Per-adapter ‖W + ΔW‖ captured at merge time (plain dict: not part of the state dict)."""
        if "_dora_norm" not in self.__dict__:
            self.__dict__["_dora_norm"] = {}
        return self.__dict__["_dora_norm"]
