"""lmforge.model vs transformers: same logits (fp32, max abs diff <= 1e-4) and the same greedy tokens.

Weights are redrawn with std 0.5 (norms and biases too): the default init's tiny weights make every
model look alike and hide RoPE, bias, window and routing mistakes.
"""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.infer import generate  # noqa: E402
from lmforge.model import ModelConfig, Transformer  # noqa: E402

TOL = 1e-4
SEQ = 20
SHAPE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)

CASES = {
    "llama": ("LlamaConfig", dict(num_key_value_heads=4)),
    "llama-gqa": ("LlamaConfig", {}),
    "llama-mqa": ("LlamaConfig", dict(num_key_value_heads=1)),
    "llama-tied": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "llama-bias": ("LlamaConfig", dict(attention_bias=True)),
    "qwen2": ("Qwen2Config", {}),
    "qwen2-tied": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "mistral-window": ("MistralConfig", dict(sliding_window=8)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    "rope-linear": ("LlamaConfig", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0})),
    "rope-dynamic": ("LlamaConfig", dict(max_position_embeddings=12,
                                         rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 500.0})),
    "rope-yarn": ("LlamaConfig", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 500.0,
                                                       "original_max_position_embeddings": 16})),
    "rope-llama3": ("LlamaConfig", dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 500.0,
                                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 32})),
}


def redraw(module: torch.nn.Module, seed: int, std: float = 0.5) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)


def hf_model(kind: str, seed: int = 0):
    class_name, extra = CASES[kind]
    config = getattr(transformers, class_name)(**{**SHAPE, **extra})
    if class_name == "Qwen2Config":
        config.bos_token_id, config.eos_token_id = 1, 2
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    redraw(model, seed)
    return model


def input_ids(batch: int = 2, length: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, SHAPE["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("kind", list(CASES))
def test_hf_checkpoint_loads_with_same_logits_and_greedy_tokens(kind, tmp_path):
    reference = hf_model(kind)
    reference.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path)
    ids = input_ids()
    # Generate first: HF's dynamic RoPE keeps the frequencies of the longest sequence it has seen.
    prompt = ids[:1, :12]
    eos = reference.generation_config.eos_token_id
    hf_tokens = reference.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)[0, 12:].tolist()
    assert generate(ours, prompt, max_new_tokens=8, eos_token_id=eos) == [hf_tokens]

    with torch.no_grad():
        expected = reference(ids).logits
        got = ours(ids)
    diff = max_diff(got, expected)
    print(f"{kind}: max |logits diff| = {diff:.2e} (logit scale {expected.abs().max().item():.1f})")
    assert diff <= TOL


def test_sharded_hf_checkpoint_loads(tmp_path):
    reference = hf_model("llama-gqa")
    reference.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = Transformer.from_pretrained(tmp_path)
    ids = input_ids()
    with torch.no_grad():
        assert max_diff(ours(ids), reference(ids).logits) <= TOL


def test_mixtral_saved_in_published_key_layout(tmp_path):
    hf_model("mixtral").save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path)
    out = tmp_path / "ours"
    ours.save_pretrained(out)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert keys == set(f.keys())
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in keys
    assert "model.layers.1.block_sparse_moe.gate.weight" in keys


OUR_CASES = {
    "llama": dict(model_type="llama", num_kv_heads=2),
    "llama-tied-yarn": dict(model_type="llama", tie_word_embeddings=True, rope_scaling={
        "rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}),
    "qwen2": dict(model_type="qwen2", attention_bias=True, tie_word_embeddings=True),
    "qwen2-window": dict(model_type="qwen2", attention_bias=True, sliding_window=6, max_window_layers=1),
    "mistral": dict(model_type="mistral", sliding_window=7, num_kv_heads=1),
    "mixtral": dict(model_type="mixtral", num_experts=4, num_experts_per_tok=2),
}


@pytest.mark.parametrize("kind", list(OUR_CASES))
def test_our_checkpoint_loads_in_transformers_with_same_logits(kind, tmp_path):
    shape = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                 num_kv_heads=4, max_position_embeddings=64)
    config = ModelConfig(**{**shape, **OUR_CASES[kind]})
    torch.manual_seed(0)
    ours = Transformer(config).eval()
    redraw(ours, seed=3)
    ours.save_pretrained(tmp_path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reference).__name__.lower().startswith(config.model_type)
    ids = input_ids()
    with torch.no_grad():
        diff = max_diff(ours(ids), reference(ids).logits)
    print(f"ours->hf {kind}: max |logits diff| = {diff:.2e}")
    assert diff <= TOL


def test_old_config_layout_top_level_rope_theta_and_rope_scaling(tmp_path):
    reference = hf_model("llama-gqa")
    reference.save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    hf = json.loads(config_file.read_text())
    hf.pop("rope_parameters")
    hf.update(rope_theta=5000.0, rope_scaling={"type": "linear", "factor": 2.0})
    config_file.write_text(json.dumps(hf))

    ours = Transformer.from_pretrained(tmp_path)
    assert ours.config.rope_theta == 5000.0
    assert ours.config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.rope_parameters["rope_theta"] == 5000.0
    ids = input_ids()
    with torch.no_grad():
        diff = max_diff(ours(ids), reloaded(ids).logits)
    print(f"old layout: max |logits diff| = {diff:.2e}")
    assert diff <= TOL
