"""Multi-LoRA in LLMEngine: requests for different adapters and for the base model run batched in one
model call, and each gets exactly what a model with its adapter merged in (merge_and_unload) generates
alone; the prefix cache never hands one adapter's KV blocks to another."""
from __future__ import annotations

import copy
import random

import pytest
from conftest import reference_greedy
import torch

from lmforge.core.errors import ConfigError
from lmforge.infer.engine import LLMEngine
from lmforge.infer.request import SamplingParams
from lmforge.model import ModelConfig, Transformer
from lmforge.peft import AdapterConfig, add_adapter, load_adapter, merge_and_unload, save_adapter
from lmforge.peft.base import AdapterLayer

VOCAB = 97
ADAPTERS = {  # three kinds, one of them also on the output head
    "alpha": AdapterConfig(method="lora", r=4, alpha=8, target_modules="all-linear"),
    "beta": AdapterConfig(method="dora", r=4, alpha=8, target_modules=["q_proj", "v_proj", "lm_head"]),
    "gamma": AdapterConfig(method="lora", r=8, alpha=4, use_rslora=True, target_modules=["o_proj", "down_proj"]),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads cost more than they give


@pytest.fixture(scope="module")
def base() -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                         num_kv_heads=2, eos_token_id=None, max_position_embeddings=256)
    model = Transformer(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="module")
def adapter_dirs(base, tmp_path_factory) -> dict[str, str]:
    """Each adapter saved in PEFT layout, with random non-zero B (so it changes the output)."""
    root = tmp_path_factory.mktemp("adapters")
    generator = torch.Generator().manual_seed(5)
    dirs = {}
    for name, cfg in ADAPTERS.items():
        model = add_adapter(copy.deepcopy(base), cfg, "default", activate=True)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_" in param_name:
                    param.add_(torch.randn(param.shape, generator=generator) * 0.3)
        dirs[name] = str(save_adapter(model, root / name))
    return dirs


@pytest.fixture(scope="module")
def merged(base, adapter_dirs) -> dict[str | None, Transformer]:
    """The base model, and per adapter a copy of it with the adapter merged in and the wrappers gone."""
    models: dict[str | None, Transformer] = {None: base}
    for name, path in adapter_dirs.items():
        model = merge_and_unload(load_adapter(copy.deepcopy(base), path))
        assert not any(isinstance(m, AdapterLayer) for m in model.modules())
        models[name] = model
    return models


def _engine(base, adapter_dirs, **kwargs) -> LLMEngine:
    kwargs.setdefault("max_num_seqs", 8)
    engine = LLMEngine(copy.deepcopy(base), None, **kwargs)
    for name, path in adapter_dirs.items():
        engine.add_lora(name, path)
    return engine


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens)


def test_adapters_change_the_output(merged):
    prompt = list(range(10, 22))
    outputs = {name: tuple(reference_greedy(model, prompt, 8)) for name, model in merged.items()}
    assert len(set(outputs.values())) == len(outputs)


@pytest.mark.parametrize("budget", [512, 12], ids=["whole-prompts", "chunked-prefill"])
def test_mixed_batch_equals_each_adapter_merged_and_run_alone(base, adapter_dirs, merged, budget):
    engine = _engine(base, adapter_dirs, max_num_batched_tokens=budget)
    calls: list[set] = []
    rows = engine.loras.rows
    engine.loras.rows = lambda names, *args: calls.append(set(names)) or rows(names, *args)
    rng = random.Random(3)
    choices = [None, "alpha", "beta", None, "gamma", "alpha", "beta", "gamma", None]
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randint(3, 30))] for _ in choices]
    pending = list(range(len(prompts)))
    ids, results = {}, {}
    while pending or engine.has_unfinished_requests():
        for _ in range(rng.randint(0, 2)):  # requests arrive while others run
            if pending:
                i = pending.pop(0)
                ids[engine.add_request(prompts[i], _greedy(10), lora=choices[i])] = i
        for output in engine.step():
            if output.finished:
                results[ids[output.request_id]] = output.outputs[0].token_ids
    for i, name in enumerate(choices):
        assert results[i] == reference_greedy(merged[name], prompts[i], 10), (i, name)
    assert max(len(c) for c in calls) >= 3  # base and several adapters shared one model call


def test_generate_takes_one_adapter_or_one_per_prompt(base, adapter_dirs, merged):
    engine = _engine(base, adapter_dirs)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    for lora in (None, "gamma", ["beta", None]):
        names = lora if isinstance(lora, list) else [lora] * len(prompts)
        outputs = engine.generate(prompts, _greedy(6), lora=lora)
        assert [o.outputs[0].token_ids for o in outputs] == [reference_greedy(merged[n], p, 6)
                                                             for n, p in zip(names, prompts)]


def test_prefix_cache_is_never_shared_across_adapters(base, adapter_dirs, merged):
    engine = _engine(base, adapter_dirs, block_size=4)
    prompt = list(range(40, 60))  # 20 tokens: 4 full blocks can be reused (the last token is recomputed)

    def run(lora):
        output = None
        request_id = engine.add_request(prompt, _greedy(5), lora=lora)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id == request_id and out.finished:
                    output = out
        assert output.outputs[0].token_ids == reference_greedy(merged[lora], prompt, 5)
        return output.metrics.num_cached_tokens

    assert run("alpha") == 0
    assert run("beta") == 0       # same tokens, other adapter: no hit
    assert run(None) == 0         # nor for the base model
    assert run("alpha") == 16     # the same adapter hits its own blocks
    assert run(None) == 16
    engine.remove_lora("alpha")
    engine.add_lora("alpha", adapter_dirs["alpha"])  # reloaded (could be new weights): old blocks are stale
    assert run("alpha") == 0


def test_adapter_registry_and_errors(base, adapter_dirs):
    engine = _engine(base, adapter_dirs)
    assert engine.lora_names() == ["alpha", "beta", "gamma"]
    with pytest.raises(ConfigError, match="unknown LoRA adapter 'delta'"):
        engine.add_request([1, 2, 3], _greedy(2), lora="delta")
    with pytest.raises(ConfigError, match="unknown LoRA adapter 'delta'"):
        engine.remove_lora("delta")
    with pytest.raises(ConfigError, match="already loaded"):
        engine.add_lora("alpha", adapter_dirs["beta"])
    request_id = engine.add_request([1, 2, 3], _greedy(4), lora="beta")
    with pytest.raises(ConfigError, match="in use"):
        engine.remove_lora("beta")
    engine.abort(request_id)
    for name in engine.lora_names():
        engine.remove_lora(name)
    assert engine.lora_names() == []
    assert not any(isinstance(m, AdapterLayer) for m in engine.model.modules())  # the plain model again
    assert engine.generate([[1, 2, 3]], _greedy(5))[0].outputs[0].token_ids == reference_greedy(base, [1, 2, 3], 5)


def test_engine_refuses_a_prompt_learning_adapter():
    from lmforge.peft.prompt_learning import PromptLearningConfig, add_prompt_adapter

    model = Transformer(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                    num_kv_heads=2, max_position_embeddings=64))
    add_prompt_adapter(model, PromptLearningConfig(method="prompt", num_virtual_tokens=4))
    with pytest.raises(ConfigError, match="prompt-learning"):
        LLMEngine(model)
