"""PEFT-layout adapter directories: `adapter_config.json` + `adapter_model.safetensors`, as peft writes them.

File keys are the model's keys with peft's `base_model.model.` prefix and without the adapter name
(`...q_proj.lora_A.weight`, DoRA `...q_proj.lora_magnitude_vector`, IA3 `...k_proj.ia3_l`,
modules_to_save `...lm_head.weight`), so `peft.PeftModel.from_pretrained(transformers_model, dir)` loads
what we write and `load_adapter` loads what peft writes. Weights are read only with safetensors: a
pickle-format `adapter_model.bin` is refused, never unpickled.

Loading refuses (CheckpointError naming the file and key) any peft setting that would change the
adapter's math in a way lmforge does not implement, instead of loading it and computing something else.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from ..core.errors import CheckpointError, ConfigError
from ..core.io import atomic_write_bytes, atomic_write_json
from . import bottleneck
from .bottleneck import BottleneckLayer
from .config import ALL_LINEAR, AdapterConfig
from .ia3 import IA3Linear
from .inject import (WEIGHT_LAYERS, ModulesToSave, adapter_layers, add_adapter, delete_adapter, peft_state,
                     set_adapter)
from .lora import LoraLinear

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."  # PeftModel → LoraModel/IA3Model → the transformers model

# adapter_config.json keys lmforge reads, or that carry no meaning for the loaded weights' math.
_UNDERSTOOD = {
    "peft_type", "task_type", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "auto_mapping", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "modules_to_save",
    "use_rslora", "use_dora", "bias", "init_lora_weights", "layers_pattern", "loftq_config", "eva_config",
    "megatron_config", "megatron_core", "qalora_group_size", "ensure_weight_tying", "feedforward_modules",
    "init_ia3_weights", "fan_in_fan_out", "lora_bias", "rank_pattern", "alpha_pattern", "layers_to_transform",
}
# Inits that rewrite the base weights (the adapter is only right on top of the rewritten base).
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "mica", "lora_ga", "orthogonal")


# ----- config conversion ----------------------------------------------------------------------------------
def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _names(value: list[str] | str) -> list[str] | str:
    return sorted(set(value)) if isinstance(value, list) else value


def to_peft_config(model: nn.Module, name: str, base_model_name_or_path: str | None = None) -> dict:
    """adapter_config.json for adapter `name`: the fields peft 0.21 writes that define the adapter."""
    cfg = peft_state(model).configs[name]
    if cfg.method == "bottleneck":  # lmforge's own type: peft has no bottleneck adapters
        held = [(n, layer) for n, layer in adapter_layers(model)
                if isinstance(layer, BottleneckLayer) and name in layer.adapter_names()]
        return bottleneck.to_config_json(cfg, held, name, base_model_name_or_path)
    layers = [(n, layer) for n, layer in adapter_layers(model)
              if isinstance(layer, WEIGHT_LAYERS) and name in layer.adapter_names()]
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    resolved = sorted(n for n, _ in layers)  # full names, as peft writes what "all-linear" resolved to
    targets = resolved if cfg.target_modules == ALL_LINEAR else _names(cfg.resolved_targets(model_type))
    common = {
        "base_model_name_or_path": base_model_name_or_path, "revision": None, "task_type": "CAUSAL_LM",
        "inference_mode": True, "target_modules": targets, "fan_in_fan_out": False,
        "exclude_modules": _names(cfg.exclude_modules) or None,
        "modules_to_save": list(cfg.modules_to_save) or None,
    }
    if cfg.method == "ia3":
        feedforward = sorted(n for n, layer in layers if layer.feedforward[name])
        declared = cfg.resolved_feedforward(model_type)
        if isinstance(targets, list) and isinstance(declared, list) and set(declared) <= set(targets):
            feedforward = sorted(set(declared))  # as the user wrote them (peft requires a subset of the targets)
        else:
            common["target_modules"] = resolved  # full names keep peft's subset rule true
        out = {**common, "peft_type": "IA3", "feedforward_modules": feedforward, "init_ia3_weights": True}
    else:
        out = {**common, "peft_type": "LORA", "r": cfg.r, "lora_alpha": _number(cfg.alpha),
               "lora_dropout": cfg.dropout, "use_rslora": cfg.use_rslora, "use_dora": cfg.method == "dora",
               "bias": "none", "init_lora_weights": True if cfg.init == "default" else cfg.init,
               "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}}
    return dict(sorted(out.items()))


def _refuse(path: Path, key: str, value, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: {key}={value!r} is not supported by lmforge ({why})")


def from_peft_config(raw: dict, path: Path) -> AdapterConfig:
    """An AdapterConfig from a peft adapter_config.json mapping; CheckpointError naming the key at fault."""
    peft_type = raw.get("peft_type")
    if peft_type == bottleneck.PEFT_TYPE:
        return bottleneck.from_config_json(raw, path)
    if peft_type not in ("LORA", "IA3"):
        raise _refuse(path, "peft_type", peft_type, "lmforge loads LORA and IA3 adapters")
    if raw.get("task_type") not in (None, "CAUSAL_LM"):
        raise _refuse(path, "task_type", raw.get("task_type"), "lmforge models are causal LMs")
    for key, value in raw.items():
        if key not in _UNDERSTOOD and value not in (None, False, {}, [], ""):
            raise _refuse(path, key, value, "a peft feature that changes the adapter's computation")
    for key, default in (("fan_in_fan_out", False), ("lora_bias", False), ("rank_pattern", {}),
                         ("alpha_pattern", {}), ("layers_to_transform", None)):
        if raw.get(key, default) not in (default, None):
            raise _refuse(path, key, raw[key], "only the defaults are implemented")
    if raw.get("bias", "none") != "none":
        raise _refuse(path, "bias", raw["bias"], "adapters that train base biases are not implemented")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise _refuse(path, "init_lora_weights", init, "this init rewrites the base weights; convert the adapter "
                      "to plain LoRA with peft first (path_initial_model_for_weight_conversion)")
    common = dict(target_modules=raw.get("target_modules") or [], exclude_modules=raw.get("exclude_modules") or [],
                  modules_to_save=raw.get("modules_to_save") or [])
    try:
        if peft_type == "IA3":
            cfg = AdapterConfig(method="ia3", feedforward_modules=raw.get("feedforward_modules") or [], **common)
        else:
            cfg = AdapterConfig(method="dora" if raw.get("use_dora") else "lora", r=int(raw.get("r", 8)),
                                alpha=float(raw.get("lora_alpha", 8)), dropout=float(raw.get("lora_dropout", 0.0)),
                                use_rslora=bool(raw.get("use_rslora", False)),
                                init="gaussian" if init == "gaussian" else "default", **common)
        cfg.validate()
    except (ConfigError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    return cfg


# ----- tensors ----------------------------------------------------------------------------------------------
def adapter_parameter_map(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """File key (without PREFIX) → the model's parameter holding it, for adapter `name`."""
    out: dict[str, torch.Tensor] = {}
    for module_name, layer in adapter_layers(model):
        if name not in layer.adapter_names():
            continue
        if isinstance(layer, LoraLinear):
            out[f"{module_name}.lora_A.weight"] = layer.lora_A[name].weight
            out[f"{module_name}.lora_B.weight"] = layer.lora_B[name].weight
            if layer.is_dora(name):
                out[f"{module_name}.lora_magnitude_vector"] = layer.lora_magnitude_vector[name].weight
        elif isinstance(layer, IA3Linear):
            out[f"{module_name}.ia3_l"] = layer.ia3_l[name]
        elif isinstance(layer, BottleneckLayer):
            for part in ("adapter_down", "adapter_up"):
                linear = getattr(layer, part)[name]
                out[f"{module_name}.{part}.weight"] = linear.weight
                out[f"{module_name}.{part}.bias"] = linear.bias
        elif isinstance(layer, ModulesToSave):
            for key, tensor in layer.modules_to_save[name].state_dict(keep_vars=True).items():
                out[f"{module_name}.{key}"] = tensor
    return out


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors under peft's file keys (CPU, detached): what adapter_model.safetensors holds."""
    state = peft_state(model)
    if name not in state.configs:
        raise ConfigError(f"unknown adapter {name!r}; the model holds {sorted(state.configs)}")
    return {PREFIX + key: t.detach().to("cpu").contiguous() for key, t in adapter_parameter_map(model, name).items()}


def _file_key(key: str, path: Path) -> str:
    """A file key → our key: strip PREFIX; accept older peft spellings (magnitude '.weight', named copies)."""
    if not key.startswith(PREFIX):
        raise CheckpointError(f"{path}: key {key!r} does not start with {PREFIX!r} (not a PEFT causal-LM adapter)")
    key = key[len(PREFIX):]
    key = re.sub(r"\.lora_magnitude_vector\.weight$", ".lora_magnitude_vector", key)
    return re.sub(r"\.modules_to_save\.[^.]+\.", ".", key)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    return {_file_key(k, path): v for k, v in tensors.items()}


def _copy_checked(live: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor], path: Path) -> None:
    """Copy every tensor after checking that keys and shapes agree exactly."""
    missing = sorted(set(live) - set(loaded))
    if missing:
        raise CheckpointError(f"{path}: missing key {PREFIX + missing[0]!r} ({len(missing)} missing) that "
                              f"adapter_config.json's targets require")
    unexpected = sorted(set(loaded) - set(live))
    if unexpected:
        raise CheckpointError(f"{path}: unexpected key {PREFIX + unexpected[0]!r} ({len(unexpected)} unexpected): "
                              "it names no module the adapter config targets")
    for key, tensor in live.items():
        if tuple(loaded[key].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{path}: key {PREFIX + key!r} has shape {tuple(loaded[key].shape)}, "
                                  f"the model expects {tuple(tensor.shape)}")
    with torch.no_grad():
        for key, tensor in live.items():
            tensor.copy_(loaded[key])


# ----- public API -----------------------------------------------------------------------------------------
def save_adapter(model: nn.Module, path: str | Path, name: str = "default", *,
                 base_model_name_or_path: str | None = None) -> Path:
    """Write adapter `name` as a PEFT-layout directory (atomic writes); returns the directory."""
    path = Path(path)
    if getattr(model, "prompt_learning_state", None) is not None:  # prefix / prompt / P-tuning: prompt_io.py
        from .prompt_io import save_prompt_adapter

        return save_prompt_adapter(model, path, name, base_model_name_or_path=base_model_name_or_path)
    tensors = adapter_state_dict(model, name)
    atomic_write_bytes(path / WEIGHTS_NAME, save(tensors, metadata={"format": "pt"}))
    atomic_write_json(path / CONFIG_NAME, to_peft_config(model, name, base_model_name_or_path))
    return path


def read_adapter_config(path: str | Path) -> AdapterConfig:
    """The AdapterConfig of a PEFT-layout directory (ours or peft's); a PromptLearningConfig for
    PREFIX_TUNING / PROMPT_TUNING / P_TUNING adapters."""
    config_path = Path(path) / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: not found (a PEFT adapter directory holds {CONFIG_NAME} "
                              f"and {WEIGHTS_NAME})")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object")
    if raw.get("peft_type") in ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING"):
        from .prompt_io import from_peft_config as prompt_learning_config

        return prompt_learning_config(raw, config_path)  # a PromptLearningConfig
    return from_peft_config(raw, config_path)


def load_adapter(model: nn.Module, path: str | Path, name: str = "default", *, activate: bool = True) -> nn.Module:
    """Add the adapter in PEFT-layout directory `path` (written by lmforge or by peft) to `model` as `name`.

    Keys and shapes are checked against what the config's targets need before anything is kept; on any
    error the model is left as it was. The loaded adapter becomes active unless `activate=False`.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not an adapter directory")
    weights_path = path / WEIGHTS_NAME
    if not weights_path.is_file():
        if (path / PICKLE_WEIGHTS_NAME).exists():
            raise CheckpointError(f"{path / PICKLE_WEIGHTS_NAME}: pickle-format weights are refused (unpickling "
                                  f"can run code); re-save the adapter with safetensors ({WEIGHTS_NAME})")
        raise CheckpointError(f"{weights_path}: not found")
    state = getattr(model, "peft_state", None)
    if state is not None and name in state.configs:
        raise ConfigError(f"the model already holds an adapter named {name!r}")
    cfg = read_adapter_config(path)
    if not isinstance(cfg, AdapterConfig):  # prefix / prompt / P-tuning: virtual tokens, not layers
        from .prompt_io import load_prompt_adapter

        return load_prompt_adapter(model, path, name, activate=activate)
    loaded = _read_weights(weights_path)
    try:
        add_adapter(model, cfg, name)
    except ConfigError as e:
        raise CheckpointError(f"{path / CONFIG_NAME}: {e}") from None
    try:
        _copy_checked(adapter_parameter_map(model, name), loaded, weights_path)
    except BaseException:
        delete_adapter(model, name)
        raise
    if activate:
        set_adapter(model, name)
    return model
