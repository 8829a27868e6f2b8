"""Beam search over the contiguous KV cache: the `num_beams` best partial sequences advance together.

```python
from lmforge.infer.beam import beam_search
hyps = beam_search(model, prompt_ids, num_beams=4, max_new_tokens=32, eos_token_id=tok.eos_id)
hyps[0].token_ids, hyps[0].score              # best first; score = sum of log-probs / length ** length_penalty
```

Each step scores every (beam, next token) pair by the beam's summed log-probability plus the token's, keeps
the 2·num_beams best, moves those ending in EOS to the finished list and continues with the num_beams best
others; the cache rows are reordered to follow their beams (one `index_select` per layer). The rules are
those of `transformers`' beam search, so the same weights give the same best sequence (tested):
- a finished hypothesis scores sum_logprobs / generated_length ** length_penalty (EOS counted);
- without early stopping the search ends when the best running beam, even if every later token were free,
  cannot beat the worst of num_beams finished ones; at max_new_tokens the running beams join the list.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.errors import ConfigError
from ..model.kv_cache import KVCache


@dataclass
class BeamHypothesis:
    token_ids: list[int]     # new tokens (EOS included when it ended the hypothesis)
    score: float             # sum_logprobs / len(token_ids) ** length_penalty
    sum_logprobs: float


class _Finished:
    """The num_beams best finished hypotheses so far."""

    def __init__(self, num_beams: int, length_penalty: float):
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.hyps: list[BeamHypothesis] = []

    def add(self, token_ids: list[int], sum_logprobs: float) -> None:
        score = sum_logprobs / (len(token_ids) ** self.length_penalty)
        if len(self.hyps) < self.num_beams or score > self.worst:
            self.hyps.append(BeamHypothesis(token_ids, score, sum_logprobs))
            self.hyps.sort(key=lambda h: h.score, reverse=True)
            del self.hyps[self.num_beams:]

    @property
    def worst(self) -> float:
        return self.hyps[-1].score if self.hyps else float("-inf")

    def done(self, best_running_sum: float, generated: int, early_stopping: bool) -> bool:
        if len(self.hyps) < self.num_beams:
            return False
        if early_stopping:
            return True
        # The best a running beam can still reach: its sum now (log-probs only fall) over the length that
        # favours it most — now for a penalty >= 0 (longer divides a negative sum by more), never otherwise.
        if self.length_penalty > 0:
            best = best_running_sum / (generated ** self.length_penalty)
        else:
            return False
        return self.worst >= best


@torch.inference_mode()
def beam_search(model: torch.nn.Module, prompt_ids: list[int], num_beams: int = 4, max_new_tokens: int = 32,
                length_penalty: float = 1.0, eos_token_id: int | list[int] | None = None,
                early_stopping: bool = False, num_return: int = 1) -> list[BeamHypothesis]:
    """The `num_return` best hypotheses (best first) for one prompt."""
    if num_beams < 1 or max_new_tokens < 1:
        raise ConfigError(f"num_beams={num_beams} and max_new_tokens={max_new_tokens} must be >= 1")
    if not 1 <= num_return <= num_beams:
        raise ConfigError(f"num_return={num_return} must be in 1..num_beams={num_beams}")
    if not prompt_ids:
        raise ConfigError("the prompt is empty: it needs at least one token")
    if getattr(model, "num_virtual_tokens", 0):
        raise ConfigError("beam search does not run prompt-learning adapters; use lmforge.infer.generate")
    device = model.lm_head.weight.device
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    was_training = model.training
    model.eval()
    try:
        cache = KVCache.for_model(model, num_beams, len(prompt_ids) + max_new_tokens)
        prompt = torch.tensor([prompt_ids] * num_beams, dtype=torch.long, device=device)
        logits = model(prompt, kv_cache=cache)[:, -1]
        beam_sums = torch.full((num_beams,), float("-inf"), device=device)
        beam_sums[0] = 0.0  # all beams hold the same prompt: start from one so the first step is not duplicated
        tokens = torch.empty((num_beams, 0), dtype=torch.long, device=device)
        finished = _Finished(num_beams, length_penalty)
        vocab = logits.shape[-1]
        done = False
        for step in range(max_new_tokens):
            scores = beam_sums[:, None] + torch.log_softmax(logits.float(), dim=-1)
            top_scores, top_index = scores.view(-1).topk(min(2 * num_beams, scores.numel()))
            next_beams, next_tokens, next_sums = [], [], []
            for rank, (score, index) in enumerate(zip(top_scores.tolist(), top_index.tolist())):
                beam, token = divmod(index, vocab)
                if token in eos:
                    if rank < num_beams:  # an EOS ranked below the beams that continue can never win
                        finished.add(tokens[beam].tolist() + [token], score)
                    continue
                next_beams.append(beam)
                next_tokens.append(token)
                next_sums.append(score)
                if len(next_beams) == num_beams:
                    break
            beams = torch.tensor(next_beams, device=device)
            tokens = torch.cat([tokens[beams], torch.tensor(next_tokens, device=device)[:, None]], dim=1)
            beam_sums = torch.tensor(next_sums, device=device)
            done = finished.done(max(next_sums), step + 1, early_stopping)
            if done or step == max_new_tokens - 1:
                break
            for layer in range(len(cache.keys)):  # each surviving beam takes its parent's keys and values
                cache.keys[layer] = cache.keys[layer].index_select(0, beams)
                cache.values[layer] = cache.values[layer].index_select(0, beams)
            logits = model(tokens[:, -1:], kv_cache=cache)[:, -1]
        if not done:  # out of steps: the running beams compete with the finished ones
            for row in range(num_beams):
                finished.add(tokens[row].tolist(), float(beam_sums[row]))
        return finished.hyps[:num_return]
    finally:
        model.train(was_training)
