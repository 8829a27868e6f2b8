"""Put adapters into a model: match target modules (peft's rules), wrap them in place, switch adapters.

The model stays the model (a `Transformer` keeps its class and forward); targeted linear layers are
replaced by `LoraLinear` / `IA3Linear` wrappers that keep the original as `base_layer`, and
`modules_to_save` by a `ModulesToSave` wrapper (peft's `original_module` + `modules_to_save.<name>`).
What adapters exist and which is active is recorded in `model.peft_state`.

Matching follows peft 0.21: a list of names matches a module whose full name equals a name or ends with
"." + name; a string is a regex that must match the full name; "all-linear" is every linear layer except
the output head. A name that matches something other than a linear layer is an error, as in peft.
"""
from __future__ import annotations

import copy
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from ..core.errors import ConfigError
from ..model.nf4 import Linear4bit
from .base import AdapterLayer
from .bottleneck import BottleneckLayer
from .config import ALL_LINEAR, AdapterConfig, check_adapter_name
from .ia3 import IA3Linear
from .lora import LoraLinear


@dataclass
class PeftState:
    """The adapters a model holds (name -> config), the active one, and the base's original trainability."""

    configs: dict[str, AdapterConfig] = field(default_factory=dict)
    active: str | None = None
    base_requires_grad: dict[str, bool] = field(default_factory=dict)


class ModulesToSave(AdapterLayer):
    """A module trained in full per adapter: `original_module` stays frozen, `modules_to_save.<name>` is a copy."""

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()

    @property
    def base_layer(self) -> nn.Module:  # type: ignore[override]
        return self.original_module

    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def add_adapter(self, name: str, cfg: AdapterConfig, **kwargs) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        if name in self.modules_to_save:
            yield from self.modules_to_save[name].parameters()

    def adapter_forward(self, x: torch.Tensor, name: str, base_out: torch.Tensor | None) -> torch.Tensor:
        return self.modules_to_save[name](x)


WEIGHT_LAYERS = (LoraLinear, IA3Linear)  # adapter layers whose adapter can be folded into the base weight
LAYER_KINDS = {"lora": LoraLinear, "dora": LoraLinear, "ia3": IA3Linear, "bottleneck": BottleneckLayer}


# ----- matching -------------------------------------------------------------------------------------------
def matches(module_name: str, names: list[str] | str) -> bool:
    """peft's target rule: list → exact or dotted-suffix match; str → regex full match."""
    if isinstance(names, str):
        return re.fullmatch(names, module_name) is not None
    return any(module_name == n or module_name.endswith("." + n) for n in names)


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _adapter_internals(model: nn.Module) -> list[str]:
    """Prefixes ("q_proj.") under which modules belong to an adapter layer and are never targets."""
    return [name + "." for name, module in model.named_modules() if isinstance(module, AdapterLayer)]


def _output_head(model: nn.Module) -> nn.Module | None:
    head = getattr(model, "lm_head", None)
    if head is None and hasattr(model, "get_output_embeddings"):
        head = model.get_output_embeddings()
    return head


def find_targets(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Full names of the linear layers `cfg` adapts (without changing the model). ConfigError if none."""
    targets = cfg.resolved_targets(_model_type(model))
    internal = _adapter_internals(model)
    head = _output_head(model)
    found = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in internal):
            continue
        if cfg.modules_to_save and matches(name, cfg.modules_to_save):
            continue  # peft never puts an adapter on a module it trains in full
        if cfg.exclude_modules and matches(name, cfg.exclude_modules):
            continue
        linear = isinstance(module, (nn.Linear, Linear4bit, *WEIGHT_LAYERS, BottleneckLayer))
        if targets == ALL_LINEAR:
            hit = linear and module is not head and not (isinstance(module, AdapterLayer) and module.base_layer is head)
        else:
            hit = matches(name, targets)
        if hit and not linear:
            raise ConfigError(f"adapter target {name!r} is a {type(module).__name__}; only linear layers can be "
                              "adapted (name the linear layers inside it)")
        if hit:
            found.append(name)
    if not found:
        raise ConfigError(f"adapter.target_modules={targets!r} matched no linear layer in the model")
    return found


def find_modules_to_save(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Full names of the modules `cfg.modules_to_save` names (outermost match only)."""
    if not cfg.modules_to_save:
        return []
    internal = _adapter_internals(model)
    found: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in internal) or any(name.startswith(f + ".") for f in found):
            continue
        if matches(name, cfg.modules_to_save):
            found.append(name)
    missing = [m for m in cfg.modules_to_save if not any(matches(f, [m]) for f in found)]
    if missing:
        raise ConfigError(f"adapter.modules_to_save {missing} name no module of the model")
    return found


def is_feedforward(module_name: str, cfg: AdapterConfig, model_type: str | None) -> bool:
    """IA3: does this target scale its input? (peft's rule: regex full match, or a plain suffix match)."""
    names = cfg.resolved_feedforward(model_type)
    if isinstance(names, str):
        return re.fullmatch(names, module_name) is not None
    return any(module_name.endswith(n) for n in names)


# ----- state ----------------------------------------------------------------------------------------------
def peft_state(model: nn.Module) -> PeftState:
    """The model's adapter record; ConfigError if it holds no adapters."""
    state = getattr(model, "peft_state", None)
    if state is None:
        raise ConfigError("the model holds no adapters (use apply_adapter or load_adapter first)")
    return state


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """(name, layer) for every adapter layer in the model."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at dotted path `name` inside `model`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _require_known(state: PeftState, name: str) -> None:
    if name not in state.configs:
        raise ConfigError(f"unknown adapter {name!r}; the model holds {sorted(state.configs)}")


def _merged(model: nn.Module) -> str | None:
    return next((layer.merged_adapter for _, layer in adapter_layers(model) if layer.merged_adapter), None)


def sync_trainable(model: nn.Module) -> None:
    """requires_grad = True exactly for the active adapter's parameters (the optimizer takes only those)."""
    active = peft_state(model).active
    for _, layer in adapter_layers(model):
        for name in layer.adapter_names():
            for param in layer.adapter_parameters(name):
                param.requires_grad_(name == active)


# ----- public API -----------------------------------------------------------------------------------------
def add_adapter(model: nn.Module, cfg: AdapterConfig, name: str = "default", *, activate: bool = False) -> nn.Module:
    """Add adapter `name` to `model` in place (freezing the base on first use); returns the model.

    The new adapter becomes active only with `activate=True` (as peft's add_adapter); `set_adapter` switches.
    """
    cfg.validate()
    check_adapter_name(name)
    state = getattr(model, "peft_state", None)
    if state is not None and name in state.configs:
        raise ConfigError(f"the model already holds an adapter named {name!r}")
    if _merged(model):
        raise ConfigError(f"adapter {_merged(model)!r} is merged into the base weights; unmerge it before adding one")
    kind = LAYER_KINDS.get(cfg.method, LoraLinear)
    clash = next((n for n, layer in adapter_layers(model) if isinstance(layer, tuple(LAYER_KINDS.values()))
                  and not isinstance(layer, kind)), None)
    if clash is not None:
        raise ConfigError(f"{clash} already holds {type(model.get_submodule(clash)).__name__} adapters; "
                          f"one model holds one kind of adapter (LoRA/DoRA, IA3 or bottleneck), not several")
    targets = find_targets(model, cfg)  # raises before anything changes
    quantised = [t for t in targets if isinstance(model.get_submodule(t), Linear4bit)]
    if quantised and cfg.method == "ia3":
        raise ConfigError(f"adapter.method=ia3 cannot wrap the 4-bit layer {quantised[0]} (IA3 folds into the "
                          "weight); use lora or dora on a quantised base (QLoRA)")
    saved = find_modules_to_save(model, cfg)

    if state is None:
        state = PeftState(base_requires_grad={n: p.requires_grad for n, p in model.named_parameters()})
        for param in model.parameters():
            param.requires_grad_(False)
        model.peft_state = state
    model_type = _model_type(model)
    for module_name in targets + saved:
        module = model.get_submodule(module_name)
        layer_kind = kind if module_name in targets else ModulesToSave
        layer = module if isinstance(module, layer_kind) else layer_kind(module)
        layer.add_adapter(name, cfg, is_feedforward=is_feedforward(module_name, cfg, model_type))
        layer.train(module.training)  # new modules (dropout!) start in train mode; follow the model's mode
        if layer is not module:
            layer.active_adapter = state.active
            replace_module(model, module_name, layer)
    state.configs[name] = cfg
    if activate:
        set_adapter(model, name)
    else:
        sync_trainable(model)
    return model


def apply_adapter(model: nn.Module, cfg: AdapterConfig, name: str = "default",
                  log: Callable[[str], None] | None = print) -> nn.Module:
    """Freeze the base, add adapter `name` and make it active; logs trainable vs total parameters."""
    add_adapter(model, cfg, name, activate=True)
    if log is not None:
        trainable, total = trainable_parameters(model)
        log(f"adapter {name!r} ({cfg.method}): trainable params {trainable:,} || all params {total:,} "
            f"|| trainable% {100 * trainable / total:.4f}")
    return model


def set_adapter(model: nn.Module, name: str) -> None:
    """Make adapter `name` the one every adapted layer applies (and the only trainable one)."""
    state = peft_state(model)
    _require_known(state, name)
    merged = _merged(model)
    if merged is not None and merged != name:
        raise ConfigError(f"adapter {merged!r} is merged into the base weights; "
                          f"unmerge it before switching to {name!r}")
    for _, layer in adapter_layers(model):
        layer.active_adapter = name
    state.active = name
    sync_trainable(model)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name`; layers left without adapters get their original module back, and when no
    adapter remains the base parameters get back the trainability they had before the first adapter."""
    state = peft_state(model)
    _require_known(state, name)
    if _merged(model) == name:
        raise ConfigError(f"adapter {name!r} is merged into the base weights; unmerge it before deleting it")
    for module_name, layer in list(adapter_layers(model)):
        layer.delete_adapter(name)
        if layer.active_adapter == name:
            layer.active_adapter = None
        if not layer.adapter_names():
            replace_module(model, module_name, layer.base_layer)
    del state.configs[name]
    if state.active == name:
        state.active = None
    if not state.configs:
        restore_base(model)


def restore_base(model: nn.Module) -> None:
    """Forget the adapter record and give base parameters back their original requires_grad."""
    state = peft_state(model)
    for param_name, param in model.named_parameters():
        param.requires_grad_(state.base_requires_grad.get(param_name, True))
    del model.peft_state


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the base model alone inside the block (e.g. a DPO reference model from the same weights)."""
    merged = _merged(model)
    if merged is not None:
        raise ConfigError(f"adapter {merged!r} is merged into the base weights; unmerge it to run the base alone")
    layers = [layer for _, layer in adapter_layers(model)]
    previous = [layer.adapters_disabled for layer in layers]
    for layer in layers:
        layer.adapters_disabled = True
    try:
        yield
    finally:
        for layer, was in zip(layers, previous):
            layer.adapters_disabled = was


@contextmanager
def adapter_rows(model: nn.Module, names: Sequence[str | None],
                 index: torch.Tensor | None = None) -> Iterator[None]:
    """Inside the block, each batch row (or token) uses its own adapter.

    Without `index`: names[i] is row i's adapter (None = base). With `index` (long, [B] or [B, T], -1 =
    base): names is the table the index points into — the form a serving engine with a flat token batch
    builds once per step.
    """
    state = peft_state(model)
    if index is None:
        table = sorted({n for n in names if n is not None})
        positions = {n: i for i, n in enumerate(table)}
        device = next(model.parameters()).device
        index = torch.tensor([-1 if n is None else positions[n] for n in names], dtype=torch.long, device=device)
    else:
        table = list(names)
    for adapter in table:
        _require_known(state, adapter)
    layers = [layer for _, layer in adapter_layers(model)]
    for layer in layers:
        layer.row_adapters = (table, index)
    try:
        yield
    finally:
        for layer in layers:
            layer.row_adapters = None


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, shared (tied) parameters counted once — peft's numbers."""
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total
