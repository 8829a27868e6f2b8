"""Batched autoregressive generation with a preallocated KV cache.

Rows are left-padded to one length so every row's next token sits in the same cache slot; the
attention mask hides the pads and position ids count only real tokens, so a row generates the same
tokens alone or in a batch. Prefill runs the whole prompt once; each decode step feeds one token per row.
"""
from __future__ import annotations

import torch

from ..model.kv_cache import KVCache
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
) -> list[list[int]]:
    """New tokens per row (up to and including the first EOS; at most max_new_tokens)."""
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

    was_training = model.training
    model.eval()
    kv_cache = KVCache.for_model(model, batch, prompt_len + max_new_tokens)
    padded = not bool(attention_mask.all())
    full_mask = torch.ones((batch, prompt_len + max_new_tokens), dtype=torch.long, device=device)
    full_mask[:, :prompt_len] = attention_mask
    out = torch.empty((batch, max_new_tokens), dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    steps = 0
    tokens = input_ids
    try:
        for step in range(max_new_tokens):
            mask = full_mask[:, :kv_cache.length + tokens.shape[1]] if padded else None
            logits = model(tokens, attention_mask=mask, kv_cache=kv_cache)[:, -1]
            next_token = sample(logits, temperature, top_k, top_p, generator)
            out[:, step] = next_token
            steps = step + 1
            done |= torch.isin(next_token, eos)
            if bool(done.all()):
                break
            tokens = next_token[:, None]
    finally:
        model.train(was_training)
    return [_until_eos(row, eos_token_id) for row in out[:, :steps].tolist()]


def _until_eos(row: list[int], eos_token_id: int | list[int] | None) -> list[int]:
    stops = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    for i, token in enumerate(row):
        if token in stops:
            return row[: i + 1]
    return row
