"""Multi-LoRA serving: adapters loaded into the engine's one model, chosen per request, batched together.

Every adapter is loaded into the same model (`peft.load_adapter(..., activate=False)`: the targeted
linear layers become `LoraLinear` wrappers holding all adapters by name). In a step whose batch has
requests for adapters, the flat token row gets an index tensor — per token, the position of its
sequence's adapter in the step's table, or -1 for the base model — and `peft.adapter_rows` makes each
adapted layer run the base once on every token and each adapter on its own tokens only. So base
requests and requests for several adapters share ONE model call; a step without adapter requests runs
the model exactly as without adapters (no index is built).

Prefix cache. The same prompt under two adapters gives different keys/values, so each loaded adapter
has a cache salt that starts its sequences' block-hash chains: blocks are shared only between requests
for the same adapter (or between base requests, salt b""). The salt includes a load counter, so an
adapter removed and loaded again under the same name (maybe with new weights) never hits the old blocks.

Names come from callers (HTTP requests): they are only ever looked up here, never turned into paths.
"""
from __future__ import annotations

import itertools
from contextlib import nullcontext
from pathlib import Path
from typing import ContextManager

import torch
from torch import nn

from ..core.errors import ConfigError
from ..peft import adapter_rows, delete_adapter, load_adapter


class LoraRegistry:
    """The adapters an engine serves: name → prefix-cache salt, kept in step with the model's adapters."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._salts: dict[str, bytes] = {}
        self._loads = itertools.count()

    def __bool__(self) -> bool:
        return bool(self._salts)

    def names(self) -> list[str]:
        return sorted(self._salts)

    def add(self, name: str, adapter_dir: str | Path) -> None:
        """Load the PEFT-layout adapter at `adapter_dir` as `name` (CheckpointError for a bad directory)."""
        if name in self._salts:
            raise ConfigError(f"a LoRA adapter named {name!r} is already loaded; remove_lora it first")
        if getattr(self.model, "peft_state", None) is not None and name in self.model.peft_state.configs:
            raise ConfigError(f"the model already holds an adapter named {name!r}")
        load_adapter(self.model, adapter_dir, name, activate=False)
        self._salts[name] = f"lora:{name}:{next(self._loads)}".encode()

    def remove(self, name: str) -> None:
        self.check(name)
        delete_adapter(self.model, name)
        del self._salts[name]

    def check(self, name: str) -> None:
        """ConfigError naming the loaded adapters when `name` is not one of them."""
        if name not in self._salts:
            raise ConfigError(f"unknown LoRA adapter {name!r}; loaded: {self.names()}")

    def salt(self, name: str | None) -> bytes:
        """The prefix-cache salt of requests for `name` (b"" for the base model)."""
        if name is None:
            return b""
        self.check(name)
        return self._salts[name]

    def rows(self, names: list[str | None], counts: list[int], device: torch.device,
             batched: bool = True) -> ContextManager:
        """A context in which the model gives `counts[i]` consecutive tokens of the flat batch the adapter
        `names[i]` (None = base); a no-op when nobody asks for an adapter and none is active.
        batched: the input is [1, N, ...] (the model call) rather than [N, ...] (the output head on rows)."""
        table = sorted({n for n in names if n is not None})
        state = getattr(self.model, "peft_state", None)
        if not table and (state is None or state.active is None):
            return nullcontext()
        position = {n: i for i, n in enumerate(table)}
        codes = torch.tensor([-1 if n is None else position[n] for n in names], dtype=torch.long)
        index = torch.repeat_interleave(codes, torch.tensor(counts, dtype=torch.long))
        index = index.to(device)
        return adapter_rows(self.model, table, index[None, :] if batched else index)
