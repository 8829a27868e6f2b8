"""The decoder-only transformer: embeddings → N × (attention + MLP/MoE) → norm → lm_head.

Parameter names are Hugging Face's (`model.embed_tokens`, `model.layers.{i}.self_attn.q_proj`, ...,
`lm_head`), so checkpoints and PEFT adapters map onto this module key for key. Per forward, RoPE cos/sin
and the attention masks are computed once and shared by every layer.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention, AttentionMask, build_attention_masks
from .config import ModelConfig
from .layers import MLP, Linear, MoE, RMSNorm, load_balancing_loss
from .rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)). Returns (x, MoE router stats or None)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.is_moe = config.num_experts > 0
        self.mlp = MoE(config) if self.is_moe else MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.uses_window = config.sliding_window is not None and layer_idx >= config.max_window_layers

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, mask: AttentionMask,
        kv_cache=None, token_weight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple | None]:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, kv_cache)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            out, stats = self.mlp(h, token_weight)
            return x + out, stats
        return x + self.mlp(h), None


class DecoderModel(nn.Module):
    """The `model.` prefix of HF checkpoints: embeddings, layers, final norm (and RoPE, no weights)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config) if config.position_embedding == "rope" else None


def default_positions(
    num_new: int, past: int, attention_mask: torch.Tensor | None, document_ids: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """Position ids [B|1, T]: restart at each document; count only real tokens under padding."""
    if document_ids is not None:
        index = torch.arange(num_new, device=device).expand_as(document_ids)
        starts = torch.ones_like(document_ids, dtype=torch.bool)
        starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
        first = torch.cummax(torch.where(starts, index, 0), dim=1).values
        return index - first
    if attention_mask is not None:
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return positions[:, -num_new:]
    return torch.arange(past, past + num_new, device=device)[None]


class Transformer(nn.Module):
    """Decoder-only LM: `forward(input_ids) -> logits [B, T, V]`; `model.aux_loss` holds the MoE loss."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False
        self.aux_loss = torch.zeros(())
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """normal(0, initializer_range) weights, zero biases, unit norms (HF's init, redone here).

        With `scale_residual_init`, the projections that write into the residual stream (o_proj,
        down_proj) get std / sqrt(2·layers), so the stream's variance does not grow with depth.
        """
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.num_layers) if self.config.scale_residual_init else std
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                elif name.endswith(".bias"):
                    param.zero_()
                elif name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
                    param.normal_(0.0, residual_std)
                else:
                    param.normal_(0.0, std)
        if self.model.rotary_emb is not None:
            self.model.rotary_emb.reset_parameters(self.lm_head.weight.device)

    def hidden_states(
        self, input_ids: torch.Tensor | None = None, *, position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, kv_cache=None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final normed hidden states [B, T, d].

        input_ids [B, T], or inputs_embeds [B, T, d] instead (e.g. prompt tuning's virtual tokens before the
        token embeddings); position_ids [B|1, T] (default: from document_ids / attention_mask / cache);
        document_ids [B, T] ints for packed rows (block-diagonal causal mask, positions restart per
        document); attention_mask [B, S] 1 = real, 0 = padding, S = cached + new slots; kv_cache: an
        object with the KVCache interface, extended in place.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        num_new = x.shape[1]
        past = kv_cache.length if kv_cache is not None else 0
        if position_ids is None:
            position_ids = default_positions(num_new, past, attention_mask, document_ids, x.device)
        rope = self.model.rotary_emb(position_ids, x.dtype) if self.model.rotary_emb is not None else None
        full_mask, window_mask = build_attention_masks(
            self.config, num_new, past, attention_mask, document_ids, x.device, x.dtype)
        token_weight = None
        if self.config.num_experts and attention_mask is not None:
            token_weight = attention_mask[:, -num_new:].reshape(-1).float()
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        router_stats = []
        for layer in self.model.layers:
            mask = window_mask if layer.uses_window else full_mask
            if checkpointing:
                x, stats = checkpoint(layer, x, rope, mask, None, token_weight, use_reentrant=False)
            else:
                x, stats = layer(x, rope, mask, kv_cache, token_weight)
            if stats is not None:
                router_stats.append(stats)
        if kv_cache is not None:
            kv_cache.advance(num_new)
        if router_stats:
            aux = load_balancing_loss(router_stats, self.config.num_experts)
            self.aux_loss = self.config.router_aux_loss_coef * aux
        else:
            self.aux_loss = torch.zeros((), device=x.device)
        return self.model.norm(x)

    def forward(
        self, input_ids: torch.Tensor | None = None, *, position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, kv_cache=None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] (see `hidden_states` for the arguments)."""
        hidden = self.hidden_states(input_ids, position_ids=position_ids, document_ids=document_ids,
                                    attention_mask=attention_mask, kv_cache=kv_cache, inputs_embeds=inputs_embeds)
        return self.lm_head(hidden)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | str | None = None,
    ) -> "Transformer":
        """Load an HF-layout directory (ours or transformers'); dtype None keeps the checkpoint's dtype."""
        from .hf import load_pretrained

        return load_pretrained(cls, path, device=device, dtype=dtype)

    def save_pretrained(self, path: str | Path, max_shard_size: int | str = "5GB") -> None:
        """Write config.json, generation_config.json and safetensors weights (sharded past max_shard_size)."""
        from .hf import save_pretrained

        save_pretrained(self, path, max_shard_size=max_shard_size)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
