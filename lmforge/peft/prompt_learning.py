"""Prompt learning: prefix tuning, P-tuning v2, prompt tuning and P-tuning, as peft 0.21 computes them.

All four learn P *virtual tokens* and leave every base weight frozen:

- `prompt` (peft PROMPT_TUNING): P embeddings put in front of the token embeddings;
- `ptuning` (peft P_TUNING): the same, but the P embeddings come out of a small encoder (MLP, or a
  bidirectional LSTM + MLP) over a learned table — a reparameterisation that trains more stably;
- `prefix` (peft PREFIX_TUNING, prefix_projection=True): per-layer keys and values for P extra slots in front
  of every attention, produced by an MLP (Linear-Tanh-Linear) from a learned table;
- `ptuning_v2` (peft PREFIX_TUNING, prefix_projection=False): those per-layer keys and values learned directly.

The model stays a `Transformer`: the encoders live in `model.prompt_encoder[<adapter name>]` and a forward
pre-hook adds the virtual tokens to each call, as peft's PeftModel.forward does. Positions follow peft: the
real tokens start at position P (prefix: they come after P cached slots; prompt: after P embeddings), the
virtual slots are always attended to, and the logits returned cover the real tokens only, so labels line up
with `input_ids` and virtual positions never carry a loss. An `attention_mask` passed in covers the real
tokens (peft's convention); the hook adds P ones in front.

Generation: a KV cache handed in empty is preloaded with the virtual slots on the first call (prefix: the
learned K/V; prompt: the virtual embeddings run through the model once), and marked with
`cache.virtual_tokens = P`; `model.num_virtual_tokens` tells a caller how many extra slots to allocate.
Only `forward` is hooked: `model.hidden_states` is the raw model, so a caller that uses it directly (the
`lmforge.infer.generate` loop) calls `preload_cache` first and passes masks over every cache slot.

The saved form (`prompt_io.py`) is peft's: the final virtual tokens (`prompt_embeddings`), computed through the
encoder, so inference needs no encoder. A model loaded from such a file holds that table only
(`inference_mode=True`).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

import torch
from torch import nn

from ..config import opt
from ..core.errors import ConfigError, LMForgeError
from .config import check_adapter_name

PROMPT_METHODS = ("prefix", "ptuning_v2", "prompt", "ptuning")
PREFIX_METHODS = ("prefix", "ptuning_v2")  # learned K/V per layer
PEFT_TYPES = {"prefix": "PREFIX_TUNING", "ptuning_v2": "PREFIX_TUNING", "prompt": "PROMPT_TUNING",
              "ptuning": "P_TUNING"}


@dataclass
class PromptLearningConfig:
    """One prompt-learning adapter's hyper-parameters (peft's PrefixTuning/PromptTuning/PromptEncoder configs)."""

    method: Literal["prefix", "ptuning_v2", "prompt", "ptuning"] = opt(
        "prompt", "prefix = per-layer K/V from an MLP; ptuning_v2 = per-layer K/V learned directly; prompt = "
                  "virtual input embeddings; ptuning = virtual input embeddings from an MLP/LSTM encoder")
    num_virtual_tokens: int = opt(20, "P: how many virtual tokens (slots) the adapter adds in front")
    encoder_hidden_size: int = opt(0, "prefix/ptuning: the encoder's hidden width (0 = token_dim, peft's default)")
    encoder_type: Literal["mlp", "lstm"] = opt("mlp", "ptuning: MLP (3 linear layers) or bidirectional LSTM + MLP")
    encoder_num_layers: int = opt(2, "ptuning with lstm: LSTM layers")
    encoder_dropout: float = opt(0.0, "ptuning with lstm: dropout between LSTM layers")
    init: Literal["random", "text"] = opt(
        "random", "prompt: random = N(0, 1) embeddings (peft's RANDOM); text = the embeddings of init_text's "
                  "tokens, cut or repeated to P (peft's TEXT)")
    init_text: str = opt("", "prompt with init=text: the text whose token embeddings start the prompt")
    inference_mode: bool = opt(False, "hold only the final virtual tokens (as loaded from a file), no encoder")

    def validate(self) -> None:
        """Raise ConfigError naming the field at fault."""
        if self.method not in PROMPT_METHODS:
            raise ConfigError(f"prompt learning method={self.method!r} is not one of {list(PROMPT_METHODS)}")
        if self.num_virtual_tokens < 1:
            raise ConfigError(f"num_virtual_tokens={self.num_virtual_tokens} must be >= 1")
        if self.encoder_hidden_size < 0:
            raise ConfigError(f"encoder_hidden_size={self.encoder_hidden_size} must be >= 0 (0 = token_dim)")
        if self.encoder_type not in ("mlp", "lstm"):
            raise ConfigError(f"encoder_type={self.encoder_type!r} is not one of ['mlp', 'lstm']")
        if self.encoder_num_layers < 1:
            raise ConfigError(f"encoder_num_layers={self.encoder_num_layers} must be >= 1")
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ConfigError(f"encoder_dropout={self.encoder_dropout} must be in [0, 1)")
        if self.init not in ("random", "text"):
            raise ConfigError(f"prompt init={self.init!r} is not one of ['random', 'text']")
        if self.init == "text" and self.method != "prompt":
            raise ConfigError(f"prompt init=text applies to method=prompt only (got method={self.method!r}), as in peft")
        if self.init == "text" and not self.init_text:
            raise ConfigError("prompt init=text needs a non-empty init text")

    @property
    def peft_type(self) -> str:
        return PEFT_TYPES[self.method]

    @property
    def is_prefix(self) -> bool:
        return self.method in PREFIX_METHODS


@dataclass
class Dims:
    """The model shapes an adapter depends on, in peft's terms (token_dim is the K/V width for prefix methods)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, model: nn.Module) -> "Dims":
        c = model.config
        return cls(c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim_resolved)

    def token_dim(self, cfg: PromptLearningConfig) -> int:
        return self.kv_heads * self.head_dim if cfg.is_prefix else self.hidden

    def attention_heads(self, cfg: PromptLearningConfig) -> int:
        return self.kv_heads if cfg.is_prefix else self.heads  # peft's GQA rule for prefix tuning

    def table_width(self, cfg: PromptLearningConfig) -> int:
        """Width of one saved virtual token (`prompt_embeddings`' second dimension)."""
        return self.layers * 2 * self.token_dim(cfg) if cfg.is_prefix else self.hidden


# ----- encoders (peft's module and parameter names) ---------------------------------------------------------
class PromptEncoder(nn.Module):
    """The trainable part of one adapter; `forward()` returns the P virtual tokens [P, table width].

    Parameter names are peft's (`embedding.weight`, `transform.0.weight`, `mlp_head.0.weight`,
    `lstm_head.weight_ih_l0`, ...). In inference mode only `embedding` exists and holds the final tokens.
    """

    def __init__(self, cfg: PromptLearningConfig, dims: Dims):
        super().__init__()
        self.method = cfg.method
        self.encoder_type = cfg.encoder_type
        token_dim, width = dims.token_dim(cfg), dims.table_width(cfg)
        hidden = cfg.encoder_hidden_size or token_dim
        self.reparameterised = not cfg.inference_mode and cfg.method in ("prefix", "ptuning")
        P = cfg.num_virtual_tokens
        self.embedding = nn.Embedding(P, token_dim if self.reparameterised else width)
        if not self.reparameterised:
            return
        if cfg.method == "prefix":
            self.transform = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(), nn.Linear(hidden, width))
        elif cfg.encoder_type == "lstm":
            self.lstm_head = nn.LSTM(token_dim, hidden, num_layers=cfg.encoder_num_layers,
                                     dropout=cfg.encoder_dropout if cfg.encoder_num_layers > 1 else 0.0,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, token_dim))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(token_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                          nn.ReLU(), nn.Linear(hidden, token_dim))

    def forward(self) -> torch.Tensor:
        table = self.embedding.weight
        if not self.reparameterised:
            return table
        if self.method == "prefix":
            return self.transform(table)
        if self.encoder_type == "lstm":
            return self.mlp_head(self.lstm_head(table[None])[0])[0]
        return self.mlp_head(table)


# ----- state --------------------------------------------------------------------------------------------------
@dataclass
class PromptState:
    """The prompt-learning adapters a model holds, the active one, and what the hooks need between calls."""

    configs: dict[str, PromptLearningConfig] = field(default_factory=dict)
    active: str | None = None
    disabled: bool = False
    base_requires_grad: dict[str, bool] = field(default_factory=dict)
    strip: int = 0  # virtual positions the post-hook cuts from this call's logits


def prompt_state(model: nn.Module) -> PromptState | None:
    return getattr(model, "prompt_learning_state", None)


def holds_prompt_adapter(model: nn.Module, name: str | None = None) -> bool:
    """Does `model` hold prompt-learning adapter `name` (any, when name is None)?"""
    state = prompt_state(model)
    return state is not None and (name is None or name in state.configs)


def _active_config(model: nn.Module) -> PromptLearningConfig | None:
    state = prompt_state(model)
    if state is None or state.disabled or state.active is None:
        return None
    return state.configs[state.active]


def _sync(model: nn.Module) -> None:
    """requires_grad for the active adapter only; `model.num_virtual_tokens` for callers sizing a KV cache."""
    state = prompt_state(model)
    for name, encoder in model.prompt_encoder.items():
        encoder.requires_grad_(name == state.active)
    cfg = _active_config(model)
    model.num_virtual_tokens = cfg.num_virtual_tokens if cfg is not None else 0


# ----- the per-call work ----------------------------------------------------------------------------------
class PrefixKV:
    """A cache-like object for one forward without a KV cache: every layer's learned K/V [B, kv_heads, P, d]
    sit before the tokens' own, and `length` = P makes the model place the tokens at positions P.."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys, self.values = keys, values
        self.length = keys[0].shape[2]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pk, pv = self.keys[layer_idx], self.values[layer_idx]
        return torch.cat([pk.to(k.dtype), k], dim=2), torch.cat([pv.to(v.dtype), v], dim=2)

    def advance(self, num_tokens: int) -> None:
        """Nothing to keep: the tokens' K/V live only for this forward."""


def prefix_kv(table: torch.Tensor, dims: Dims, batch: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """[P, layers·2·kv_heads·head_dim] → per-layer keys and values [batch, kv_heads, P, head_dim]
    (peft's layout: for each virtual token, layer-major, key before value)."""
    P = table.shape[0]
    view = table.view(P, dims.layers, 2, dims.kv_heads, dims.head_dim).permute(1, 2, 3, 0, 4)
    keys = [view[i, 0][None].expand(batch, -1, -1, -1) for i in range(dims.layers)]
    values = [view[i, 1][None].expand(batch, -1, -1, -1) for i in range(dims.layers)]
    return keys, values


def _compute_dtype(model: nn.Module) -> torch.dtype:
    weight = model.model.embed_tokens.weight
    if torch.is_autocast_enabled(weight.device.type):
        return torch.get_autocast_dtype(weight.device.type)
    return weight.dtype


def _with_prefix_ones(mask: torch.Tensor | None, P: int) -> torch.Tensor | None:
    if mask is None:
        return None
    return torch.cat([torch.ones(mask.shape[0], P, dtype=mask.dtype, device=mask.device), mask], dim=1)


def preload_cache(model: nn.Module, cache, batch: int) -> int:
    """Fill an empty KV cache with the active adapter's P virtual slots; returns P (0 without an adapter)."""
    cfg = _active_config(model)
    if cfg is None:
        return 0
    if hasattr(cache, "make_room") or hasattr(cache, "attend"):
        raise ConfigError(f"a prompt-learning adapter ({cfg.method}) needs the plain contiguous KV cache (not an "
                          "attention-sink window or the paged engine)")
    if cache.length != 0:
        raise LMForgeError("a prompt-learning adapter's virtual tokens go into an empty KV cache "
                           f"(this one already holds {cache.length} slots)")
    state = prompt_state(model)
    table = model.prompt_encoder[state.active]().to(_compute_dtype(model))
    dims = Dims.of(model)
    if cfg.is_prefix:
        keys, values = prefix_kv(table, dims, batch)
        for layer in range(dims.layers):
            cache.update(layer, keys[layer], values[layer])
        cache.advance(cfg.num_virtual_tokens)
    else:  # the virtual embeddings through the model once: their K/V per layer land in the cache
        model.hidden_states(inputs_embeds=table[None].expand(batch, -1, -1), kv_cache=cache)
    cache.virtual_tokens = cfg.num_virtual_tokens
    return cfg.num_virtual_tokens


def _pre_hook(model: nn.Module, args: tuple, kwargs: dict[str, Any]):
    """Add the active adapter's virtual tokens to a Transformer.forward call (see the module docstring)."""
    state = prompt_state(model)
    if state is None:
        return None
    state.strip = 0
    cfg = _active_config(model)
    if cfg is None:
        return None
    kwargs = dict(kwargs)
    if args:
        kwargs["input_ids"] = args[0]
    if kwargs.get("document_ids") is not None:
        raise ConfigError(f"prompt-learning adapter ({cfg.method}) on packed rows: its virtual tokens would be "
                          "shared across the packed documents; set data.packing=false")
    if kwargs.get("inputs_embeds") is not None:
        raise ConfigError(f"a prompt-learning adapter ({cfg.method}) adds its own virtual tokens; pass input_ids")
    P = cfg.num_virtual_tokens
    input_ids = kwargs["input_ids"]
    batch = input_ids.shape[0]
    cache = kwargs.get("kv_cache")
    if cache is not None and hasattr(cache, "attend"):
        raise ConfigError(f"a prompt-learning adapter ({cfg.method}) is not supported by the paged engine; "
                          "generate with lmforge.infer.generate")
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"] + P  # the real tokens sit after the P virtual slots
    kwargs["attention_mask"] = _with_prefix_ones(kwargs.get("attention_mask"), P)
    if cache is not None:
        if cache.length == 0 and not getattr(cache, "virtual_tokens", 0):
            preload_cache(model, cache, batch)
        elif getattr(cache, "virtual_tokens", 0) != P:
            raise LMForgeError(f"this KV cache holds {getattr(cache, 'virtual_tokens', 0)} virtual slots, the active "
                               f"prompt-learning adapter needs {P}; start generation with an empty cache")
        return (), kwargs
    table = model.prompt_encoder[state.active]().to(_compute_dtype(model))
    if cfg.is_prefix:
        if model.gradient_checkpointing and model.training and torch.is_grad_enabled():
            raise ConfigError(f"finetune.method={cfg.method} does not work with train.activation_checkpointing=true "
                              "(the learned K/V would be skipped in recomputation, as peft refuses too); set it false")
        kwargs["kv_cache"] = PrefixKV(*prefix_kv(table, Dims.of(model), batch))
        return (), kwargs
    embeds = model.model.embed_tokens(kwargs.pop("input_ids"))
    kwargs["inputs_embeds"] = torch.cat([table.to(embeds.dtype)[None].expand(batch, -1, -1), embeds], dim=1)
    if kwargs.get("position_ids") is not None:
        positions = kwargs["position_ids"]
        virtual = torch.arange(P, device=positions.device).expand(positions.shape[0], P)
        kwargs["position_ids"] = torch.cat([virtual, positions], dim=1)
    state.strip = P
    return (), kwargs


def _post_hook(model: nn.Module, args: tuple, kwargs: dict[str, Any], output: torch.Tensor) -> torch.Tensor:
    """Logits for the real tokens only (prompt methods ran P virtual positions in front)."""
    state = prompt_state(model)
    if state is None or not state.strip:
        return output
    strip, state.strip = state.strip, 0
    return output[:, strip:]


# ----- public API -----------------------------------------------------------------------------------------
def _init_from_text(encoder: PromptEncoder, model: nn.Module, cfg: PromptLearningConfig, tokenizer) -> None:
    """peft's TEXT init: the init text's token embeddings, cut or repeated to P rows."""
    if tokenizer is None:
        raise ConfigError("prompt init=text needs the model's tokenizer to encode the init text")
    ids = list(tokenizer.encode(cfg.init_text))
    if not ids:
        raise ConfigError(f"prompt init text {cfg.init_text!r} encodes to no tokens")
    P = cfg.num_virtual_tokens
    ids = (ids * math.ceil(P / len(ids)))[:P]
    weight = model.model.embed_tokens.weight
    with torch.no_grad():
        encoder.embedding.weight.copy_(weight[torch.tensor(ids, device=weight.device)].float())


def add_prompt_adapter(model: nn.Module, cfg: PromptLearningConfig, name: str = "default", *,
                       tokenizer=None, activate: bool = True) -> nn.Module:
    """Add prompt-learning adapter `name` to `model` in place (freezing the base on first use)."""
    cfg.validate()
    check_adapter_name(name)
    if getattr(model, "peft_state", None) is not None:
        raise ConfigError("the model holds LoRA/IA3 adapters; one model holds either those or prompt-learning "
                          "adapters, not both (as in peft)")
    state = prompt_state(model)
    if state is not None and name in state.configs:
        raise ConfigError(f"the model already holds an adapter named {name!r}")
    weight = model.model.embed_tokens.weight
    encoder = PromptEncoder(cfg, Dims.of(model))
    dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
    encoder.to(device=weight.device, dtype=dtype)  # fp32 master weights over a half-precision base, as peft
    if cfg.init == "text" and not cfg.inference_mode:  # a loaded adapter's tokens come from its file
        _init_from_text(encoder, model, cfg, tokenizer)
    if state is None:
        state = PromptState(base_requires_grad={n: p.requires_grad for n, p in model.named_parameters()})
        model.requires_grad_(False)
        model.prompt_encoder = nn.ModuleDict()
        model.prompt_learning_state = state
        if not getattr(model, "prompt_hooks", False):  # once per model; they do nothing without adapters
            model.register_forward_pre_hook(_pre_hook, with_kwargs=True)
            model.register_forward_hook(_post_hook, with_kwargs=True)
            model.prompt_hooks = True
    encoder.train(model.training)
    model.prompt_encoder[name] = encoder
    state.configs[name] = cfg
    if activate:
        state.active = name
    _sync(model)
    return model


def set_prompt_adapter(model: nn.Module, name: str) -> None:
    """Make adapter `name` the one every forward uses (and the only trainable one)."""
    state = _require(model, name)
    state.active = name
    _sync(model)


def delete_prompt_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name`; with none left the hooks go and the base gets back its requires_grad."""
    state = _require(model, name)
    del model.prompt_encoder[name]
    del state.configs[name]
    if state.active == name:
        state.active = next(iter(state.configs), None)
    if state.configs:
        _sync(model)
        return
    del model.prompt_encoder
    del model.prompt_learning_state
    model.num_virtual_tokens = 0
    for param_name, param in model.named_parameters():
        param.requires_grad_(state.base_requires_grad.get(param_name, True))


@contextmanager
def disable_prompt_adapters(model: nn.Module) -> Iterator[None]:
    """Run the base model alone inside the block (no virtual tokens)."""
    state = _require(model, None)
    previous = state.disabled
    state.disabled = True
    _sync(model)
    try:
        yield
    finally:
        state.disabled = previous
        _sync(model)


def virtual_tokens(model: nn.Module, name: str | None = None) -> torch.Tensor:
    """Adapter `name`'s (default: the active one's) final virtual tokens [P, width], detached, fp32 on CPU:
    what peft saves as `prompt_embeddings`."""
    state = _require(model, name)
    encoder = model.prompt_encoder[name or state.active]
    was_training = encoder.training
    encoder.eval()  # no encoder dropout in what is saved
    try:
        with torch.no_grad():
            return encoder().detach().float().cpu().contiguous()
    finally:
        encoder.train(was_training)


def _require(model: nn.Module, name: str | None) -> PromptState:
    state = prompt_state(model)
    if state is None:
        raise ConfigError("the model holds no prompt-learning adapters")
    if name is not None and name not in state.configs:
        raise ConfigError(f"unknown adapter {name!r}; the model holds {sorted(state.configs)}")
    return state
