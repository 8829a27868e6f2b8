"""A `torch.compile`d one-token decode step for `generate(..., compile=True)`.

Batch-1 decode is a chain of GEMVs (oneDNN, packed weights) separated by ~150 small ops per token — norms,
RoPE, residual adds, cache writes, attention over a few hundred keys — each a Python call and a kernel
launch. Inductor fuses those small ops into a few C++ loops and, with `freezing`, turns the weights into
constants: bf16 keeps the packed oneDNN GEMVs, fp32 gets inductor's own C++ GEMM template, which streams
the weights faster (see `_FP32_CPU_CONFIG`); `cpp_wrapper` runs the graph without Python in between.

Compilation wants static shapes, so the step attends over the cache's whole preallocated capacity with
a mask (slots at or before the new token's, minus padding) and writes its key/value at a slot held in a
tensor (`index_copy_`): one graph serves every step of a generation and every later call with the same
batch size and capacity (capacities are rounded up to CAPACITY_MULTIPLE to share graphs). The graph
freezes the weights as constants, so it is keyed by the weights' identity and version: a training step,
a LoRA merge or a dtype change compiles afresh. The first call of a shape compiles (10-20 s for a 12-layer
model on this CPU); see docs/benchmarks.md for what it buys. Where tracing or compiling fails (an
adapter-wrapped model can hit an inductor pattern bug), a RuntimeWarning says so and the step runs eagerly
with the same static-shape cache: the output stays the eager one.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch._inductor.config as inductor_config
from torch._dynamo.exc import TorchDynamoException

from ..core.errors import ConfigError
from ..model.attention import sdpa

CAPACITY_MULTIPLE = 256
# Read from inductor's global config when a graph compiles (torch.compile's `options=` does not reach the
# freezing pass), so they are patched in around each call of the compiled step.
_INDUCTOR_CONFIG = {"freezing": True, "cpp_wrapper": True}
# fp32 on CPU: inductor's own C++ GEMM template (max-autotune, CPP backend) for every linear instead of
# oneDNN. Its GEMV streams the weights closer to the memory bandwidth: 134M Llama, batch 1, 79 -> 96-145
# tok/s (the upper readings when this VM's memory is in its fast phase), same tokens, at ~2x the compile
# time. Not for bf16: there the template decoded at 75-110 tok/s against oneDNN's packed GEMV's ~150-188.
_FP32_CPU_CONFIG = {**_INDUCTOR_CONFIG, "max_autotune": True, "max_autotune_gemm_backends": "CPP"}


def inductor_options(weight: torch.Tensor) -> dict:
    """The inductor settings for a model whose weights look like `weight`."""
    if weight.device.type == "cpu" and weight.dtype == torch.float32:
        return _FP32_CPU_CONFIG
    return _INDUCTOR_CONFIG


def compiled_capacity(capacity: int) -> int:
    return -(-capacity // CAPACITY_MULTIPLE) * CAPACITY_MULTIPLE


def check_compilable(model: torch.nn.Module) -> None:
    """Refuse what the static step does not model: ALiBi biases, sliding windows, prompt-learning slots."""
    config = model.config
    if config.position_embedding != "rope":
        raise ConfigError("compile=True supports RoPE models only (ALiBi biases are built per length)")
    if config.sliding_window is not None:
        raise ConfigError("compile=True does not support sliding-window attention")
    if getattr(model, "num_virtual_tokens", 0):
        raise ConfigError("compile=True does not support prompt-learning adapters (prefix / prompt tuning)")


class StaticStepCache:
    """The KV cache's tensors as one compiled step sees them (the `attend` hook of kv_cache.py): store
    this token's k, v at `slot`, attend over every slot under `mask` [B, 1, 1, capacity]."""

    length = 0  # the model reads it only for masks and default positions, which this step supplies

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], slot: torch.Tensor, mask: torch.Tensor):
        self.keys, self.values, self.slot, self.mask = keys, values, slot, mask

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.index_copy_(2, self.slot, k)
        values.index_copy_(2, self.slot, v)
        return sdpa(q, keys, values, self.mask)

    def advance(self, num_tokens: int) -> None:
        pass  # the caller's KVCache advances, outside the graph


class _Step(torch.nn.Module):
    """One decode step as a module, so that dynamo sees the model's tensors (packed weights included) as
    module state, which `freezing` turns into constants."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor, mask: torch.Tensor,
                keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
        cache = StaticStepCache(keys, values, slot, mask)
        hidden = self.model.hidden_states(tokens, position_ids=positions, kv_cache=cache)
        return self.model.lm_head(hidden[:, -1])


def _weights_key(model: torch.nn.Module) -> tuple:
    return tuple((p.data_ptr(), p._version, p.dtype) for p in model.parameters())


def decode_step(model: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """The model's compiled step `(tokens [B, 1], positions [B, 1], slot [1], mask, keys, values) -> logits
    [B, V]`, cached on the model for as long as its weights stay the same."""
    key = _weights_key(model)
    cached = getattr(model, "_compiled_decode", None)
    if cached is not None and cached[0] == key:
        return cached[1]

    eager = _Step(model)
    graph = torch.compile(eager, fullgraph=True, dynamic=False)
    options = inductor_options(model.lm_head.weight)
    failed: list[str] = []

    def compiled(*args: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        if failed:
            return eager(*args)
        try:
            with inductor_config.patch(options):
                return graph(*args)
        except TorchDynamoException as e:  # tracing or compiling failed (before the graph ran): stay correct
            lines = [line.strip() for line in str(e).splitlines() if line.strip()][:2]
            failed.append(f"{type(e).__name__}: {' '.join(lines)}")
            warnings.warn(f"compile=True: torch.compile could not compile this model's decode step "
                          f"({failed[0][:200]}); decoding eagerly", RuntimeWarning, stacklevel=2)
            return eager(*args)

    model._compiled_decode = (key, compiled)
    return compiled
