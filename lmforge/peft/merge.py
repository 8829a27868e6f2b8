"""Fold an adapter into the base weights (fast inference, export) and take it out again.

- `merge_adapter(model, name)`: each adapted layer's base weight becomes the single weight that gives the
  adapted output (LoRA: W + s·B·A; DoRA: m/‖W+ΔW‖ · (W+ΔW); IA3: W·diag(l) or diag(l)·W). The layer
  then runs one matmul. With `keep_original=True` (default) the original weight tensors are kept aside
  (the merged weight is a new tensor, so this costs one weight-sized tensor per merged layer while
  merged) and `unmerge_adapter` puts them back: bit-identical. With `keep_original=False` the originals
  are freed and unmerge inverts the arithmetic (W' − ΔW, or a division for DoRA/IA3): equal up to float
  rounding (~1e-7 relative), not bit-identical — the choice for a large model on a small machine.
- `merge_and_unload(model)`: merge the active adapter and remove every wrapper: a plain model (a
  `Transformer` stays a `Transformer`), ready for `save_pretrained`. `unload` removes without merging.

QLoRA: a LoRA layer whose base is a 4-bit `Linear4bit` is merged into the *dequantised* base: the layer's
base becomes a full-precision `Linear` holding dequant(W) + ΔW (re-quantising would round the update away),
and `merge_and_unload` dequantises every other 4-bit layer too, so the result is a plain full-precision
model. Unmerging such a layer restores the dequantised weight, not the 4-bit store. Bottleneck adapters
have a nonlinearity between their two projections and cannot be merged (ConfigError).

One adapter is merged at a time: merging a second on top would make the first impossible to remove
exactly, and DoRA's norm is defined on the unmerged weight.
"""
from __future__ import annotations

from collections import Counter

from torch import nn

from ..core.errors import ConfigError
from ..model.nf4 import Linear4bit, dequantize_model
from .inject import (WEIGHT_LAYERS, ModulesToSave, adapter_layers, peft_state, replace_module, restore_base,
                     set_adapter)
from .lora import LoraLinear


def _check_not_tied(model: nn.Module, layer_name: str, layer: nn.Module) -> None:
    """A weight shared with another module (tied lm_head/embeddings) would change both when merged."""
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    if uses[id(layer.base_layer.weight)] > 1:
        raise ConfigError(f"{layer_name}'s weight is shared with another module (tied embeddings); merging "
                          "would change both. Untie it or do not target it")


def _fold(model: nn.Module, layer_name: str, layer, name: str, keep_original: bool) -> None:
    """Write adapter `name`'s merged weights into `layer.base_layer` (a 4-bit base becomes its dequantised Linear)."""
    if isinstance(layer.base_layer, Linear4bit):
        layer.base_layer = layer.base_layer.to_linear()
    _check_not_tied(model, layer_name, layer)
    weight, bias = layer.base_layer.weight, layer.base_layer.bias
    if isinstance(layer, LoraLinear) and layer.is_dora(name) and not keep_original:
        layer.dora_norm[name] = layer.weight_norm(name)  # the arithmetic unmerge needs the pre-merge norm
    new_weight, new_bias = layer.merged_weights(name)
    if keep_original:
        layer.original_weights = (weight.data, None if bias is None else bias.data)
    weight.data = new_weight
    if bias is not None and new_bias is not None:
        bias.data = new_bias


def merge_adapter(model: nn.Module, name: str | None = None, *, keep_original: bool = True) -> None:
    """Fold adapter `name` (default: the active one) into the base weights; it becomes the active adapter."""
    state = peft_state(model)
    name = name or state.active
    if name is None:
        raise ConfigError("no adapter is active; name the adapter to merge")
    if name in state.configs and state.configs[name].method == "bottleneck":
        raise ConfigError(f"adapter {name!r} is a bottleneck adapter: its nonlinearity cannot be folded into a "
                          "weight, so it cannot be merged; keep it as an adapter (load_adapter)")
    merged = {layer.merged_adapter for _, layer in adapter_layers(model)} - {None}
    if merged == {name}:
        return
    if merged:
        raise ConfigError(f"adapter {merged.pop()!r} is already merged; unmerge it before merging {name!r}")
    set_adapter(model, name)
    for layer_name, layer in adapter_layers(model):
        if isinstance(layer, WEIGHT_LAYERS) and name in layer.adapter_names():
            _fold(model, layer_name, layer, name, keep_original)
            layer.merged_adapter = name


def unmerge_adapter(model: nn.Module, name: str | None = None) -> None:
    """Take the merged adapter out of the base weights (exactly, if it was merged with keep_original)."""
    for _, layer in adapter_layers(model):
        merged = layer.merged_adapter
        if merged is None:
            continue
        if name is not None and merged != name:
            raise ConfigError(f"adapter {name!r} is not merged (adapter {merged!r} is)")
        weight, bias = layer.base_layer.weight, layer.base_layer.bias
        if layer.original_weights is not None:
            weight.data, original_bias = layer.original_weights
            if bias is not None:
                bias.data = original_bias
        else:
            new_weight, new_bias = layer.unmerged_weights(merged, weight.data, None if bias is None else bias.data)
            weight.data = new_weight
            if bias is not None:
                bias.data = new_bias
            if isinstance(layer, LoraLinear):
                layer.dora_norm.pop(merged, None)
        layer.original_weights = None
        layer.merged_adapter = None


def _unwrap(model: nn.Module, merge: bool) -> nn.Module:
    state = peft_state(model)
    active = state.active
    if merge and active is not None:
        merge_adapter(model, active, keep_original=False)
    elif not merge:
        unmerge_adapter(model)
    for layer_name, layer in list(adapter_layers(model)):
        if isinstance(layer, ModulesToSave) and merge and active in layer.adapter_names():
            replace_module(model, layer_name, layer.modules_to_save[active])
        else:
            replace_module(model, layer_name, layer.base_layer)
    restore_base(model)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """The active adapter folded in and every adapter wrapper removed: a plain model for save_pretrained
    (4-bit layers, adapted or not, come back dequantised)."""
    return dequantize_model(_unwrap(model, merge=True))


def unload(model: nn.Module) -> nn.Module:
    """Every adapter removed, the base weights as they were: the plain base model."""
    return _unwrap(model, merge=False)
