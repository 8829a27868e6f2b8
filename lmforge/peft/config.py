"""`AdapterConfig`: what a LoRA / rsLoRA / DoRA / IA3 adapter is, with peft's defaults and names.

The fields mirror `peft.LoraConfig` / `peft.IA3Config` (under lmforge's shorter names: `alpha` for
`lora_alpha`, `init` for `init_lora_weights`), so `io.py` converts to and from `adapter_config.json`
field by field and an adapter trained here behaves the same when `peft` loads it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from ..config import opt
from ..core.errors import ConfigError

ALL_LINEAR = "all-linear"  # peft's shorthand: every linear layer except the output head

# peft 0.21's defaults when `target_modules` is not given (TRANSFORMERS_MODELS_TO_*_MAPPING), for the four
# model types lmforge builds. Mixtral's `w2` is an expert projection, which lmforge (like transformers 5)
# stores as a stacked parameter, not a linear module, so on Mixtral IA3 reaches only k_proj and v_proj.
_LORA_DEFAULT_TARGETS = {t: ["q_proj", "v_proj"] for t in ("llama", "qwen2", "mistral", "mixtral")}
_IA3_DEFAULT_TARGETS = {"llama": ["k_proj", "v_proj", "down_proj"], "qwen2": ["q_proj", "v_proj", "down_proj"],
                        "mistral": ["k_proj", "v_proj", "down_proj"], "mixtral": ["k_proj", "v_proj", "w2"]}
_IA3_DEFAULT_FEEDFORWARD = {"llama": ["down_proj"], "qwen2": ["down_proj"], "mistral": ["down_proj"],
                            "mixtral": ["w2"]}

_BOTTLENECK_PLACEMENTS = {"pfeiffer": ["down_proj"], "houlsby": ["o_proj", "down_proj"]}

_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


@dataclass
class AdapterConfig:
    """One adapter's hyper-parameters (section `adapter.` of the finetune config)."""

    method: Literal["lora", "dora", "ia3", "bottleneck"] = opt(
        "lora", "lora = low-rank update B·A; dora = LoRA plus a learned per-output magnitude (weight-decomposed); "
                "ia3 = learned per-channel scaling vectors; bottleneck = Houlsby/Pfeiffer residual MLP adapters")
    r: int = opt(8, "LoRA/DoRA rank (peft's default 8)")
    alpha: float = opt(8, "LoRA/DoRA alpha: the update is scaled by alpha/r (alpha/sqrt(r) with use_rslora)")
    dropout: float = opt(0.0, "dropout on the LoRA/DoRA branch's input during training")
    target_modules: list[str] | str = opt(
        [], "linear layers to adapt: names matched as a suffix (q_proj,v_proj), the string 'all-linear' (every "
            "linear except lm_head), or a regex string matched against the full module name (peft's rule); "
            "empty = peft's default for the model type (q_proj,v_proj for LoRA)")
    exclude_modules: list[str] | str = opt(
        [], "modules never to adapt, e.g. with all-linear: names (suffix match) or a regex string (full match)")
    use_rslora: bool = opt(False, "rank-stabilised LoRA: scale by alpha/sqrt(r) instead of alpha/r")
    init: Literal["default", "gaussian"] = opt(
        "default", "LoRA A init: default = kaiming-uniform (as nn.Linear and peft), gaussian = normal(0, 1/r); "
                   "B always starts at zero so the adapted model starts equal to the base")
    bias: Literal["none"] = opt("none", "which biases train: only 'none' (peft's default) is supported")
    modules_to_save: list[str] = opt(
        [], "modules trained in full and saved with the adapter (e.g. lm_head), as peft's modules_to_save")
    feedforward_modules: list[str] | str = opt(
        [], "IA3: targets whose *input* is scaled (the rest scale their output); empty = peft's default for the "
            "model type (down_proj)")
    loraplus_lr_ratio: float = opt(
        0.0, "LoRA+: B matrices (and DoRA magnitudes) train at lr × this ratio (0 = off; the paper uses ~16)")
    bottleneck_size: int = opt(0, "bottleneck: units in the adapter's bottleneck (0 = hidden / reduction_factor)")
    reduction_factor: float = opt(16, "bottleneck: hidden size / bottleneck size when bottleneck_size is 0")
    placement: Literal["pfeiffer", "houlsby"] = opt(
        "pfeiffer", "bottleneck: pfeiffer = after each MLP output (down_proj); houlsby = after the attention "
                    "output (o_proj) and the MLP output; used when target_modules is empty")
    nonlinearity: Literal["relu", "gelu", "silu", "tanh"] = opt("relu", "bottleneck: the activation between "
                                                                        "the down- and up-projection")

    def __post_init__(self) -> None:
        self.target_modules = _names_or_regex(self.target_modules)
        if isinstance(self.target_modules, list) and [n.lower() for n in self.target_modules] == [ALL_LINEAR]:
            self.target_modules = ALL_LINEAR
        elif isinstance(self.target_modules, str) and self.target_modules.lower() == ALL_LINEAR:
            self.target_modules = ALL_LINEAR
        self.exclude_modules = _names_or_regex(self.exclude_modules)
        self.feedforward_modules = _names_or_regex(self.feedforward_modules)

    def validate(self) -> None:
        """Raise ConfigError naming the field at fault."""
        if self.method not in ("lora", "dora", "ia3", "bottleneck"):
            raise ConfigError(f"adapter.method={self.method!r} is not one of ['lora', 'dora', 'ia3', 'bottleneck']")
        if self.method == "bottleneck":
            self._validate_bottleneck()
        if self.method != "ia3":
            if self.r < 1:
                raise ConfigError(f"adapter.r={self.r} must be >= 1")
            if self.alpha <= 0:
                raise ConfigError(f"adapter.alpha={self.alpha} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"adapter.dropout={self.dropout} must be in [0, 1)")
        if self.init not in ("default", "gaussian"):
            raise ConfigError(f"adapter.init={self.init!r} is not one of ['default', 'gaussian']")
        if self.bias != "none":
            raise ConfigError(f"adapter.bias={self.bias!r}: only 'none' is supported")
        if self.loraplus_lr_ratio < 0:
            raise ConfigError(f"adapter.loraplus_lr_ratio={self.loraplus_lr_ratio} must be >= 0")
        if isinstance(self.target_modules, str) and self.target_modules != ALL_LINEAR:
            try:
                re.compile(self.target_modules)
            except re.error as e:
                raise ConfigError(f"adapter.target_modules={self.target_modules!r} is not a valid regex: {e}") from None
        if (self.method == "ia3" and isinstance(self.feedforward_modules, list) and self.feedforward_modules
                and isinstance(self.target_modules, list) and self.target_modules):
            stray = [m for m in self.feedforward_modules if m not in self.target_modules]
            if stray:  # peft's rule: a feed-forward module must also be a target
                raise ConfigError(f"adapter.feedforward_modules {stray} are not in adapter.target_modules "
                                  f"{self.target_modules}")

    def _validate_bottleneck(self) -> None:
        if self.bottleneck_size < 0:
            raise ConfigError(f"adapter.bottleneck_size={self.bottleneck_size} must be >= 0 (0 = use reduction_factor)")
        if self.reduction_factor <= 0:
            raise ConfigError(f"adapter.reduction_factor={self.reduction_factor} must be > 0")
        if self.placement not in _BOTTLENECK_PLACEMENTS:
            raise ConfigError(f"adapter.placement={self.placement!r} is not one of {sorted(_BOTTLENECK_PLACEMENTS)}")
        if self.nonlinearity not in ("relu", "gelu", "silu", "tanh"):
            raise ConfigError(f"adapter.nonlinearity={self.nonlinearity!r} is not one of "
                              "['relu', 'gelu', 'silu', 'tanh']")

    @property
    def scaling(self) -> float:
        """The factor on B·A: alpha/r, or alpha/sqrt(r) for rsLoRA (which keeps updates stable at high rank)."""
        return self.alpha / (self.r ** 0.5 if self.use_rslora else self.r)

    def resolved_targets(self, model_type: str | None) -> list[str] | str:
        """target_modules, or peft's default for `model_type` when empty (ConfigError when there is none)."""
        if self.target_modules:
            return self.target_modules
        if self.method == "bottleneck":
            return list(_BOTTLENECK_PLACEMENTS[self.placement])
        table = _IA3_DEFAULT_TARGETS if self.method == "ia3" else _LORA_DEFAULT_TARGETS
        if model_type not in table:
            raise ConfigError(f"adapter.target_modules is empty and there is no default for model type "
                              f"{model_type!r}; name the modules (e.g. q_proj,v_proj or all-linear)")
        return list(table[model_type])

    def resolved_feedforward(self, model_type: str | None) -> list[str] | str:
        """IA3 feed-forward names (list: suffix match, str: regex): the configured ones, else peft's default
        for the model type (peft applies that default whenever feedforward_modules is unset)."""
        if self.feedforward_modules:
            return self.feedforward_modules
        return list(_IA3_DEFAULT_FEEDFORWARD.get(model_type or "", []))


def _names_or_regex(value: list[str] | str) -> list[str] | str:
    """A list of names stays a list; "a,b" (as the CLI passes lists) and a bare name become lists, since a
    bare name as a regex would have to match the whole dotted path and so would match nothing; any other
    string is a regex, as in peft."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if not value:
        return []
    if "," in value:
        return [v.strip() for v in value.split(",") if v.strip()]
    if value.lower() != ALL_LINEAR and _PLAIN_NAME.match(value):
        return [value]
    return value


def check_adapter_name(name: str) -> str:
    """An adapter name becomes a ModuleDict key: letters, digits, '_' and '-' only (no dots, no paths)."""
    if not isinstance(name, str) or not _ADAPTER_NAME.match(name):
        raise ConfigError(f"adapter name {name!r} must be letters, digits, '_' or '-'")
    return name
