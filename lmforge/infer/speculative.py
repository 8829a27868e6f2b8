"""Speculative decoding for one sequence: a cheap proposer guesses k tokens, the target checks them all
in one forward pass, and a rejection rule keeps the output distributed exactly as the target's own.

Proposers:
- a draft model (any `Transformer` with the target's vocabulary), run token by token on its own cache;
- prompt lookup (Saxena 2023): the tokens that followed the latest earlier occurrence of the context's
  last n-gram (n from `prompt_lookup_ngram` down to 1). Free to compute; pays off on text that repeats
  its context (summaries, code edits, extraction).

The rule (Leviathan et al. 2023; Chen et al. 2023): draft token x with draft probability q(x) and
target probability p(x) is accepted with probability min(1, p(x)/q(x)); at the first rejection the
token is drawn from norm(max(0, p - q)) and the round ends; if all k are accepted, one bonus token is
drawn from the target's next distribution. A prompt-lookup guess is a point mass (q = one-hot), so it
is accepted with probability p(x), and a rejection draws from p without x. p and q are the
distributions after temperature / top-k / top-p, so the output follows the target under those
settings; temperature 0 reduces to "accept while the guess equals the target's argmax".

Both models keep contiguous KV caches; rejected tokens are rolled back by truncating the cache length.
Invariant between rounds: each cache holds every committed token except those still "pending" (fed at
the start of the next forward): for the target only the newest token, for the draft whatever it
has not seen yet.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core.errors import ConfigError
from ..model.kv_cache import KVCache
from .sampling import apply_temperature, top_k_filter, top_p_filter


@dataclass
class SpeculativeStats:
    """Counts from one `speculative_generate` call."""

    new_tokens: int = 0
    target_forwards: int = 0
    draft_forwards: int = 0
    proposed: int = 0          # draft tokens the target checked
    accepted: int = 0          # of those, how many it kept
    rounds_with_proposal: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_target_forward(self) -> float:
        """Tokens per decoding forward of the target: the prefill and the token it yields are left out,
        so plain decoding gives exactly 1.0."""
        return (self.new_tokens - 1) / max(1, self.target_forwards - 1)


@dataclass
class SpeculativeOutput:
    tokens: list[int]
    stats: SpeculativeStats = field(default_factory=SpeculativeStats)


def _probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Sampling distributions [N, V] (float32) under the given settings; one-hot argmax when greedy."""
    logits = logits.float()
    if temperature <= 0.0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = top_p_filter(top_k_filter(apply_temperature(logits, temperature), top_k), top_p)
    return torch.softmax(logits, dim=-1)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


def prompt_lookup(context: list[int], max_ngram: int, num_tokens: int) -> list[int]:
    """Up to `num_tokens` tokens that followed the most recent earlier match of the context's last
    n-gram, trying n = max_ngram down to 1; [] when nothing matches."""
    length = len(context)
    for n in range(min(max_ngram, length - 1), 0, -1):
        tail = context[length - n:]
        for start in range(length - n - 1, -1, -1):  # latest earlier occurrence first
            if context[start:start + n] == tail:
                follow = context[start + n:start + n + num_tokens]
                if follow:
                    return follow
    return []


class _Runner:
    """One model with its cache and the committed tokens it has not consumed yet."""

    def __init__(self, model: torch.nn.Module, capacity: int):
        self.model = model
        self.cache = KVCache.for_model(model, 1, capacity)
        self.device = model.lm_head.weight.device
        self.forwards = 0

    def logits(self, tokens: list[int], last: int) -> torch.Tensor:
        """Feed `tokens` (appended to the cache); logits [last, V] of the final `last` positions."""
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        hidden = self.model.hidden_states(ids, kv_cache=self.cache)
        self.forwards += 1
        return self.model.lm_head(hidden[0, -last:])


@torch.inference_mode()
def speculative_generate(
    target: torch.nn.Module,
    prompt_ids: list[int] | torch.Tensor,
    max_new_tokens: int,
    draft: torch.nn.Module | None = None,
    num_speculative_tokens: int = 4,
    prompt_lookup_ngram: int = 3,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pack_weights: bool = True,
) -> SpeculativeOutput:
    """New tokens for one prompt (up to and including the first EOS) plus `SpeculativeStats`.

    Proposals come from `draft` when given, else from prompt lookup with n-grams up to
    `prompt_lookup_ngram` (0 turns lookup off: plain decoding through the same loop)."""
    if isinstance(prompt_ids, torch.Tensor):
        prompt_ids = prompt_ids.reshape(-1).tolist()
    prompt_ids = list(prompt_ids)
    if not prompt_ids:
        raise ConfigError("speculative_generate: the prompt needs at least one token")
    if num_speculative_tokens < 1:
        raise ConfigError(f"num_speculative_tokens={num_speculative_tokens} must be >= 1")
    if draft is not None and draft.config.vocab_size != target.config.vocab_size:
        raise ConfigError(f"draft vocab_size={draft.config.vocab_size} differs from the target's "
                          f"{target.config.vocab_size}: the two models must share a tokenizer")
    stops = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    device = target.lm_head.weight.device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    models = [target] + ([draft] if draft is not None else [])
    if pack_weights and device.type == "cpu":
        from ..model.layers import pack_weights as pack

        for model in models:
            pack(model)
    states = [model.training for model in models]
    for model in models:
        model.eval()

    capacity = len(prompt_ids) + max_new_tokens + num_speculative_tokens + 1
    tgt = _Runner(target, capacity)
    dft = _Runner(draft, capacity) if draft is not None else None
    stats = SpeculativeStats()
    context = list(prompt_ids)
    out: list[int] = []
    try:
        # Prefill: the target also yields the first token (no guesses can be checked before it exists).
        first = _probs(tgt.logits(context, 1), temperature, top_k, top_p)[0]
        out.append(_draw(first, generator) if temperature > 0 else int(first.argmax()))
        context.append(out[-1])
        while len(out) < max_new_tokens and out[-1] not in stops:
            k = min(num_speculative_tokens, max_new_tokens - len(out) - 1)
            guesses, q = _propose(dft, context, k, prompt_lookup_ngram, temperature, top_k, top_p, generator)
            pending = context[tgt.cache.length:]  # the newest committed token
            p = _probs(tgt.logits(pending + guesses, len(guesses) + 1), temperature, top_k, top_p)
            accepted, token = _verify(guesses, p, q, temperature, generator)
            stats.proposed += len(guesses)
            stats.accepted += accepted
            stats.rounds_with_proposal += bool(guesses)
            tgt.cache.truncate(tgt.cache.length - (len(guesses) - accepted))  # roll back the rejected
            new = guesses[:accepted] + [token]
            for t in new:
                out.append(t)
                context.append(t)
                if t in stops:
                    break
            if dft is not None:
                dft.cache.truncate(min(dft.cache.length, len(context) - 1))
    finally:
        for model, state in zip(models, states):
            model.train(state)
    out = out[:max_new_tokens]
    for i, t in enumerate(out):
        if t in stops:
            out = out[:i + 1]
            break
    stats.new_tokens = len(out)
    stats.target_forwards = tgt.forwards
    stats.draft_forwards = dft.forwards if dft is not None else 0
    return SpeculativeOutput(out, stats)


def _propose(dft: _Runner | None, context: list[int], k: int, ngram: int, temperature: float, top_k: int,
             top_p: float, generator: torch.Generator | None) -> tuple[list[int], torch.Tensor | None]:
    """(guesses, their draft distributions [len, V] or None for point-mass prompt-lookup guesses)."""
    if k <= 0:
        return [], None
    if dft is None:
        return (prompt_lookup(context, ngram, k) if ngram > 0 else []), None
    guesses, dists = [], []
    feed = context[dft.cache.length:]  # everything the draft has not seen yet (at least the newest token)
    for _ in range(k):
        q = _probs(dft.logits(feed, 1), temperature, top_k, top_p)[0]
        token = _draw(q, generator) if temperature > 0 else int(q.argmax())
        guesses.append(token)
        dists.append(q)
        feed = [token]
    return guesses, torch.stack(dists)


def _verify(guesses: list[int], p: torch.Tensor, q: torch.Tensor | None, temperature: float,
            generator: torch.Generator | None) -> tuple[int, int]:
    """(number of guesses accepted, the token that follows them: a correction or the bonus token)."""
    for i, x in enumerate(guesses):
        target_p = p[i, x]
        draft_p = q[i, x] if q is not None else torch.ones(())
        if temperature <= 0.0:
            if bool(target_p > 0):  # one-hot p: the guess is the target's argmax
                continue
            return i, int(p[i].argmax())
        u = torch.rand((), generator=generator, device=p.device)
        if bool(u * draft_p < target_p):  # u < p/q without dividing by a zero q
            continue
        residual = (p[i] - (q[i] if q is not None else torch.nn.functional.one_hot(
            torch.tensor(x, device=p.device), p.shape[-1]).float())).clamp_(min=0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: any draw from p is right
            residual = p[i]
        return i, _draw(residual, generator)
    last = p[len(guesses)]
    return len(guesses), (_draw(last, generator) if temperature > 0 else int(last.argmax()))
