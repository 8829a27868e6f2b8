"""ModelConfig: the shape of a decoder-only model, and its mapping to/from HF `config.json`.

One dataclass covers the four HF types lmforge reads and writes (llama, qwen2, mistral, mixtral); they
differ only in a few switches (qkv bias, sliding window, experts). `from_hf` reads both config layouts in
the wild: transformers >= 5 (`rope_parameters` with `rope_theta` inside) and the older top-level
`rope_theta` + `rope_scaling` (keyed `type` or `rope_type`). `to_hf` writes the new layout and, for older
readers (transformers 4.x, vLLM, llama.cpp's converter), the old keys too; they always agree.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from ..config import opt
from ..core.errors import ConfigError

MODEL_TYPES = ("llama", "qwen2", "mistral", "mixtral")
ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM",
}
# ALiBi has no HF model type. Saving it under one would let transformers load it silently with RoPE and
# wrong logits, so it is written under a type transformers refuses with a clear "unrecognized" error.
ALIBI_MODEL_TYPE = "lmforge_alibi"
ROPE_REQUIRED = {
    "linear": ("factor",), "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclass
class ModelConfig:
    """Shape and switches of a decoder-only transformer (HF names in the help texts)."""

    model_type: str = opt("llama", "HF model type: llama, qwen2, mistral or mixtral")
    vocab_size: int = opt(8192, "vocabulary size (rows of the embedding table)")
    hidden_size: int = opt(512, "model width d")
    intermediate_size: int = opt(1376, "SwiGLU hidden width (per expert for MoE)")
    num_layers: int = opt(8, "number of transformer blocks (HF num_hidden_layers)")
    num_heads: int = opt(8, "attention heads (HF num_attention_heads)")
    num_kv_heads: int = opt(8, "key/value heads: = num_heads for MHA, fewer for GQA, 1 for MQA")
    head_dim: Optional[int] = opt(None, "per-head width; null = hidden_size / num_heads")
    max_position_embeddings: int = opt(2048, "longest sequence the model is meant for")
    rms_norm_eps: float = opt(1e-6, "RMSNorm epsilon")
    rope_theta: float = opt(10000.0, "RoPE base")
    rope_scaling: Optional[dict] = opt(
        None, "RoPE scaling: null or {rope_type: linear|dynamic|yarn|llama3, factor: ..., ...} as in HF")
    position_embedding: str = opt("rope", "rope, or alibi (lmforge-only: transformers cannot load it)")
    attention_bias: bool = opt(False, "bias on q/k/v projections (Qwen2 has it; for llama also on o_proj, as HF)")
    tie_word_embeddings: bool = opt(False, "share the embedding table with the output projection")
    sliding_window: Optional[int] = opt(None, "attend only to the last N positions (Mistral); null = all")
    max_window_layers: int = opt(0, "layers below this index ignore sliding_window (Qwen2's setting)")
    num_experts: int = opt(0, "MoE experts per layer; 0 = dense SwiGLU MLP")
    num_experts_per_tok: int = opt(2, "experts each token is routed to (top-k)")
    router_aux_loss_coef: float = opt(0.001, "weight of the MoE load-balancing loss in model.aux_loss")
    bos_token_id: Optional[int] = opt(1, "beginning-of-sequence token id")
    eos_token_id: Any = opt(2, "end-of-sequence token id (an int or a list of ints)")
    pad_token_id: Optional[int] = opt(None, "padding token id")
    initializer_range: float = opt(0.02, "std of the normal weight init")
    scale_residual_init: bool = opt(False, "scale o_proj/down_proj init by 1/sqrt(2*num_layers) (GPT-2)")

    def __post_init__(self) -> None:
        self.rope_scaling = _normalise_rope_scaling(self.rope_scaling, self.max_position_embeddings)

    @property
    def head_dim_resolved(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    def validate(self) -> None:
        """Raise ConfigError naming the first inconsistent field."""
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"model.model_type={self.model_type!r} is not one of {list(MODEL_TYPES)}")
        if self.position_embedding not in ("rope", "alibi"):
            raise ConfigError(f"model.position_embedding={self.position_embedding!r} is not rope or alibi")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ConfigError(f"model.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model.num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim_resolved % 2 and self.position_embedding == "rope":
            raise ConfigError(f"model.head_dim={self.head_dim_resolved} must be even for RoPE")
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(f"model.num_experts_per_tok={self.num_experts_per_tok} must be in "
                              f"1..num_experts={self.num_experts}")
        if self.num_experts and self.model_type != "mixtral":
            raise ConfigError(f"model.num_experts={self.num_experts} needs model_type=mixtral "
                              f"(got {self.model_type!r})")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"model.sliding_window={self.sliding_window} must be >= 1 or null")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type")
            if rope_type not in ROPE_REQUIRED:
                raise ConfigError(f"model.rope_scaling.rope_type={rope_type!r} is not one of {sorted(ROPE_REQUIRED)}")
            missing = [k for k in ROPE_REQUIRED[rope_type] if k not in self.rope_scaling]
            if missing:
                raise ConfigError(f"model.rope_scaling ({rope_type}) lacks {missing}")

    # ---- size and cost -------------------------------------------------------------------------

    def num_params(self, include_embedding: bool = True, active_only: bool = False) -> int:
        """Parameter count. `active_only` counts only the top-k experts a token uses (MoE)."""
        h, d = self.hidden_size, self.head_dim_resolved
        q, kv = self.num_heads * d, self.num_kv_heads * d
        attention = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.attention_bias else 0)
        attention += h if self.attention_bias and self.model_type == "llama" else 0  # llama's o_proj bias
        if self.num_experts:
            experts = self.num_experts_per_tok if active_only else self.num_experts
            mlp = experts * 3 * h * self.intermediate_size + h * self.num_experts
        else:
            mlp = 3 * h * self.intermediate_size
        body = self.num_layers * (attention + mlp + 2 * h) + h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        embedding = self.vocab_size * h
        return body + head + (embedding if include_embedding else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward) at context `seq_len`, for MFU.

        6·N + 6·L·T·(num_heads·head_dim), where N counts the weights used as matmuls: every
        non-embedding weight plus the output projection V·d (tied or not; the embedding lookup is not a
        matmul), and for MoE only the top-k experts a token visits. The attention term is QKᵀ and AV, 2
        matmuls × 2 FLOPs × 3 (fwd + bwd) over on average T/2 keys per query under the causal mask.
        Sliding windows are ignored (an upper bound when T > window).
        """
        n = self.num_params(include_embedding=False, active_only=True)
        if self.tie_word_embeddings:
            n += self.vocab_size * self.hidden_size
        attention = 6 * self.num_layers * seq_len * self.num_heads * self.head_dim_resolved
        return 6.0 * n + attention

    # ---- HF config.json ------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Read an HF `config.json` dict (either rope layout). Raises ConfigError on what we cannot run."""
        model_type = hf.get("model_type")
        position_embedding = "rope"
        if model_type == ALIBI_MODEL_TYPE:
            model_type, position_embedding = hf.get("lmforge_base_model_type", "llama"), "alibi"
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"config.json: model_type={model_type!r} is not one of {list(MODEL_TYPES)}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config.json: hidden_act={hf['hidden_act']!r} is not supported (only silu)")
        if hf.get("mlp_bias"):
            raise ConfigError("config.json: mlp_bias=true is not supported")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in hf]
        if missing:
            raise ConfigError(f"config.json lacks {missing}")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        if rope.pop("partial_rotary_factor", 1.0) != 1.0 or hf.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError("config.json: partial_rotary_factor != 1 is not supported")
        max_pos = hf.get("max_position_embeddings", 2048)
        if "original_max_position_embeddings" in hf and rope.get("rope_type", rope.get("type")) in ("yarn", "llama3"):
            rope["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
        sliding_window = hf.get("sliding_window")
        max_window_layers = 0
        if model_type == "qwen2":
            if not hf.get("use_sliding_window", False):
                sliding_window = None
            max_window_layers = hf.get("max_window_layers", 0) if sliding_window is not None else 0
        num_heads = hf["num_attention_heads"]
        config = cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim"),
            max_position_embeddings=max_pos,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope or None,
            position_embedding=position_embedding,
            attention_bias={"qwen2": True, "llama": bool(hf.get("attention_bias", False))}.get(model_type, False),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            sliding_window=sliding_window,
            max_window_layers=max_window_layers,
            num_experts=hf.get("num_local_experts", 0) if model_type == "mixtral" else 0,
            num_experts_per_tok=hf.get("num_experts_per_tok", 2),
            router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            initializer_range=hf.get("initializer_range", 0.02),
        )
        if config.head_dim == config.hidden_size // config.num_heads:
            config.head_dim = None
        config.validate()
        return config

    def to_hf(self, dtype: str = "float32") -> dict[str, Any]:
        """An HF `config.json` dict that transformers (5.x and 4.x) loads as the same model."""
        self.validate()
        rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope_parameters = {**self.rope_scaling, "rope_theta": self.rope_theta}
        hf: dict[str, Any] = {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim_resolved,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope_parameters,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_dropout": 0.0,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "use_cache": True,
            "dtype": dtype,
            "torch_dtype": dtype,
        }
        if self.model_type == "llama":
            hf.update(attention_bias=self.attention_bias, mlp_bias=False)
        elif self.attention_bias != (self.model_type == "qwen2"):
            raise ConfigError(f"attention_bias={self.attention_bias} cannot be saved as {self.model_type} "
                              f"(qwen2 always has a qkv bias, mistral/mixtral never); use model_type=llama")
        if self.max_window_layers and self.model_type != "qwen2":
            raise ConfigError(f"max_window_layers={self.max_window_layers} is a qwen2 setting, not {self.model_type}")
        if self.model_type == "qwen2":
            hf.update(use_sliding_window=self.sliding_window is not None, sliding_window=self.sliding_window,
                      max_window_layers=self.max_window_layers if self.sliding_window is not None else 0)
        elif self.model_type in ("mistral", "mixtral"):
            hf["sliding_window"] = self.sliding_window
        elif self.sliding_window is not None:
            raise ConfigError(f"sliding_window={self.sliding_window} cannot be saved as llama; use mistral or qwen2")
        if self.model_type == "mixtral":
            hf.update(num_local_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                      router_aux_loss_coef=self.router_aux_loss_coef, output_router_logits=False,
                      router_jitter_noise=0.0)
        if self.position_embedding == "alibi":
            hf.update(model_type=ALIBI_MODEL_TYPE, architectures=["LmforgeAlibiForCausalLM"],
                      lmforge_base_model_type=self.model_type, rope_parameters=None, rope_scaling=None)
        return hf

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _normalise_rope_scaling(scaling: dict | None, max_position_embeddings: int) -> dict | None:
    """One spelling for rope_scaling: `rope_type` key (old files say `type`), no `default` entry."""
    if not scaling:
        return None
    scaling = dict(scaling)
    legacy_type = scaling.pop("type", None)
    scaling.setdefault("rope_type", legacy_type or "default")
    scaling.pop("rope_theta", None)
    if scaling["rope_type"] == "default" and set(scaling) <= {"rope_type"}:
        return None
    if scaling["rope_type"] in ("yarn", "llama3"):
        scaling.setdefault("original_max_position_embeddings", max_position_embeddings)
    return scaling


# ---- size presets: one function per shape, so a reader sees the whole shape in one place ----------

def llama_tiny() -> ModelConfig:
    """~0.2M-parameter llama for unit tests and the laptop quickstart's first seconds."""
    return ModelConfig(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=176,
                       num_layers=2, num_heads=4, num_kv_heads=2, max_position_embeddings=512)


def llama_33m() -> ModelConfig:
    """33M llama (d=512, 8 layers, 8 heads, vocab 8192): trains on a CPU in minutes."""
    return ModelConfig(model_type="llama", vocab_size=8192, hidden_size=512, intermediate_size=1376,
                       num_layers=8, num_heads=8, num_kv_heads=8, max_position_embeddings=2048)


def llama_125m() -> ModelConfig:
    """GPT-2-small-sized llama with GQA: the 'small' recipe on one GPU."""
    return ModelConfig(model_type="llama", vocab_size=32000, hidden_size=768, intermediate_size=2048,
                       num_layers=12, num_heads=12, num_kv_heads=4, max_position_embeddings=2048,
                       tie_word_embeddings=True)


def qwen2_0_5b() -> ModelConfig:
    """Qwen2-0.5B's shape (qkv bias, tied embeddings, 14 heads over 2 KV heads)."""
    return ModelConfig(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                       num_layers=24, num_heads=14, num_kv_heads=2, max_position_embeddings=32768,
                       rope_theta=1000000.0, attention_bias=True, tie_word_embeddings=True,
                       bos_token_id=None, eos_token_id=151643, rms_norm_eps=1e-6)


def mistral_tiny() -> ModelConfig:
    """Tiny mistral: GQA with a sliding window shorter than the test sequences."""
    return ModelConfig(model_type="mistral", vocab_size=512, hidden_size=64, intermediate_size=176,
                       num_layers=2, num_heads=4, num_kv_heads=2, sliding_window=16,
                       max_position_embeddings=512)


def mixtral_tiny() -> ModelConfig:
    """Tiny mixtral: 4 experts, top-2 routing."""
    return ModelConfig(model_type="mixtral", vocab_size=512, hidden_size=64, intermediate_size=128,
                       num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4, num_experts_per_tok=2,
                       max_position_embeddings=512)


PRESETS = {
    "llama-tiny": llama_tiny, "llama-33m": llama_33m, "llama-125m": llama_125m,
    "qwen2-0.5b": qwen2_0_5b, "mistral-tiny": mistral_tiny, "mixtral-tiny": mixtral_tiny,
}


def preset(name: str) -> ModelConfig:
    """The config of a named preset; ConfigError lists the names when unknown."""
    if name not in PRESETS:
        raise ConfigError(f"model.size={name!r} is not one of {sorted(PRESETS)}")
    return PRESETS[name]()
