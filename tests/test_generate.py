"""Sampling filters and batched generation."""
from __future__ import annotations

import pytest
import torch

from lmforge.infer import generate, left_pad, sample, top_k_filter, top_p_filter
from lmforge.model import ModelConfig, Transformer


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [0.0, -1.0, 2.0, 1.0, 3.0]])
    kept = torch.isfinite(top_k_filter(logits, 2))
    assert kept.tolist() == [[False, True, False, True, False], [False, False, True, False, True]]
    assert torch.equal(top_k_filter(logits, 0), logits)


def test_top_p_keeps_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    assert torch.isfinite(top_p_filter(logits, 0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.79)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(top_p_filter(logits, 0.1)).tolist() == [[True, False, False, False]]
    shuffled = logits[:, [2, 0, 3, 1]]  # order in the vocab must not matter
    assert torch.isfinite(top_p_filter(shuffled, 0.7)).tolist() == [[False, True, False, True]]


def test_sampling_is_reproducible_with_a_seeded_generator_and_respects_filters():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    def draw(seed: int) -> torch.Tensor:
        return sample(logits, 1.0, top_k=5, top_p=0.9, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(1), draw(1))
    allowed = torch.isfinite(top_p_filter(top_k_filter(logits, 5), 0.9))
    for seed in range(20):
        assert allowed.gather(1, draw(seed)[:, None]).all()
    assert torch.equal(sample(logits, temperature=0.0), logits.argmax(-1))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=61, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                         num_kv_heads=2, model_type="mistral", sliding_window=6, eos_token_id=3)
    model = Transformer(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.5)
    return model


PROMPTS = [[5, 9, 11, 20, 7, 8, 30, 2], [4, 17], [40, 41, 42, 43, 44]]


def test_batched_generation_equals_one_at_a_time(model):
    batched = generate(model, PROMPTS, max_new_tokens=10)
    alone = [generate(model, [prompt], max_new_tokens=10)[0] for prompt in PROMPTS]
    assert batched == alone
    assert all(len(row) == 10 for row in batched)


def test_generation_stops_rows_at_eos(model):
    first = generate(model, PROMPTS, max_new_tokens=10)
    eos = first[1][2]  # pretend the third token of row 1 is EOS
    rows = generate(model, PROMPTS, max_new_tokens=10, eos_token_id=eos)
    for full, cut in zip(first, rows):
        expected = full[: full.index(eos) + 1] if eos in full else full
        assert cut == expected
    assert rows[1][-1] == eos and len(rows[1]) <= 3


def test_seeded_sampled_generation_is_reproducible(model):
    run = lambda: generate(model, PROMPTS, 8, temperature=0.8, top_k=20, top_p=0.9, seed=123)  # noqa: E731
    assert run() == run()
    assert generate(model, torch.tensor([[5, 9, 11]]), 4) == generate(model, [[5, 9, 11]], 4)


def test_left_pad_aligns_prompts_right():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
