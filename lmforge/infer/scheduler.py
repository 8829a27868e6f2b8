"""Which sequences run in the next engine step, and how many tokens each: a pure function.

`schedule(waiting, running, num_free_blocks, config)` looks only at small per-sequence records and
counts — no model, no tensors, no allocator — so every policy decision is unit-tested in
`tests/test_scheduler.py` without running a model. The engine applies the decision.

One rule covers prefill and decode (as in vLLM's v1 scheduler): a sequence has `num_tokens` tokens
(prompt + generated) of which `num_computed_tokens` already have keys/values in the cache; a step
computes some of the rest. A decode is the case "one token left" (the last sampled one); a prefill chunk
is "many left", cut to the step's token budget (chunked prefill). A prompt longer than the budget is
spread over several steps while the other sequences keep decoding.

Policy, first come first served so nothing starves:
1. Running sequences in arrival order. Each decode gets its one token before any prefill chunk takes
   tokens (the budget for a chunk is what is left after reserving one token per running decode), so a
   long prompt never stalls the others' streams.
2. When a running sequence needs a block and none is free, the most recently arrived running sequence
   is preempted (its blocks freed, its tokens kept, recomputed later), possibly the sequence itself.
   The oldest running sequence is never preempted, so it always makes progress. (A victim frees the
   blocks only it holds; blocks shared by several victims are not counted, so the estimate errs low.)
3. Then waiting sequences in arrival order, while sequence slots, tokens and blocks last; the first one
   that does not fit stops admission (no overtaking), and nothing is admitted in a step that preempted.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .block_manager import num_blocks_for


@dataclass(frozen=True, slots=True)
class SequenceState:
    """What the scheduler needs to know about one sequence."""

    seq_id: int
    num_tokens: int                # prompt + generated so far
    num_computed_tokens: int       # tokens with KV in the cache (for a waiting one: its prefix-cache hit)
    num_blocks: int = 0            # blocks it holds (for a waiting one: the prefix-cache hit's blocks)
    num_freeable_blocks: int = 0   # blocks freed if it is preempted (held by it alone)
    num_cached_free_blocks: int = 0  # waiting only: hit blocks sitting in the free queue (taking them costs)

    @property
    def num_remaining(self) -> int:
        return self.num_tokens - self.num_computed_tokens


@dataclass(frozen=True)
class SchedulerConfig:
    """Budgets for one step."""

    max_num_seqs: int              # sequences running at once
    max_num_batched_tokens: int    # tokens in one model call (prefill chunks + decodes)
    block_size: int


@dataclass
class SchedulerDecision:
    """The next step: `scheduled` (seq_id, tokens to compute) in batch order, running ones first."""

    scheduled: list[tuple[int, int]] = field(default_factory=list)
    admitted: list[int] = field(default_factory=list)    # waiting → running this step (subset of scheduled)
    preempted: list[int] = field(default_factory=list)   # running → waiting, blocks freed, to be recomputed

    @property
    def num_batched_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


def _blocks_to_take(seq: SequenceState, num_new: int, block_size: int) -> int:
    """Free blocks that computing `num_new` more tokens of `seq` uses up."""
    new_blocks = num_blocks_for(seq.num_computed_tokens + num_new, block_size) - seq.num_blocks
    return max(new_blocks, 0) + seq.num_cached_free_blocks


def schedule(
    waiting: Sequence[SequenceState], running: Sequence[SequenceState], num_free_blocks: int,
    config: SchedulerConfig,
) -> SchedulerDecision:
    """The decision for one step; `waiting` and `running` are each in arrival order (oldest first)."""
    decision = SchedulerDecision()
    token_budget = config.max_num_batched_tokens
    free = num_free_blocks
    running = list(running)
    reserved_for_decodes = sum(1 for seq in running if seq.num_remaining == 1)

    index = 0
    while index < len(running):
        seq = running[index]
        is_decode = seq.num_remaining == 1
        if is_decode:
            reserved_for_decodes -= 1
            num_new = min(1, token_budget)
        else:
            num_new = min(seq.num_remaining, token_budget - reserved_for_decodes)
        if num_new <= 0:
            index += 1
            continue
        need = _blocks_to_take(seq, num_new, config.block_size)
        while need > free:  # preempt the newest running sequence, possibly this one
            if index == 0 and len(running) == 1:
                # The oldest is never preempted. Everything else is gone, so every block it does not hold
                # is free (max_model_len fits the cache); the estimate only missed blocks the victims shared.
                free = need
                break
            victim = running.pop()
            decision.preempted.append(victim.seq_id)
            free += victim.num_freeable_blocks
            if victim.num_remaining == 1 and victim is not seq:
                reserved_for_decodes -= 1
            if victim is seq:
                break
        if index >= len(running):  # `seq` itself was preempted
            break
        free -= need
        token_budget -= num_new
        decision.scheduled.append((seq.seq_id, num_new))
        index += 1

    if decision.preempted:
        return decision
    num_running = len(running)
    for seq in waiting:
        if num_running >= config.max_num_seqs or token_budget <= 0:
            break
        num_new = min(seq.num_remaining, token_budget)
        need = _blocks_to_take(seq, num_new, config.block_size)
        if need > free:
            break
        free -= need
        token_budget -= num_new
        num_running += 1
        decision.admitted.append(seq.seq_id)
        decision.scheduled.append((seq.seq_id, num_new))
    return decision
