"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021): a small residual MLP on a sub-layer's output.

    h = o(x);  h' = h + W_up · act(W_down · h + b_down) + b_up

W_down [m, d] projects the d-dim output to a bottleneck of m = d / reduction_factor (or `bottleneck_size`)
units; W_up starts at zero, so the adapted model starts equal to the base. Placement:
- `pfeiffer`: after each layer's MLP output (`down_proj`) only — the cheaper variant, about as good;
- `houlsby`: after the attention output (`o_proj`) and after the MLP output.
Both hook the *output projection* module of the sub-layer, before the residual add, which is where the
papers put the adapter; the model code does not change. A wrapper per targeted module (`BottleneckLayer`)
holds named adapters like every other AdapterLayer, so apply / switch / per-row / save / load work as for
LoRA. The nonlinearity makes merging into a weight impossible; merge refuses with a ConfigError.

peft has no bottleneck adapter type, so the directory is lmforge's own: `adapter_config.json` with
`"peft_type": "BOTTLENECK"` (read by `lmforge.peft.load_adapter`, not by peft) + `adapter_model.safetensors`
with keys `base_model.model.<module>.adapter_down.weight` / `.bias`, `.adapter_up.weight` / `.bias`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import CheckpointError, ConfigError
from .base import AdapterLayer, adapter_dtype
from .config import AdapterConfig

PEFT_TYPE = "BOTTLENECK"
NONLINEARITIES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


def bottleneck_size(cfg: AdapterConfig, hidden: int) -> int:
    """Units in the bottleneck: `bottleneck_size` if set, else hidden / reduction_factor (at least 1)."""
    return cfg.bottleneck_size if cfg.bottleneck_size > 0 else max(1, round(hidden / cfg.reduction_factor))


class BottleneckLayer(AdapterLayer):
    """A frozen module (`base_layer`, a sub-layer's output projection) plus named bottleneck adapters."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.out_features = base_layer.out_features
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.nonlinearity: dict[str, str] = {}

    def adapter_names(self) -> list[str]:
        return list(self.adapter_down.keys())

    def add_adapter(self, name: str, cfg: AdapterConfig, **kwargs) -> None:
        ref = next(self.base_layer.parameters(), None)
        if ref is None:  # a 4-bit base holds only buffers
            ref = next(self.base_layer.buffers())
        dtype = adapter_dtype(ref) if ref.is_floating_point() else torch.float32
        size = bottleneck_size(cfg, self.out_features)
        factory = dict(device=ref.device, dtype=dtype)
        self.adapter_down[name] = nn.Linear(self.out_features, size, bias=True, **factory)
        self.adapter_up[name] = nn.Linear(size, self.out_features, bias=True, **factory)
        with torch.no_grad():  # down: nn.Linear's own init; up: zero, so the adapter starts as the identity
            nn.init.kaiming_uniform_(self.adapter_down[name].weight, a=math.sqrt(5))
            nn.init.zeros_(self.adapter_down[name].bias)
            nn.init.zeros_(self.adapter_up[name].weight)
            nn.init.zeros_(self.adapter_up[name].bias)
        self.nonlinearity[name] = cfg.nonlinearity

    def delete_adapter(self, name: str) -> None:
        for table in (self.adapter_down, self.adapter_up):
            if name in table:
                del table[name]
        self.nonlinearity.pop(name, None)

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        for table in (self.adapter_down, self.adapter_up):
            if name in table:
                yield from table[name].parameters()

    def adapter_forward(self, x: torch.Tensor, name: str, base_out: torch.Tensor | None) -> torch.Tensor:
        if base_out is None:
            base_out = self.base_layer(x)
        down, up = self.adapter_down[name], self.adapter_up[name]
        act = NONLINEARITIES[self.nonlinearity[name]]
        return base_out + up(act(down(base_out.to(down.weight.dtype)))).to(base_out.dtype)


def to_config_json(cfg: AdapterConfig, layers: list[tuple[str, BottleneckLayer]], name: str,
                   base_model_name_or_path: str | None) -> dict:
    """adapter_config.json for a bottleneck adapter (lmforge's own peft_type)."""
    sizes = {layer.adapter_down[name].out_features for _, layer in layers}
    if len(sizes) != 1:
        raise ConfigError(f"bottleneck adapter {name!r} has different sizes per layer {sorted(sizes)}; "
                          "one size per adapter is what adapter_config.json records")
    return dict(sorted({
        "peft_type": PEFT_TYPE, "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True, "target_modules": sorted(n for n, _ in layers), "bottleneck_size": sizes.pop(),
        "reduction_factor": cfg.reduction_factor, "placement": cfg.placement, "nonlinearity": cfg.nonlinearity,
        "modules_to_save": list(cfg.modules_to_save) or None,
        "note": "lmforge bottleneck adapter (Houlsby/Pfeiffer); peft has no such type: load it with "
                "lmforge.peft.load_adapter",
    }.items()))


def from_config_json(raw: dict, path: Path) -> AdapterConfig:
    """The AdapterConfig of a BOTTLENECK adapter_config.json; CheckpointError naming the key at fault."""
    known = {"peft_type", "task_type", "base_model_name_or_path", "inference_mode", "target_modules",
             "bottleneck_size", "reduction_factor", "placement", "nonlinearity", "modules_to_save", "note",
             "revision", "peft_version"}
    stray = sorted(set(raw) - known)
    if stray:
        raise CheckpointError(f"{path}: unknown key {stray[0]!r} in a {PEFT_TYPE} adapter config")
    try:
        cfg = AdapterConfig(method="bottleneck", target_modules=raw.get("target_modules") or [],
                            bottleneck_size=int(raw.get("bottleneck_size", 0)),
                            reduction_factor=float(raw.get("reduction_factor", 16)),
                            placement=raw.get("placement", "pfeiffer"), nonlinearity=raw.get("nonlinearity", "relu"),
                            modules_to_save=raw.get("modules_to_save") or [])
        cfg.validate()
    except (ConfigError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    return cfg
