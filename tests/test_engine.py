"""LLMEngine correctness: paged KV, continuous batching, prefix cache, preemption, chunked prefill,
seeded sampling, abort; plus the per-row sampler. Every greedy result is checked against a plain
full-recompute loop (argmax of model(ids), one token at a time), the ground truth with no cache at all."""
from __future__ import annotations

import random

import pytest
from conftest import reference_greedy
import torch

from lmforge.infer import generate
from lmforge.infer.engine import LLMEngine
from lmforge.infer.request import SamplingParams
from lmforge.infer.sampling import RowSampling, min_p_filter, sample_rows, top_k_filter, top_p_filter
from lmforge.model import ModelConfig, Transformer

VOCAB = 97


def _random_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                    num_kv_heads=2, eos_token_id=None, max_position_embeddings=256)
    settings.update(overrides)
    model = Transformer(ModelConfig(**settings)).eval()
    with torch.no_grad():  # larger than the default init, so a wrong position or mask changes the argmax
        for param in model.parameters():
            param.normal_(0.0, 0.5)
    return model


# Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP's waits between threads made
# this file 50x slower (7 s vs 0.12 s for one test).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> Transformer:
    return _random_model()


def _prompts(seed: int, count: int, max_len: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(rng.randint(1, max_len))] for _ in range(count)]


def _run_with_arrivals(engine: LLMEngine, prompts, params, seed: int) -> dict[int, list[int]]:
    """Add the prompts at random steps while the engine runs; token ids per prompt index."""
    rng = random.Random(seed)
    pending = list(range(len(prompts)))
    rng.shuffle(pending)
    id_to_index, results = {}, {}
    while pending or engine.has_unfinished_requests():
        for _ in range(rng.randint(0, 3)):
            if pending:
                index = pending.pop()
                id_to_index[engine.add_request(prompts[index], params[index])] = index
        for output in engine.step():
            if output.finished:
                results[id_to_index[output.request_id]] = output.outputs[0].token_ids
    return results


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens)


@pytest.mark.parametrize("overrides", [
    {},                                                           # llama, GQA
    {"model_type": "mistral", "sliding_window": 7},               # window shorter than the sequences
    {"position_embedding": "alibi", "num_kv_heads": 4},           # ALiBi bias instead of RoPE
], ids=["llama-gqa", "mistral-window", "alibi"])
def test_greedy_engine_matches_full_recompute_with_random_arrivals(overrides):
    model = _random_model(**overrides)
    prompts = _prompts(seed=1, count=7)
    rng = random.Random(2)
    params = [_greedy(rng.randint(1, 14)) for _ in prompts]
    engine = LLMEngine(model, max_num_seqs=4, block_size=4, num_blocks=80, max_num_batched_tokens=24)
    results = _run_with_arrivals(engine, prompts, params, seed=3)
    for index, prompt in enumerate(prompts):
        assert results[index] == reference_greedy(model, prompt, params[index].max_tokens), index
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_paged_engine_matches_contiguous_generate(model):
    prompts = _prompts(seed=4, count=5)
    contiguous = generate(model, prompts, max_new_tokens=10)
    engine = LLMEngine(model, max_num_seqs=5, block_size=8, num_blocks=64)
    paged = [out.outputs[0].token_ids for out in engine.generate(prompts, _greedy(10))]
    assert paged == contiguous


def test_prefix_cache_hit_changes_nothing_and_is_counted(model):
    shared = list(range(3, 30))  # 27 shared tokens
    prompts = [shared + tail for tail in ([5], [6, 7], [8, 9, 10], [])]
    expected = [reference_greedy(model, p, 8) for p in prompts]
    engine = LLMEngine(model, max_num_seqs=4, block_size=4, num_blocks=64)
    first = engine.generate(prompts[:1], _greedy(8))  # computes and caches the shared blocks
    assert engine.stats().prefix_hit_rate == 0.0
    rest = engine.generate(prompts[1:], _greedy(8))
    assert [o.outputs[0].token_ids for o in first + rest] == expected
    assert all(o.metrics.num_cached_tokens == 24 for o in rest)  # 6 full blocks of the 27 shared tokens
    assert engine.stats().prefix_hit_rate > 0.5
    off = LLMEngine(model, max_num_seqs=4, block_size=4, num_blocks=64, enable_prefix_caching=False)
    assert [o.outputs[0].token_ids for o in off.generate(prompts, _greedy(8))] == expected
    assert off.stats().prefix_hit_rate == 0.0


def test_preemption_by_recompute_changes_nothing(model):
    prompts = _prompts(seed=6, count=6, max_len=20)
    engine = LLMEngine(model, max_num_seqs=6, block_size=4, num_blocks=14, max_num_batched_tokens=32)
    outputs = engine.generate(prompts, _greedy(16))
    assert engine.stats().num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outputs] == [reference_greedy(model, p, 16) for p in prompts]
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_chunked_prefill_changes_nothing(model):
    prompts = _prompts(seed=7, count=4, max_len=60)
    whole = LLMEngine(model, max_num_seqs=4, block_size=4, num_blocks=128, max_num_batched_tokens=256)
    chunked = LLMEngine(model, max_num_seqs=4, block_size=4, num_blocks=128, max_num_batched_tokens=5)
    expected = [o.outputs[0].token_ids for o in whole.generate(prompts, _greedy(6))]
    assert [o.outputs[0].token_ids for o in chunked.generate(prompts, _greedy(6))] == expected
    assert expected == [reference_greedy(model, p, 6) for p in prompts]


def test_everything_at_once_still_matches_full_recompute(model):
    """Shared prefixes + n=2 + a tiny pool (preemption) + a tiny token budget (chunking) + arrivals."""
    rng = random.Random(14)
    stem = [rng.randrange(VOCAB) for _ in range(18)]
    prompts = [stem[:rng.randint(0, 18)] + p for p in _prompts(seed=15, count=8, max_len=12)]
    params = [SamplingParams(n=1 + i % 2, temperature=0.0, max_tokens=rng.randint(3, 12)) for i in range(8)]
    engine = LLMEngine(model, max_num_seqs=5, block_size=4, num_blocks=11, max_num_batched_tokens=9)
    id_to_index, finished = {}, {}
    pending = list(range(8))
    while pending or engine.has_unfinished_requests():
        if pending and rng.random() < 0.7:
            index = pending.pop(0)
            id_to_index[engine.add_request(prompts[index], params[index])] = index
        for output in engine.step():
            if output.finished:
                finished[id_to_index[output.request_id]] = output
    for index, output in finished.items():
        expected = reference_greedy(model, prompts[index], params[index].max_tokens)
        assert [o.token_ids for o in output.outputs] == [expected] * params[index].n, index
    stats = engine.stats()
    assert stats.num_preemptions > 0 and stats.prefix_hit_rate > 0
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_seeded_sampling_is_reproducible_whatever_the_batch(model):
    params = SamplingParams(temperature=0.9, top_k=30, top_p=0.9, min_p=0.02, repetition_penalty=1.2,
                            presence_penalty=0.3, frequency_penalty=0.2, seed=1234, max_tokens=12)
    prompt = _prompts(seed=8, count=1)[0]
    alone = LLMEngine(model, max_num_seqs=4, block_size=4, num_blocks=128).generate([prompt], params)
    others = _prompts(seed=9, count=5)
    other_params = [SamplingParams(temperature=1.0, max_tokens=9, seed=None if i % 2 else i) for i in range(5)]
    crowded = LLMEngine(model, max_num_seqs=3, block_size=4, num_blocks=128, max_num_batched_tokens=7, seed=5)
    results = _run_with_arrivals(crowded, others + [prompt], other_params + [params], seed=10)
    assert results[5] == alone[0].outputs[0].token_ids
    unseeded = SamplingParams(temperature=1.0, max_tokens=12)
    draws = {tuple(LLMEngine(model, seed=s).generate([prompt], unseeded)[0].outputs[0].token_ids) for s in range(3)}
    assert len(draws) > 1  # without a seed, draws differ


def test_abort_frees_all_blocks(model):
    engine = LLMEngine(model, max_num_seqs=4, block_size=4, num_blocks=64, max_num_batched_tokens=8)
    ids = [engine.add_request(p, _greedy(50)) for p in _prompts(seed=11, count=6)]
    for _ in range(3):  # some decoding, some mid-prefill, some still waiting
        engine.step()
    assert engine.blocks.num_free_blocks < engine.blocks.num_blocks
    assert all(engine.abort(i) for i in ids)
    assert not engine.abort(ids[0])
    assert not engine.has_unfinished_requests() and not engine.running and not engine.waiting
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert engine.step() == []


def test_n_samples_share_the_prompt_blocks(model):
    prompt = list(range(10, 31))  # 21 tokens: 5 full blocks of 4 + 1
    engine = LLMEngine(model, max_num_seqs=4, block_size=4, num_blocks=64)
    out = engine.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    assert engine.blocks.hit_tokens == 2 * 20  # samples 1 and 2 reuse sample 0's full prompt blocks
    greedy = engine.generate([prompt], SamplingParams(n=2, temperature=0.0, max_tokens=8))[0]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids == reference_greedy(model, prompt, 8)


def test_stop_tokens_eos_and_lengths(model):
    prompt = _prompts(seed=12, count=1)[0]
    full = reference_greedy(model, prompt, 12)
    engine = LLMEngine(model, block_size=4, num_blocks=64)
    stop_at = full[4]
    out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_at]))[0]
    cut = full[: full.index(stop_at) + 1]
    assert out.outputs[0].token_ids == cut and out.outputs[0].finish_reason == "stop"
    assert out.outputs[0].stop_reason == stop_at
    out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=5))[0]
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 5
    banned = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_at],
                                                      min_tokens=12))[0]
    assert stop_at not in banned.outputs[0].token_ids and len(banned.outputs[0].token_ids) == 12
    eos_model = _random_model(eos_token_id=full[2])
    eos_out = LLMEngine(eos_model, block_size=4).generate([prompt], SamplingParams(temperature=0, max_tokens=12))[0]
    assert eos_out.outputs[0].token_ids == full[: full.index(full[2]) + 1]
    short = LLMEngine(model, block_size=4, max_model_len=len(prompt) + 3)
    assert len(short.generate([prompt], _greedy(12))[0].outputs[0].token_ids) == 3


def test_logprobs_are_the_models_log_softmax(model):
    prompt = _prompts(seed=13, count=1)[0]
    out = LLMEngine(model, block_size=4).generate(
        [prompt], SamplingParams(temperature=0, max_tokens=4, logprobs=True, top_logprobs=3))[0].outputs[0]
    ids = prompt + out.token_ids
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids]))[0], dim=-1)
    for step, entry in enumerate(out.logprobs):
        row = logprobs[len(prompt) - 1 + step]
        assert entry.token_id == out.token_ids[step]
        assert entry.logprob == pytest.approx(float(row[entry.token_id]), abs=1e-4)
        assert list(entry.top_logprobs) == row.topk(3).indices.tolist()
    assert out.cumulative_logprob == pytest.approx(sum(e.logprob for e in out.logprobs), abs=1e-5)


def test_streamed_text_adds_up_and_stops_on_a_stop_string(model):
    from lmforge.tokenizer import TokenizerConfig, train_tokenizer

    tokenizer = train_tokenizer(["abc def ghi 你好 😀"] * 20, TokenizerConfig(vocab_size=300, min_frequency=1))
    engine = LLMEngine(_random_model(vocab_size=tokenizer.vocab_size), tokenizer, block_size=4)
    greedy = dict(temperature=0, max_tokens=20, skip_special_tokens=False, ignore_eos=True)
    request_id = engine.add_request("abc", SamplingParams(**greedy))
    streamed, final = "", None
    while engine.has_unfinished_requests():
        for output in engine.step():
            streamed += output.outputs[0].new_text
            final = output
    assert final.request_id == request_id and streamed == final.outputs[0].text
    assert final.outputs[0].text == tokenizer.decode(final.outputs[0].token_ids)
    assert final.metrics.ttft > 0 and final.metrics.tpot > 0
    stop = final.outputs[0].text[3:5]
    if stop:
        stopped = engine.generate(["abc"], SamplingParams(stop=[stop], **greedy))[0].outputs[0]
        assert stopped.finish_reason == "stop" and stopped.stop_reason == stop
        assert stopped.text == final.outputs[0].text[: final.outputs[0].text.index(stop)]


def test_bad_requests_are_refused_with_the_field_named(model):
    from lmforge.core.errors import ConfigError

    engine = LLMEngine(model, block_size=4, max_model_len=32)
    for prompt, params, message in [
        ([1, 2], SamplingParams(top_p=0.0), "top_p"),
        ([1, 2], SamplingParams(logit_bias={VOCAB: 1.0}), "outside the vocabulary"),
        ([], None, "empty"),
        (list(range(32)), None, "max_model_len=32"),
        ("text", None, "tokenizer"),
        ([1, 2], SamplingParams(stop=["x"]), "tokenizer"),
    ]:
        with pytest.raises(ConfigError, match=message):
            engine.add_request(prompt, params)
    engine.add_request([1, 2], request_id="a")
    with pytest.raises(ConfigError, match="already in use"):
        engine.add_request([3], request_id="a")
    with pytest.raises(ConfigError, match="max_num_batched_tokens"):
        LLMEngine(model, max_num_seqs=8, max_num_batched_tokens=4)


# ---- the per-row sampler ------------------------------------------------------------------------------

def test_per_row_filters_match_the_scalar_filters():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    ks, ps, mins = [0, 5, 17], [1.0, 0.5, 0.9], [0.0, 0.1, 0.3]
    by_row = top_k_filter(logits, torch.tensor(ks))
    by_row_p = top_p_filter(logits, torch.tensor(ps))
    by_row_min = min_p_filter(logits, torch.tensor(mins))
    for i in range(3):
        assert torch.equal(by_row[i], top_k_filter(logits[i:i + 1], ks[i])[0])
        assert torch.equal(by_row_p[i], top_p_filter(logits[i:i + 1], ps[i])[0])
        assert torch.equal(by_row_min[i], min_p_filter(logits[i:i + 1], mins[i])[0])
    assert torch.isfinite(by_row_min[1]).sum() < 50 and torch.isfinite(by_row_min[0]).all()


def test_top_p_shortcut_over_the_most_likely_tokens_equals_a_full_sort():
    def by_full_sort(row: torch.Tensor, p: float) -> torch.Tensor:
        probs, order = torch.sort(torch.softmax(row, -1), descending=True)
        kept = order[(probs.cumsum(-1) - probs) < p]
        return torch.zeros_like(row, dtype=torch.bool).index_fill_(0, kept, True)

    generator = torch.Generator().manual_seed(1)
    peaked = torch.randn(3, 3000, generator=generator) * 6.0  # nucleus within the top 64 / 1024
    flat = torch.randn(2, 3000, generator=generator) * 0.1    # nucleus needs the full sort
    for logits in (peaked, flat, torch.cat([peaked, flat])):
        ps = torch.tensor([0.5, 0.9, 1.0, 0.95, 0.3][: len(logits)])
        kept = torch.isfinite(top_p_filter(logits, ps))
        for i, p in enumerate(ps.tolist()):
            assert torch.equal(kept[i], by_full_sort(logits[i], p) if p < 1 else torch.ones(3000, dtype=torch.bool))


def test_sample_rows_penalties_bias_and_draw_distribution():
    logits = torch.tensor([[2.0, 1.0, -1.0, 0.0]])
    rep = sample_rows(logits, [RowSampling(repetition_penalty=4.0, prompt_token_ids=[0])])
    assert rep.token_ids == [1]  # 2.0 / 4 = 0.5 < 1.0
    freq = sample_rows(logits, [RowSampling(frequency_penalty=0.6, output_token_ids=[0, 0])])
    assert freq.token_ids == [1]  # 2.0 - 1.2 = 0.8 < 1.0
    assert sample_rows(logits, [RowSampling(logit_bias={2: 5.0})]).token_ids == [2]
    assert sample_rows(logits, [RowSampling(banned_token_ids=[0, 1])]).token_ids == [3]
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    row = RowSampling(temperature=1.0, generator=torch.Generator().manual_seed(0))
    draws = sample_rows(probs.log().expand(4000, 4).contiguous(), [row] * 4000).token_ids
    freqs = torch.bincount(torch.tensor(draws), minlength=4).float() / 4000
    assert torch.allclose(freqs, probs, atol=0.03)
