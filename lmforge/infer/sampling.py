"""Next-token choice from logits [B, V]: greedy, temperature, top-k, top-p, min-p, penalties, logit bias.

All tensor ops, no vocabulary loops. Filters return logits with the removed tokens set to -inf, so they
compose (top-k then top-p, as transformers applies them). Each filter takes either one value for the
whole batch (`generate()`) or a tensor with one value per row (the engine batches requests with
different settings); a per-row value that means "off" (top_k 0, top_p 1, min_p 0) leaves its row alone.

`sample_rows` is the engine's sampler: per-row settings, penalties over each row's own tokens, and one
random generator per row, so a seeded request draws the same tokens whatever it is batched with: each
row's draw is one uniform from its own generator mapped through its own cumulative distribution.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

PerRow = float | torch.Tensor


def _column(value: PerRow, logits: torch.Tensor) -> PerRow:
    """A per-row tensor [B] as a column [B, 1] that broadcasts over the vocabulary; scalars unchanged."""
    return value.to(logits.device, logits.dtype)[:, None] if isinstance(value, torch.Tensor) else value


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The argmax token per row [B]."""
    return logits.argmax(dim=-1)


def apply_temperature(logits: torch.Tensor, temperature: PerRow) -> torch.Tensor:
    """logits / temperature (> 0; 0 means greedy and is handled by the caller)."""
    if not isinstance(temperature, torch.Tensor) and temperature == 1.0:
        return logits
    return logits / _column(temperature, logits)


def top_k_filter(logits: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """Keep the k largest logits per row (ties at the k-th value are kept too); k <= 0 keeps all."""
    vocab = logits.shape[-1]
    if isinstance(k, torch.Tensor):
        k = torch.where((k <= 0) | (k > vocab), vocab, k).to(logits.device)
        largest = torch.topk(logits, int(k.max()), dim=-1).values
        kth = largest.gather(-1, (k - 1)[:, None])
        return logits.masked_fill(logits < kth, float("-inf"))
    if k <= 0 or k >= vocab:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: PerRow) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability sums to >= p (the nucleus).

    The nucleus is looked for among the 64, then 1024 most likely tokens, and the whole vocabulary is
    sorted only when some row needs more: on this CPU sorting 16 × 8192 probabilities takes 6.4 ms, a
    top-1024 1.5 ms, a top-64 0.5 ms, and a trained model's nucleus is usually small."""
    if not isinstance(p, torch.Tensor) and p >= 1.0:
        return logits
    probs = torch.softmax(logits.float(), dim=-1)
    p = _column(p, probs)
    active = p < 1.0 if isinstance(p, torch.Tensor) else None  # rounding can push a sum past 1: "off" stays off
    vocab = logits.shape[-1]
    for candidates in [c for c in _TOP_P_CANDIDATES if c < vocab] + [vocab]:
        top_probs, top_ids = torch.topk(probs, candidates, dim=-1) if candidates < vocab \
            else torch.sort(probs, dim=-1, descending=True)
        keep_top = (top_probs.cumsum(dim=-1) - top_probs) < p  # the top token always stays (mass before = 0)
        spills = keep_top[:, -1] if active is None else keep_top[:, -1] & active[:, 0]
        if candidates == vocab or not bool(spills.any()):
            break
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, top_ids, keep_top)
    if active is not None:
        keep |= ~active
    return logits.masked_fill(~keep, float("-inf"))


_TOP_P_CANDIDATES = (64, 1024)


def min_p_filter(logits: torch.Tensor, min_p: PerRow) -> torch.Tensor:
    """Drop tokens whose probability is below min_p × the most likely token's probability."""
    if not isinstance(min_p, torch.Tensor) and min_p <= 0.0:
        return logits
    probs = torch.softmax(logits.float(), dim=-1)
    threshold = _column(min_p, probs) * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_penalties(
    logits: torch.Tensor, seen: torch.Tensor, output_counts: torch.Tensor, repetition: torch.Tensor,
    presence: torch.Tensor, frequency: torch.Tensor,
) -> torch.Tensor:
    """Repetition penalty (HF/CTRL) on every token seen in prompt or output: positive logits divided by it,
    negative ones multiplied; then OpenAI's presence/frequency penalties on generated tokens only.

    seen [B, V] bool, output_counts [B, V] counts of generated tokens, penalties [B]."""
    repetition = _column(repetition, logits)
    penalised = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, penalised, logits)
    counts = output_counts.to(logits.dtype)
    return logits - _column(frequency, logits) * counts - _column(presence, logits) * (counts > 0).to(logits.dtype)


def sample(
    logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token per row [B] with one setting for all rows: greedy when temperature == 0, else a draw."""
    if temperature <= 0.0:
        return greedy(logits)
    logits = top_p_filter(top_k_filter(apply_temperature(logits.float(), temperature), top_k), top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


# ---- the engine's per-row sampler ---------------------------------------------------------------------

@dataclass
class RowSampling:
    """One row's sampling settings and the context its penalties look at."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    banned_token_ids: Sequence[int] = ()          # e.g. stop tokens before min_tokens
    prompt_token_ids: Sequence[int] = ()          # read only when a penalty is set
    output_token_ids: Sequence[int] = ()
    generator: torch.Generator | None = None      # None: the sampler's shared generator
    num_logprobs: int | None = None               # None: no logprobs; k: sampled token's + top k


@dataclass
class SampledRows:
    """Chosen tokens, and for rows that asked: log-probability of the choice and the top-k alternatives."""

    token_ids: list[int]
    logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[int, float] | None] = field(default_factory=list)


def _penalty_inputs(rows: Sequence[RowSampling], vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(seen [B, V] bool over prompt + output, output_counts [B, V]) built in one scatter each."""
    seen = torch.zeros((len(rows), vocab), dtype=torch.bool, device=device)
    counts = torch.zeros((len(rows), vocab), dtype=torch.int32, device=device)
    for i, row in enumerate(rows):
        if row.repetition_penalty == 1.0 and row.presence_penalty == 0.0 and row.frequency_penalty == 0.0:
            continue
        output = torch.tensor(list(row.output_token_ids), dtype=torch.long, device=device)
        prompt = torch.tensor(list(row.prompt_token_ids), dtype=torch.long, device=device)
        counts[i].scatter_add_(0, output, torch.ones_like(output, dtype=torch.int32))
        seen[i, prompt] = True
        seen[i, output] = True
    return seen, counts


def _apply_bias_and_bans(logits: torch.Tensor, rows: Sequence[RowSampling]) -> torch.Tensor:
    for i, row in enumerate(rows):
        if row.logit_bias:
            ids = torch.tensor(list(row.logit_bias), dtype=torch.long, device=logits.device)
            logits[i, ids] += torch.tensor(list(row.logit_bias.values()), dtype=logits.dtype, device=logits.device)
        if row.banned_token_ids:
            logits[i, list(row.banned_token_ids)] = float("-inf")
    return logits


def _draw(probs: torch.Tensor, generators: Sequence[torch.Generator | None],
          shared: torch.Generator | None) -> torch.Tensor:
    """One token per row from probs [B, V] by inverse-CDF sampling with one uniform per row, drawn from
    the row's own generator (or the shared one): 16 × 8192 costs 0.1 ms, where V exponentials per row
    (the exponential race) cost 1.8 ms."""
    uniforms = torch.cat([torch.rand(1, generator=g if g is not None else shared, device=probs.device,
                                     dtype=torch.float64) for g in generators])
    cdf = probs.double().cumsum(dim=-1)
    targets = (uniforms * cdf[:, -1]).unsqueeze(-1)
    # right=True: the first token whose cumulative mass exceeds the target, never a zero-probability one
    return torch.searchsorted(cdf, targets, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def _apply_allowed(logits: torch.Tensor, raw: torch.Tensor, allowed: tuple[Sequence[int], torch.Tensor]
                   ) -> torch.Tensor:
    """-inf outside each constrained row's allowed tokens (a grammar's mask). Where bans or bias left
    nothing allowed, the row falls back to the grammar mask over the raw logits: the grammar wins."""
    row_ids, mask = allowed
    index = torch.tensor(list(row_ids), dtype=torch.long, device=logits.device)
    mask = mask.to(logits.device)
    logits = logits.clone() if logits is raw else logits
    constrained = logits.index_select(0, index).masked_fill_(~mask, float("-inf"))
    dead = ~torch.isfinite(constrained).any(dim=-1)
    if bool(dead.any()):
        fallback = raw.index_select(0, index).float().masked_fill_(~mask, float("-inf"))
        constrained = torch.where(dead[:, None], fallback, constrained)
    return logits.index_copy_(0, index, constrained)


def sample_rows(logits: torch.Tensor, rows: Sequence[RowSampling], shared_generator: torch.Generator | None = None,
                allowed: tuple[Sequence[int], torch.Tensor] | None = None) -> SampledRows:
    """Tokens for logits [B, V] under per-row settings (see `RowSampling`).

    Order: penalties → logit bias/bans → allowed-token mask (constrained decoding: `allowed` = (row
    indices, bool mask [len(indices), V]), True = may be sampled) → (greedy rows: argmax) → temperature →
    min-p → top-k → top-p → draw. Log-probabilities are of the raw model distribution (before penalties,
    temperature and masks)."""
    raw = logits
    logits = logits.float()
    vocab = logits.shape[-1]
    if any(r.repetition_penalty != 1.0 or r.presence_penalty or r.frequency_penalty for r in rows):
        seen, counts = _penalty_inputs(rows, vocab, logits.device)
        per_row = lambda name: torch.tensor([getattr(r, name) for r in rows], dtype=logits.dtype,  # noqa: E731
                                            device=logits.device)
        logits = apply_penalties(logits, seen, counts, per_row("repetition_penalty"), per_row("presence_penalty"),
                                 per_row("frequency_penalty"))
    if any(r.logit_bias or r.banned_token_ids for r in rows):
        logits = _apply_bias_and_bans(logits.clone() if logits is raw else logits, rows)
    if allowed is not None and len(allowed[0]):
        logits = _apply_allowed(logits, raw, allowed)

    is_greedy = [r.temperature <= 0.0 for r in rows]
    tokens = greedy(logits)
    if not all(is_greedy):
        sampled_idx = [i for i, g in enumerate(is_greedy) if not g]
        sub_rows = [rows[i] for i in sampled_idx]
        scores = logits[sampled_idx]
        per_row = lambda values: torch.tensor(values, dtype=scores.dtype, device=scores.device)  # noqa: E731
        scores = apply_temperature(scores, per_row([r.temperature for r in sub_rows]))
        if any(r.min_p > 0.0 for r in sub_rows):
            scores = min_p_filter(scores, per_row([r.min_p for r in sub_rows]))
        if any(r.top_k > 0 for r in sub_rows):
            scores = top_k_filter(scores, torch.tensor([r.top_k for r in sub_rows], device=scores.device))
        if any(r.top_p < 1.0 for r in sub_rows):
            scores = top_p_filter(scores, per_row([r.top_p for r in sub_rows]))
        drawn = _draw(torch.softmax(scores, dim=-1), [r.generator for r in sub_rows], shared_generator)
        tokens[sampled_idx] = drawn
    result = SampledRows(tokens.tolist())

    wanted = [i for i, r in enumerate(rows) if r.num_logprobs is not None]
    result.logprobs = [None] * len(rows)
    result.top_logprobs = [None] * len(rows)
    if wanted:
        logprobs = torch.log_softmax(raw[wanted].float(), dim=-1)
        chosen = logprobs.gather(-1, tokens[wanted][:, None]).squeeze(-1).tolist()
        most = max(rows[i].num_logprobs for i in wanted)
        top_values, top_ids = torch.topk(logprobs, most, dim=-1) if most else (None, None)
        for j, i in enumerate(wanted):
            result.logprobs[i] = chosen[j]
            k = rows[i].num_logprobs
            result.top_logprobs[i] = (dict(zip(top_ids[j, :k].tolist(), top_values[j, :k].tolist())) if k else {})
    return result
