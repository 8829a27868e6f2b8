"""lmforge.peft vs peft on transformers models: an adapter crosses in both directions with the same logits.

(a) an adapter made and saved by lmforge → `peft.PeftModel.from_pretrained(transformers_model, dir)`;
(b) an adapter made and saved by `peft` → `lmforge.peft.load_adapter(lmforge_model, dir)`.
Base weights are redrawn with std 0.5 and adapter weights randomised (B ≠ 0, IA3 ≠ 1, DoRA magnitudes
≠ ‖W‖), so a wrong key, scaling or formula shows up in the logits. fp32, max abs diff ≤ 1e-4.
"""
from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lmforge.model import Transformer  # noqa: E402
from lmforge.peft import AdapterConfig, apply_adapter, load_adapter, save_adapter  # noqa: E402

TOL = 1e-4
SHAPE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
KINDS = {"llama": "LlamaConfig", "qwen2": "Qwen2Config"}  # qwen2: q/k/v biases (DoRA and IA3 treat them specially)
METHODS = {  # name: (lmforge AdapterConfig kwargs, peft config)
    "lora": (dict(method="lora", r=4, alpha=8, target_modules="all-linear"),
             lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")),
    "rslora": (dict(method="lora", r=4, alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
               lambda: peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                                       target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")),
    "dora": (dict(method="dora", r=4, alpha=8, target_modules="all-linear"),
             lambda: peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules="all-linear",
                                     task_type="CAUSAL_LM")),
    "ia3": (dict(method="ia3"), lambda: peft.IA3Config(task_type="CAUSAL_LM")),
}


def redraw(module: torch.nn.Module, seed: int, std: float = 0.5) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)


def randomise_adapter(model: torch.nn.Module, seed: int) -> None:
    """Shift every adapter parameter (names are the same in both libraries) away from its init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or "ia3_l" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)


@pytest.fixture(scope="module", params=list(KINDS))
def base_dir(request, tmp_path_factory):
    """A random transformers model of each kind saved as an HF directory (weights at std 0.5)."""
    config = getattr(transformers, KINDS[request.param])(**SHAPE)
    config.bos_token_id, config.eos_token_id = 1, 2
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    redraw(model, seed=0)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return path


def hf_model(path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def input_ids() -> torch.Tensor:
    return torch.randint(0, SHAPE["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", list(METHODS))
def test_our_adapter_loads_in_peft_with_same_logits(method, base_dir, tmp_path):
    ours = apply_adapter(Transformer.from_pretrained(base_dir).eval(), AdapterConfig(**METHODS[method][0]), log=None)
    randomise_adapter(ours, seed=2)
    save_adapter(ours, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.PeftModel.from_pretrained(hf_model(base_dir), tmp_path).eval()
    ids = input_ids()
    with torch.no_grad():
        expected, got = reference(ids).logits, ours(ids)
        base = hf_model(base_dir)(ids).logits
    diff = (got - expected).abs().max().item()
    print(f"lmforge -> peft [{base_dir.name} {method}]: max abs diff {diff:.2e} "
          f"(adapter moves logits by {(expected - base).abs().max().item():.2f})")
    assert (expected - base).abs().max().item() > 0.1  # peft really applied the adapter
    assert diff <= TOL


@pytest.mark.parametrize("method", list(METHODS))
def test_peft_adapter_loads_in_lmforge_with_same_logits(method, base_dir, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(hf_model(base_dir), METHODS[method][1]()).eval()
        randomise_adapter(reference, seed=3)
        reference.save_pretrained(tmp_path)
    ours = load_adapter(Transformer.from_pretrained(base_dir).eval(), tmp_path)
    ids = input_ids()
    with torch.no_grad():
        expected, got = reference(ids).logits, ours(ids)
        base = hf_model(base_dir)(ids).logits
    diff = (got - expected).abs().max().item()
    print(f"peft -> lmforge [{base_dir.name} {method}]: max abs diff {diff:.2e} "
          f"(adapter moves logits by {(expected - base).abs().max().item():.2f})")
    assert (expected - base).abs().max().item() > 0.1
    assert diff <= TOL
