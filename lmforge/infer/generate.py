"""Batched autoregressive generation with a preallocated KV cache.

Rows are left-padded to one length so every row's next token sits in the same cache slot; the
attention mask hides the pads and position ids count only real tokens, so a row generates the same
tokens alone or in a batch. Prefill runs the whole prompt once; each decode step feeds one token per row.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..core.errors import ConfigError
from ..model.kv_cache import KVCache, SinkKVCache, shift_slots
from .compiled import check_compilable, compiled_capacity, decode_step
from .sampling import sample


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, T], attention_mask [B, T]) with each prompt right-aligned."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids, mask


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    prompt_ids: list[list[int]] | torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    seed: int | None = None,
    sink_window: int = 0,
    num_sinks: int = 4,
    pack_weights: bool = True,
    on_token: Callable[[torch.Tensor], None] | None = None,
    compile: bool = False,
) -> list[list[int]]:
    """New tokens per row (up to and including the first EOS; at most max_new_tokens).

    sink_window > 0 uses a StreamingLLM attention-sink cache of that many slots (`SinkKVCache`): the
    first `num_sinks` tokens plus the most recent ones, so prompt + output may be any length; below
    the window the output equals the plain cache's. pack_weights gives the model's linears oneDNN's
    packed weight layout on CPU (2x faster batch-1 decode; a second copy of those weights, kept on the
    model for the next call; `lmforge.model.layers.unpack_weights` frees it). on_token, if given, is
    called with each step's tokens [B] as soon as they are chosen (streaming, timing). compile=True runs
    each decode step through a torch.compile'd graph (`lmforge/infer/compiled.py`: the first call of a
    batch size and capacity compiles; RoPE models without a sliding window or prompt-learning adapter).
    """
    if isinstance(prompt_ids, torch.Tensor):
        prompt_ids = prompt_ids.tolist()
    device = model.lm_head.weight.device
    input_ids, attention_mask = left_pad(prompt_ids, pad_id=model.config.pad_token_id or 0)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    batch, prompt_len = input_ids.shape
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []), device=device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    if pack_weights and device.type == "cpu":
        _pack(model)
    if compile and sink_window > 0:
        raise ConfigError("compile=True and sink_window cannot be combined (the sink cache moves its slots)")
    if compile:
        check_compilable(model)

    was_training = model.training
    model.eval()
    if sink_window > 0:
        kv_cache = SinkKVCache.for_model(model, batch, sink_window, num_sinks=num_sinks)
        capacity = sink_window
    else:  # + the slots a prompt-learning adapter (prefix, prompt, P-tuning) puts before the prompt
        capacity = int(getattr(model, "num_virtual_tokens", 0)) + prompt_len + max_new_tokens
        if compile:
            capacity = compiled_capacity(capacity)
        kv_cache = KVCache.for_model(model, batch, capacity)
    padded = not bool(attention_mask.all())
    full_mask = torch.ones((batch, capacity), dtype=torch.long, device=device)
    out = torch.empty((batch, max_new_tokens), dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    steps = 0
    try:
        if getattr(model, "num_virtual_tokens", 0):  # their slots first (mask 1), so the prompt lands after them
            from ..peft.prompt_learning import preload_cache

            preload_cache(model, kv_cache, batch)
        logits = _prefill(model, kv_cache, input_ids, attention_mask, full_mask, padded, sink_window > 0)
        forward = _forward
        if compile:
            forward = _CompiledForward(model, full_mask)
        for step in range(max_new_tokens):
            next_token = sample(logits, temperature, top_k, top_p, generator)
            out[:, step] = next_token
            steps = step + 1
            if on_token is not None:
                on_token(next_token)
            if eos.numel():
                done |= torch.isin(next_token, eos)
                if bool(done.all()):
                    break
            if step + 1 < max_new_tokens:
                logits = forward(model, kv_cache, next_token[:, None], full_mask, padded, sink_window > 0)
    finally:
        model.train(was_training)
    return [_until_eos(row, eos_token_id) for row in out[:, :steps].tolist()]


def _pack(model: torch.nn.Module) -> None:
    from ..model.layers import pack_weights

    pack_weights(model)


def _forward(model: torch.nn.Module, kv_cache: KVCache, tokens: torch.Tensor, full_mask: torch.Tensor,
             padded: bool, sinks: bool) -> torch.Tensor:
    """Last-position logits [B, V] for `tokens` [B, T] appended to the cache. With a sink cache, room is
    made first (the mask's slots move with the cache's) and positions are cache slots."""
    position_ids = None
    if sinks:
        dropped = kv_cache.make_room(tokens.shape[1])
        if dropped and padded:
            shift_slots(full_mask, kv_cache.num_sinks, dropped, kv_cache.length + dropped, dim=1)
            full_mask[:, kv_cache.length:].fill_(1)
        position_ids = torch.arange(kv_cache.length, kv_cache.length + tokens.shape[1], device=tokens.device)[None]
    mask = full_mask[:, :kv_cache.length + tokens.shape[1]] if padded else None
    hidden = model.hidden_states(tokens, attention_mask=mask, kv_cache=kv_cache, position_ids=position_ids)
    return model.lm_head(hidden[:, -1])


class _CompiledForward:
    """`_forward` for one new token per row through the compiled step: positions, the write slot and
    the mask over the whole capacity are made here, eagerly (a few tiny ops), so the graph is static."""

    def __init__(self, model: torch.nn.Module, full_mask: torch.Tensor):
        self.step = decode_step(model)
        self.full_mask = full_mask.bool()
        self.slots = torch.arange(full_mask.shape[1], device=full_mask.device)

    def __call__(self, model, kv_cache: KVCache, tokens: torch.Tensor, full_mask, padded: bool, sinks: bool):
        length = kv_cache.length
        if padded:
            positions = full_mask[:, :length + 1].sum(-1, keepdim=True) - 1
        else:
            positions = torch.full((tokens.shape[0], 1), length, dtype=torch.long, device=tokens.device)
        mask = (self.full_mask & (self.slots <= length))[:, None, None]
        slot = self.slots[length:length + 1]
        logits = self.step(tokens, positions, slot, mask, kv_cache.keys, kv_cache.values)
        kv_cache.advance(1)
        return logits


def _prefill(model: torch.nn.Module, kv_cache: KVCache, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             full_mask: torch.Tensor, padded: bool, sinks: bool) -> torch.Tensor:
    """Run the prompt through the model; a prompt longer than a sink cache goes in chunks that fit."""
    prompt_len = input_ids.shape[1]
    chunk = prompt_len
    if sinks and prompt_len > kv_cache.max_len:
        chunk = max(1, (kv_cache.max_len - kv_cache.num_sinks) // 2)
    logits = None
    for start in range(0, prompt_len, chunk):
        end = min(start + chunk, prompt_len)
        if padded:  # this chunk's mask goes where its tokens will land, after any eviction
            room = kv_cache.make_room(end - start) if sinks else 0
            if room:
                shift_slots(full_mask, kv_cache.num_sinks, room, kv_cache.length + room, dim=1)
            full_mask[:, kv_cache.length:kv_cache.length + end - start] = attention_mask[:, start:end]
        logits = _forward(model, kv_cache, input_ids[:, start:end], full_mask, padded, sinks)
    return logits


def _until_eos(row: list[int], eos_token_id: int | list[int] | None) -> list[int]:
    stops = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    for i, token in enumerate(row):
        if token in stops:
            return row[: i + 1]
    return row
