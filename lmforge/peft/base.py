"""`AdapterLayer`: what every adapter-holding layer shares (LoRA/DoRA, IA3, modules_to_save).

A layer wraps the frozen module it replaces (`base_layer`) and holds any number of named adapters in
ModuleDicts / ParameterDicts keyed by adapter name, so its state-dict keys are peft's
(`q_proj.base_layer.weight`, `q_proj.lora_A.<name>.weight`, ...). Which adapter runs is plain state on
the layer, set for the whole model by `inject.set_adapter` / `disable_adapters` / `adapter_rows`:

- `active_adapter`: the adapter applied to every row (None = base only);
- `adapters_disabled`: run the base alone (e.g. the reference model in DPO);
- `row_adapters`: (names, index) for a mixed batch — index [B] or [B, T] holds, per row or per token,
  a position in `names` or -1 for the base. A serving engine batches requests for different adapters
  this way; each adapter's rows are gathered, adapted and scattered back.
- `merged_adapter`: the adapter folded into `base_layer`'s weights (see merge.py); while merged the
  layer runs the base alone, and asking for anything else is an error rather than a silent wrong answer.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterator

import torch
from torch import nn

from .config import AdapterConfig


class AdapterLayer(nn.Module, ABC):
    """Base class: forward dispatch (single adapter, disabled, mixed rows, merged) over `adapter_forward`."""

    base_layer: nn.Module  # the wrapped module; a subclass registers it (peft's key names differ per kind)

    def __init__(self):
        super().__init__()
        self.active_adapter: str | None = None
        self.adapters_disabled = False
        self.row_adapters: tuple[list[str], torch.Tensor] | None = None
        self.merged_adapter: str | None = None
        self.original_weights: tuple[torch.Tensor, torch.Tensor | None] | None = None  # kept by merge.py

    # ----- what a subclass provides ------------------------------------------------------------------
    @abstractmethod
    def adapter_names(self) -> list[str]:
        """Names of the adapters this layer holds."""
        ...

    @abstractmethod
    def add_adapter(self, name: str, cfg: AdapterConfig, **kwargs) -> None:
        """Create adapter `name`'s parameters (initialised so the output starts equal to the base)."""
        ...

    @abstractmethod
    def delete_adapter(self, name: str) -> None:
        """Drop adapter `name`'s parameters."""
        ...

    @abstractmethod
    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        """Adapter `name`'s trainable parameters."""
        ...

    @abstractmethod
    def adapter_forward(self, x: torch.Tensor, name: str, base_out: torch.Tensor | None) -> torch.Tensor:
        """The layer's output with adapter `name` applied; `base_out` = base_layer(x) when already computed."""
        ...

    # ----- dispatch -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_adapters is not None:
            return self._mixed_forward(x, *self.row_adapters)
        name = None if self.adapters_disabled else self.active_adapter
        if self.merged_adapter is not None:
            if name != self.merged_adapter:
                raise RuntimeError(f"adapter {self.merged_adapter!r} is merged into the base weights; "
                                   f"call unmerge_adapter before running {'the base' if name is None else repr(name)}")
            return self.base_layer(x)
        if name is None or name not in self.adapter_names():
            return self.base_layer(x)
        return self.adapter_forward(x, name, None)

    def _mixed_forward(self, x: torch.Tensor, names: list[str], index: torch.Tensor) -> torch.Tensor:
        """Per-row (or per-token) adapters: the base runs once on the whole batch, each adapter on its rows."""
        if self.merged_adapter is not None:
            raise RuntimeError(f"adapter {self.merged_adapter!r} is merged into the base weights; "
                               "unmerge it before running a batch with per-row adapters")
        if tuple(index.shape) != tuple(x.shape[:index.dim()]):
            raise ValueError(f"per-row adapter index has shape {tuple(index.shape)}, "
                             f"expected a prefix of the input's {tuple(x.shape[:-1])}")
        base_out = self.base_layer(x)
        out = base_out.clone()
        mine = set(self.adapter_names())
        for position, name in enumerate(names):
            if name not in mine:
                continue  # this adapter does not touch this layer: its rows keep the base output
            rows = index == position
            if not bool(rows.any()):
                continue
            out[rows] = self.adapter_forward(x[rows], name, base_out[rows]).to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names()}, active={self.active_adapter!r}"


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapter weights are fp32 when the base is half precision (as peft's autocast_adapter_dtype): they
    are the trained master weights, and a bf16 B·A loses the small early updates."""
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
