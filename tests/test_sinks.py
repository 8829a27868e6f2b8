"""StreamingLLM attention-sink cache: equal to the plain cache below the window, endless beyond it."""
from __future__ import annotations

import pytest
import torch

from lmforge.core.errors import LMForgeError
from lmforge.infer import generate
from lmforge.model import ModelConfig, Transformer
from lmforge.model.kv_cache import SinkKVCache


def _model(**overrides) -> Transformer:
    torch.manual_seed(0)
    fields = dict(vocab_size=61, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                  max_position_embeddings=64)
    fields.update(overrides)
    model = Transformer(ModelConfig(**fields)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def model():
    return _model()


PROMPTS = [[5, 9, 11, 20, 7, 8, 30, 2], [4, 17, 3]]


def test_below_the_window_output_equals_the_plain_cache(model):
    plain = generate(model, PROMPTS, 20)
    assert generate(model, PROMPTS, 20, sink_window=40) == plain
    assert generate(model, [PROMPTS[0]], 20, sink_window=28) == [plain[0]]  # exactly full, no eviction
    sampled = dict(temperature=0.8, top_k=20, seed=5)
    assert generate(model, PROMPTS, 12, sink_window=40, **sampled) == generate(model, PROMPTS, 12, **sampled)


def test_generates_far_beyond_the_window_and_max_positions(model):
    out = generate(model, [PROMPTS[0]], 300, sink_window=24, num_sinks=4)
    assert len(out[0]) == 300  # 308 tokens through a 24-slot cache, past max_position_embeddings=64
    batched = generate(model, PROMPTS, 100, sink_window=24, num_sinks=2, temperature=1.0, seed=1)
    assert [len(row) for row in batched] == [100, 100]
    assert all(0 <= t < 61 for row in batched for t in row)


def test_a_prompt_longer_than_the_window_is_prefilled_in_chunks(model):
    prompt = [(7 * i) % 61 for i in range(90)]
    out = generate(model, [prompt], 10, sink_window=32)
    assert len(out[0]) == 10


def test_after_eviction_kept_keys_equal_keys_computed_at_their_new_slots(model):
    """Layer-0 keys depend only on token and position, so after evicting the middle the kept keys must be
    what a fresh run over the kept tokens gives: the re-rotation by minus the shift is exact."""
    tokens = [(5 * i + 3) % 61 for i in range(20)]
    cache = SinkKVCache.for_model(model, 1, capacity=20, num_sinks=3, evict_chunk=6)
    with torch.no_grad():
        model(torch.tensor([tokens]), kv_cache=cache)
        assert cache.make_room(1) == 6 and cache.length == 14
        kept = tokens[:3] + tokens[9:]
        fresh = SinkKVCache.for_model(model, 1, capacity=20, num_sinks=3)
        model(torch.tensor([kept]), kv_cache=fresh)
    torch.testing.assert_close(cache.keys[0][:, :, :14], fresh.keys[0][:, :, :14], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.values[0][:, :, :14], fresh.values[0][:, :, :14])


def test_alibi_and_sliding_window_models_run_past_the_window():
    alibi = _model(position_embedding="alibi")
    assert generate(alibi, [PROMPTS[0]], 12, sink_window=40) == generate(alibi, [PROMPTS[0]], 12)
    assert len(generate(alibi, [PROMPTS[0]], 80, sink_window=16)[0]) == 80
    mistral = _model(model_type="mistral", sliding_window=6)
    assert generate(mistral, [PROMPTS[0]], 12, sink_window=40) == generate(mistral, [PROMPTS[0]], 12)
    assert len(generate(mistral, [PROMPTS[0]], 80, sink_window=16)[0]) == 80


def test_refuses_dynamic_rope_and_a_window_without_room():
    dynamic = _model(rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(LMForgeError, match="dynamic"):
        generate(dynamic, [PROMPTS[0]], 4, sink_window=16)
    with pytest.raises(LMForgeError, match="sink_window"):
        generate(_model(), [PROMPTS[0]], 4, sink_window=5, num_sinks=4)
