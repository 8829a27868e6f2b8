"""The `model:` section of a training config: a size preset with optional overrides, or an HF checkpoint."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

from ..config import opt
from ..core.errors import ConfigError


@dataclass
class ModelSection:
    preset: str = opt("llama-tiny", "size preset (see lmforge.model.PRESETS), used when init_from is empty")
    init_from: str = opt("", "HF checkpoint directory to start from (continued pretraining); overrides the preset")
    trainable: str = opt("all", "all = every weight trains; embeddings = only the embedding table and LM head (stage one "
                                "after `lmforge vocab` added tokens)")
    model_type: Optional[str] = opt(None, "override: llama | qwen2 | mistral | mixtral")
    hidden_size: Optional[int] = opt(None, "override: model width")
    intermediate_size: Optional[int] = opt(None, "override: MLP width")
    num_layers: Optional[int] = opt(None, "override: transformer layers")
    num_heads: Optional[int] = opt(None, "override: attention heads")
    num_kv_heads: Optional[int] = opt(None, "override: key/value heads (GQA; 1 = MQA)")
    max_position_embeddings: Optional[int] = opt(None, "override: longest sequence")
    rope_theta: Optional[float] = opt(None, "override: RoPE base")
    tie_word_embeddings: Optional[bool] = opt(None, "override: share input embedding and LM head")
    sliding_window: Optional[int] = opt(None, "override: sliding-window attention span (Mistral)")
    num_experts: Optional[int] = opt(None, "override: MoE experts (0 = dense)")
    num_experts_per_tok: Optional[int] = opt(None, "override: experts per token (top-k)")
    position_embedding: Optional[str] = opt(None, "override: rope | alibi")

    def build_config(self, vocab_size: int, bos_id: int | None, eos_id: int | None, pad_id: int | None):
        """The ModelConfig this section describes, sized to the tokenizer."""
        from ..model import PRESETS

        if self.preset not in PRESETS:
            raise ConfigError(f"model.preset={self.preset!r} is not one of {sorted(PRESETS)}")
        cfg = PRESETS[self.preset]()
        changes = {f.name: getattr(self, f.name) for f in fields(self)
                   if f.name not in ("preset", "init_from", "trainable") and getattr(self, f.name) is not None}
        changes.update(vocab_size=vocab_size, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)
        try:
            return replace(cfg, **changes)
        except TypeError as e:
            raise ConfigError(f"model: {e}") from None
