"""The scheduler as a pure function: budgets, chunked prefill, FCFS admission, preemption; plus a
model-free simulation (real block allocator, fake model) showing every request finishes under pressure."""
from __future__ import annotations

import random

from lmforge.infer.block_manager import BlockManager, num_blocks_for
from lmforge.infer.scheduler import SchedulerConfig, SequenceState, schedule

CONFIG = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, block_size=4)


def running(seq_id: int, num_tokens: int, computed: int | None = None, freeable: int | None = None) -> SequenceState:
    """A running sequence holding exactly the blocks its computed tokens need."""
    computed = num_tokens - 1 if computed is None else computed
    blocks = num_blocks_for(computed, CONFIG.block_size)
    return SequenceState(seq_id, num_tokens, computed, blocks, blocks if freeable is None else freeable)


def waiting(seq_id: int, num_tokens: int) -> SequenceState:
    return SequenceState(seq_id, num_tokens, 0)


def test_every_running_decode_gets_one_token():
    decision = schedule([], [running(1, 5), running(2, 9), running(3, 4)], num_free_blocks=10, config=CONFIG)
    assert decision.scheduled == [(1, 1), (2, 1), (3, 1)]
    assert not decision.preempted and not decision.admitted


def test_long_prompt_is_chunked_to_the_token_budget_after_decodes():
    decision = schedule([waiting(9, 40)], [running(1, 5), running(2, 6)], num_free_blocks=20, config=CONFIG)
    assert decision.scheduled == [(1, 1), (2, 1), (9, 14)]
    assert decision.admitted == [9]
    assert decision.num_batched_tokens == CONFIG.max_num_batched_tokens


def test_a_partial_prefill_does_not_starve_younger_decodes():
    # sequence 1 (oldest) is mid-prefill; the decodes of 2 and 3 keep their token
    prefilling = SequenceState(1, 100, 16, 4, 4)
    decision = schedule([], [prefilling, running(2, 5), running(3, 7)], num_free_blocks=20, config=CONFIG)
    assert decision.scheduled == [(1, 14), (2, 1), (3, 1)]


def test_admission_is_first_come_first_served_without_overtaking():
    # the head needs 5 blocks, only 3 are free: the small one behind it must wait too
    decision = schedule([waiting(1, 20), waiting(2, 3)], [], num_free_blocks=3,
                        config=SchedulerConfig(4, 64, 4))
    assert decision.scheduled == [] and decision.admitted == []
    decision = schedule([waiting(1, 20), waiting(2, 3)], [], num_free_blocks=6, config=SchedulerConfig(4, 64, 4))
    assert decision.admitted == [1, 2]


def test_max_num_seqs_caps_admission():
    decision = schedule([waiting(i, 2) for i in range(10, 16)], [running(1, 3), running(2, 3)], 50, CONFIG)
    assert decision.admitted == [10, 11]


def test_prefix_hit_costs_only_new_blocks_and_free_hit_blocks():
    # 20 tokens, 16 cached in 4 blocks of which 1 sits in the free queue: 1 new block + 1 taken = 2
    hit = SequenceState(7, 20, 16, 4, 0, num_cached_free_blocks=1)
    assert schedule([hit], [], num_free_blocks=1, config=CONFIG).scheduled == []
    decision = schedule([hit], [], num_free_blocks=2, config=CONFIG)
    assert decision.scheduled == [(7, 4)]


def test_newest_running_sequence_is_preempted_first():
    # 1 needs a new block (token 9 starts block 3), nothing is free: 3, the newest, goes, 2 stays
    seqs = [running(1, 9), running(2, 6), running(3, 6)]
    decision = schedule([waiting(8, 2)], seqs, num_free_blocks=0, config=CONFIG)
    assert decision.preempted == [3]
    assert decision.scheduled == [(1, 1), (2, 1)]
    assert decision.admitted == []  # no admission in a step that preempted


def test_newest_sequence_preempts_itself_rather_than_an_older_one():
    decision = schedule([], [running(1, 6), running(2, 9)], num_free_blocks=0, config=CONFIG)
    assert decision.preempted == [2]
    assert decision.scheduled == [(1, 1)]


def test_oldest_sequence_always_progresses():
    seqs = [running(i, 9) for i in range(1, 5)]  # all four need a new block, one is free
    decision = schedule([], seqs, num_free_blocks=1, config=CONFIG)
    assert decision.scheduled[0] == (1, 1)
    assert 1 not in decision.preempted


def test_preempting_shared_blocks_counts_only_exclusive_ones():
    # 2 holds 3 blocks but 2 of them are shared (prefix cache): preempting it frees one block only
    seqs = [running(1, 9), running(2, 12, freeable=1), running(3, 9, freeable=0)]
    decision = schedule([], seqs, num_free_blocks=0, config=CONFIG)
    assert decision.preempted == [3, 2]
    assert decision.scheduled == [(1, 1)]


def test_oldest_sequence_is_never_preempted_even_when_the_estimate_errs_low():
    # 2 and 3 share all their blocks (prefix cache): each alone frees nothing, together they free some
    seqs = [running(1, 9), running(2, 9, freeable=0), running(3, 9, freeable=0)]
    decision = schedule([], seqs, num_free_blocks=0, config=CONFIG)
    assert decision.preempted == [3, 2]
    assert decision.scheduled == [(1, 1)]


def test_simulated_workload_finishes_every_request_within_budgets():
    """Random arrivals, tiny block pool: apply decisions to a real allocator with a fake model."""
    rng = random.Random(0)
    config = SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=8, block_size=4)
    blocks = BlockManager(num_blocks=12, block_size=4, enable_prefix_caching=False)
    targets = {i: (rng.randint(1, 20), rng.randint(1, 15)) for i in range(25)}  # prompt, max new tokens
    tokens = {i: prompt for i, (prompt, _) in targets.items()}
    computed, tables, generated = {}, {}, {i: 0 for i in targets}
    arrivals = sorted(targets)
    waiting_ids, running_ids, finished = [], [], set()
    for step in range(2000):
        if arrivals and rng.random() < 0.5:
            waiting_ids.append(arrivals.pop(0))
        wait_states = [SequenceState(i, tokens[i], 0) for i in waiting_ids]
        run_states = [SequenceState(i, tokens[i], computed[i], len(tables[i]), blocks.num_exclusive(tables[i]))
                      for i in running_ids]
        decision = schedule(wait_states, run_states, blocks.num_free_blocks, config)
        assert decision.num_batched_tokens <= config.max_num_batched_tokens
        for i in decision.preempted:
            blocks.release(tables.pop(i))
            running_ids.remove(i)
            waiting_ids = sorted(waiting_ids + [i])
        for i, num_new in decision.scheduled:
            if i in decision.admitted:
                waiting_ids.remove(i)
                running_ids = sorted(running_ids + [i])
                computed[i], tables[i] = 0, []
            tables[i] += blocks.allocate(num_blocks_for(computed[i] + num_new, 4) - len(tables[i]))
            computed[i] += num_new
            if computed[i] == tokens[i]:  # "sample" a token
                tokens[i] += 1
                generated[i] += 1
                if generated[i] == targets[i][1]:
                    blocks.release(tables.pop(i))
                    running_ids.remove(i)
                    finished.add(i)
        assert len(running_ids) <= config.max_num_seqs
        if len(finished) == len(targets):
            break
    assert finished == set(targets)
    assert blocks.num_free_blocks == blocks.num_blocks
