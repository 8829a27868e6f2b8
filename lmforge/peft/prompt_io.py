"""Prompt-learning adapters in peft's layout: `adapter_config.json` + `adapter_model.safetensors`.

peft stores one tensor, `prompt_embeddings` [P, width]: the final virtual tokens computed through the encoder
(prefix/P-tuning) or the learned table itself (prompt tuning, P-tuning v2), so loading needs no encoder.
For prefix methods width = layers·2·K/V width (peft's `token_dim` is num_key_value_heads·head_dim under GQA).

A directory written while training a reparameterised method (prefix, ptuning) also holds
`prompt_encoder.safetensors` with the encoder itself (peft's parameter names), which resume reads; peft and
`load_adapter` ignore it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from ..core.errors import CheckpointError, ConfigError
from ..core.io import atomic_write_bytes, atomic_write_json
from .prompt_learning import Dims, PromptLearningConfig, add_prompt_adapter, prompt_state, virtual_tokens

PROMPT_PEFT_TYPES = ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING")
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
ENCODER_NAME = "prompt_encoder.safetensors"
KEY = "prompt_embeddings"

# adapter_config.json keys that do not change what the saved virtual tokens compute.
_UNDERSTOOD = {
    "peft_type", "task_type", "peft_version", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
    "num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers",
    "encoder_hidden_size", "prefix_projection", "init_weights", "prompt_tuning_init", "prompt_tuning_init_text",
    "tokenizer_name_or_path", "tokenizer_kwargs", "encoder_reparameterization_type", "encoder_num_layers",
    "encoder_dropout", "modules_to_save",
}


def to_peft_config(model: nn.Module, name: str, base_model_name_or_path: str | None = None) -> dict:
    """adapter_config.json for prompt-learning adapter `name`, with the fields peft 0.21 writes."""
    cfg = prompt_state(model).configs[name]
    dims = Dims.of(model)
    token_dim = dims.token_dim(cfg)
    out = {"auto_mapping": None, "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
           "modules_to_save": None, "num_attention_heads": dims.attention_heads(cfg), "num_layers": dims.layers,
           "num_transformer_submodules": 1, "num_virtual_tokens": cfg.num_virtual_tokens, "peft_type": cfg.peft_type,
           "revision": None, "task_type": "CAUSAL_LM", "token_dim": token_dim}
    hidden = cfg.encoder_hidden_size or token_dim
    if cfg.is_prefix:
        out.update(encoder_hidden_size=hidden, init_weights=None, prefix_projection=cfg.method == "prefix")
    elif cfg.method == "ptuning":
        out.update(encoder_dropout=cfg.encoder_dropout, encoder_hidden_size=hidden,
                   encoder_num_layers=cfg.encoder_num_layers, encoder_reparameterization_type=cfg.encoder_type.upper())
    else:
        # peft requires a tokenizer path with TEXT; it reads it only to initialise, never in inference mode
        text = cfg.init == "text" and bool(base_model_name_or_path)
        out.update(prompt_tuning_init="TEXT" if text else "RANDOM", prompt_tuning_init_text=cfg.init_text or None,
                   tokenizer_kwargs=None, tokenizer_name_or_path=base_model_name_or_path if text else None)
    return dict(sorted(out.items()))


def _refuse(path: Path, key: str, value, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: {key}={value!r} is not supported by lmforge ({why})")


def from_peft_config(raw: dict, path: Path) -> PromptLearningConfig:
    """The PromptLearningConfig (inference mode: the saved tokens, no encoder) of a peft config mapping."""
    peft_type = raw.get("peft_type")
    if raw.get("task_type") not in (None, "CAUSAL_LM"):
        raise _refuse(path, "task_type", raw.get("task_type"), "lmforge models are causal LMs")
    for key, value in raw.items():
        if key not in _UNDERSTOOD and value not in (None, False, {}, [], ""):
            raise _refuse(path, key, value, "a peft feature that changes the adapter's computation")
    if raw.get("num_transformer_submodules") not in (None, 1):
        raise _refuse(path, "num_transformer_submodules", raw["num_transformer_submodules"], "decoder-only models use 1")
    if raw.get("modules_to_save"):
        raise _refuse(path, "modules_to_save", raw["modules_to_save"], "prompt-learning adapters here train no modules")
    if peft_type == "PREFIX_TUNING":
        method = "prefix" if raw.get("prefix_projection") else "ptuning_v2"
    else:
        method = "prompt" if peft_type == "PROMPT_TUNING" else "ptuning"
    try:
        cfg = PromptLearningConfig(
            method=method, num_virtual_tokens=int(raw.get("num_virtual_tokens") or 0),
            encoder_hidden_size=int(raw.get("encoder_hidden_size") or 0),
            encoder_type=str(raw.get("encoder_reparameterization_type") or "MLP").lower(),
            encoder_num_layers=int(raw.get("encoder_num_layers") or 2),
            encoder_dropout=float(raw.get("encoder_dropout") or 0.0),
            init="text" if raw.get("prompt_tuning_init") == "TEXT" else "random",
            init_text=raw.get("prompt_tuning_init_text") or "", inference_mode=True)
        cfg.validate()
    except (ConfigError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    return cfg


def _check_shapes(model: nn.Module, cfg: PromptLearningConfig, raw: dict, path: Path) -> None:
    """The config's model shape fields must describe `model` (the saved tokens only fit that shape)."""
    dims = Dims.of(model)
    for key, expected in (("token_dim", dims.token_dim(cfg)), ("num_layers", dims.layers),
                          ("num_attention_heads", dims.attention_heads(cfg))):
        if raw.get(key) is not None and int(raw[key]) != expected:
            raise CheckpointError(f"{path}: {key}={raw[key]} does not match the model ({expected}); the adapter "
                                  "was trained for a different base model")


def save_prompt_adapter(model: nn.Module, path: str | Path, name: str = "default", *,
                        base_model_name_or_path: str | None = None) -> Path:
    """Write adapter `name` in peft's layout (atomic writes), plus the encoder when it has one."""
    path = Path(path)
    tensors = {KEY: virtual_tokens(model, name)}
    atomic_write_bytes(path / WEIGHTS_NAME, save(tensors, metadata={"format": "pt"}))
    encoder = model.prompt_encoder[name]
    if encoder.reparameterised:
        state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
        atomic_write_bytes(path / ENCODER_NAME, save(state, metadata={"format": "pt"}))
    atomic_write_json(path / CONFIG_NAME, to_peft_config(model, name, base_model_name_or_path))
    return path


def _read(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def load_prompt_adapter(model: nn.Module, path: str | Path, name: str = "default", *,
                        activate: bool = True) -> nn.Module:
    """Add the prompt-learning adapter in PEFT-layout directory `path` (ours or peft's) to `model` as `name`."""
    path = Path(path)
    try:
        raw = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / CONFIG_NAME}: not readable JSON ({e})") from None
    cfg = from_peft_config(raw, path / CONFIG_NAME)
    _check_shapes(model, cfg, raw, path / CONFIG_NAME)
    tensors = _read(path / WEIGHTS_NAME)
    if set(tensors) != {KEY}:
        raise CheckpointError(f"{path / WEIGHTS_NAME}: expected the single key {KEY!r}, found {sorted(tensors)}")
    expected = (cfg.num_virtual_tokens, Dims.of(model).table_width(cfg))
    if tuple(tensors[KEY].shape) != expected:
        raise CheckpointError(f"{path / WEIGHTS_NAME}: {KEY} has shape {tuple(tensors[KEY].shape)}, the config and "
                              f"model need {expected}")
    try:
        add_prompt_adapter(model, cfg, name, activate=activate)
    except ConfigError as e:
        raise CheckpointError(f"{path / CONFIG_NAME}: {e}") from None
    with torch.no_grad():
        model.prompt_encoder[name].embedding.weight.copy_(tensors[KEY])
    return model


def training_state_dict(model: nn.Module, directory: str | Path, name: str = "default") -> dict[str, torch.Tensor]:
    """The model's state dict with adapter `name`'s trainable tensors as saved in checkpoint `directory`
    (the encoder from prompt_encoder.safetensors, else the table from prompt_embeddings): what resume loads."""
    directory = Path(directory)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    encoder = model.prompt_encoder[name]
    if encoder.reparameterised:
        saved = _read(directory / ENCODER_NAME)
        missing = sorted(set(encoder.state_dict()) - set(saved))
        if missing:
            raise CheckpointError(f"{directory / ENCODER_NAME}: missing {missing[0]!r}")
    else:
        saved = {"embedding.weight": _read(directory / WEIGHTS_NAME)[KEY]}
    for key in encoder.state_dict():
        state[f"prompt_encoder.{name}.{key}"] = saved[key]
    return state


__all__ = ["PROMPT_PEFT_TYPES", "to_peft_config", "from_peft_config", "save_prompt_adapter", "load_prompt_adapter",
           "training_state_dict"]
