"""(IA)³ (Liu et al. 2022): learned vectors that rescale activations, initialised to ones.

On an attention projection the vector l [out, 1] scales the layer's output (bias included, as peft);
on a feed-forward layer (down_proj by default) l [1, in] scales its input — the FFN's hidden activations.
Both fold into the weight: W·diag(l) or diag(l)·W. Shapes and names (`ia3_l.<name>`) are peft's.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from .base import AdapterLayer, adapter_dtype
from .config import AdapterConfig


class IA3Linear(AdapterLayer):
    """A frozen linear layer (`base_layer`) plus named IA3 scaling vectors."""

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.ia3_l = nn.ParameterDict()
        self.feedforward: dict[str, bool] = {}

    def adapter_names(self) -> list[str]:
        return list(self.ia3_l.keys())

    def add_adapter(self, name: str, cfg: AdapterConfig, *, is_feedforward: bool = False, **kwargs) -> None:
        weight = self.base_layer.weight
        shape = (1, self.in_features) if is_feedforward else (self.out_features, 1)
        self.ia3_l[name] = nn.Parameter(torch.ones(shape, device=weight.device, dtype=adapter_dtype(weight)))
        self.feedforward[name] = is_feedforward

    def delete_adapter(self, name: str) -> None:
        if name in self.ia3_l:
            del self.ia3_l[name]
        self.feedforward.pop(name, None)

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        if name in self.ia3_l:
            yield self.ia3_l[name]

    def adapter_forward(self, x: torch.Tensor, name: str, base_out: torch.Tensor | None) -> torch.Tensor:
        scale = self.ia3_l[name].flatten()
        if self.feedforward[name]:
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype))
        if base_out is None:
            base_out = self.base_layer(x)
        return (base_out * scale).to(base_out.dtype)

    def merged_weights(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) of one linear layer equal to this layer with adapter `name` applied."""
        weight, bias = self.base_layer.weight, self.base_layer.bias
        scale = self.ia3_l[name].detach()  # [1, in] scales columns, [out, 1] scales rows
        merged = (weight.to(scale.dtype) * scale).to(weight.dtype)
        if bias is not None and not self.feedforward[name]:
            bias = (bias.to(scale.dtype) * scale.flatten()).to(bias.dtype)
        return merged, None if bias is None else bias.detach().clone()

    def unmerged_weights(self, name: str, weight: torch.Tensor,
                         bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Invert `merged_weights` by division (inexact in float, and undefined where l = 0)."""
        scale = self.ia3_l[name].detach()
        restored = (weight.to(scale.dtype) / scale).to(weight.dtype)
        if bias is not None and not self.feedforward[name]:
            bias = (bias.to(scale.dtype) / scale.flatten()).to(bias.dtype)
        return restored, bias
