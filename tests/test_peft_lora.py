"""lmforge.peft on lmforge models: training touches only adapters, save/load, merge, switching, LoRA+, errors.

Base weights are redrawn with std 0.1-0.2 (the default 0.02 init makes every adapter look harmless) and
adapter weights are randomised (B non-zero), so every comparison below compares outputs that differ.
"""
from __future__ import annotations

import json
import warnings

import pytest
from conftest import redrawn_llama
import torch
from safetensors.torch import load_file, save_file

from lmforge.core.errors import CheckpointError, ConfigError
from lmforge.model import Transformer
from lmforge.peft import (AdapterConfig, IA3Linear, LoraLinear, add_adapter, adapter_rows, apply_adapter,
                          delete_adapter, disable_adapters, find_targets, load_adapter, merge_adapter,
                          merge_and_unload, param_groups, save_adapter, set_adapter, trainable_parameters,
                          unmerge_adapter)
from lmforge.peft.base import AdapterLayer
from lmforge.train.config import TrainConfig
from lmforge.train.optim import build_optimizer

VOCAB = 61
METHODS = {
    "lora": dict(method="lora", r=4, alpha=8, dropout=0.1),
    "rslora": dict(method="lora", r=8, alpha=4, use_rslora=True),
    "dora": dict(method="dora", r=4, alpha=8, dropout=0.1),
    "ia3": dict(method="ia3"),
}


def tiny_model(seed: int = 0, model_type: str = "llama", std: float = 0.2, **extra) -> Transformer:
    """A 2-layer model with weights redrawn at `std` (same seed → same weights)."""
    return redrawn_llama(VOCAB, 32, 48, seed, std=std, model_type=model_type, **extra)


def randomise_adapters(model: torch.nn.Module, seed: int, names: tuple[str, ...] = ("default",)) -> None:
    """Move every parameter of the named adapters away from its init (B ≠ 0, IA3 ≠ 1, magnitudes ≠ ‖W‖)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(f".{n}." in name + "." for n in names) and ("lora_" in name or "ia3_l" in name):
                param.add_(torch.randn(param.shape, generator=generator) * 0.15)


def input_ids(batch: int = 3, length: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def base_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if "lora_" not in n and "ia3_l" not in n and "modules_to_save" not in n}


@pytest.mark.parametrize("method", list(METHODS))
def test_training_changes_only_the_adapter(method):
    model = apply_adapter(tiny_model(), AdapterConfig(**METHODS[method], target_modules="all-linear"), log=None)
    model.train()
    before_base = base_params(model)
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert adapter and all("lora_" in n or "ia3_l" in n for n in adapter)
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    optimizer = build_optimizer(model, cfg, param_groups(model, cfg.lr, cfg.weight_decay))
    ids = input_ids(4, 12)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = dict(model.named_parameters())
    unchanged = [n for n, p in adapter.items() if torch.equal(p, after[n])]
    assert not unchanged, f"adapter parameters did not train: {unchanged[:3]}"
    for name, param in base_params(model).items():
        assert torch.equal(param, before_base[name]), f"base parameter {name} changed"


PEFT_CASES = {
    "lora": (dict(method="lora", r=4, alpha=8), dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "rslora": (dict(method="lora", r=4, alpha=8, use_rslora=True),
               dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"])),
    "dora": (dict(method="dora", r=4, alpha=8),
             dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"])),
    "all-linear": (dict(method="lora", r=2, alpha=4, target_modules="all-linear"),
                   dict(r=2, lora_alpha=4, target_modules="all-linear")),
    "modules_to_save": (dict(method="lora", r=4, alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
                        dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])),
    "ia3": (dict(method="ia3"), None),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_targets_counts_and_config_match_peft(case, tmp_path):
    """Same targeted modules, trainable/total counts and adapter_config.json values as peft on transformers."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    ours_kwargs, lora_kwargs = PEFT_CASES[case]
    hf_config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config)
    hf.save_pretrained(tmp_path / "base")
    peft_config = (peft.IA3Config(task_type="CAUSAL_LM") if lora_kwargs is None
                   else peft.LoraConfig(task_type="CAUSAL_LM", **lora_kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(hf, peft_config)
        reference.save_pretrained(tmp_path / "peft")
    model = apply_adapter(Transformer.from_pretrained(tmp_path / "base"), AdapterConfig(**ours_kwargs), log=None)
    ours_targets = {n for n, m in model.named_modules() if isinstance(m, (LoraLinear, IA3Linear))}
    assert ours_targets == set(reference.base_model.targeted_module_names)
    assert trainable_parameters(model) == reference.get_nb_trainable_parameters()

    save_adapter(model, tmp_path / "ours")
    ours_json = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_json = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(ours_json) <= set(peft_json), sorted(set(ours_json) - set(peft_json))
    for key, value in ours_json.items():
        expected = peft_json[key]
        if isinstance(value, list) and isinstance(expected, list):
            value, expected = sorted(value), sorted(expected)
        assert value == expected, f"adapter_config.json {key}: ours {value!r}, peft {expected!r}"
    ours_keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert ours_keys == set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))


def test_all_linear_targets_every_block_linear_but_not_lm_head():
    model = tiny_model()
    targets = find_targets(model, AdapterConfig(target_modules="all-linear"))
    per_layer = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert sorted(targets) == sorted(f"model.layers.{i}.{p}" for i in range(2) for p in per_layer)
    regex = find_targets(model, AdapterConfig(target_modules=r".*\.(q|v)_proj"))  # peft: a string is a regex
    assert regex == find_targets(model, AdapterConfig(target_modules=["q_proj", "v_proj"])) and len(regex) == 4
    excluded = find_targets(model, AdapterConfig(target_modules="all-linear", exclude_modules=["down_proj"]))
    assert len(excluded) == 12 and not any(t.endswith("down_proj") for t in excluded)


@pytest.mark.parametrize("method", list(METHODS))
def test_save_then_load_into_fresh_model_reproduces_logits_exactly(method, tmp_path):
    model = apply_adapter(tiny_model(), AdapterConfig(**METHODS[method], target_modules="all-linear"), log=None)
    randomise_adapters(model, seed=3)
    ids = input_ids()
    expected = logits(model, ids)
    save_adapter(model, tmp_path)
    fresh = load_adapter(tiny_model(), tmp_path)
    assert torch.equal(logits(fresh, ids), expected)
    assert not torch.equal(logits(tiny_model(), ids), expected)  # the adapter does change the output


@pytest.mark.parametrize("method", list(METHODS))
def test_merge_matches_adapter_and_unmerge_restores_base(method, tmp_path):
    # qwen2: q/k/v biases, so IA3's output scaling of the bias is exercised by merging too. Weights at std
    # 0.1 keep logits ~O(1), where fp32 rounding of W + ΔW stays well inside the 1e-5 bound.
    model = tiny_model(model_type="qwen2", attention_bias=True, std=0.1)
    originals = base_params(model)
    apply_adapter(model, AdapterConfig(**METHODS[method], target_modules="all-linear"), log=None)
    randomise_adapters(model, seed=4)
    ids = input_ids()
    adapted = logits(model, ids)
    with disable_adapters(model):
        assert (logits(model, ids) - adapted).abs().max().item() > 0.1  # the adapter matters

    merge_adapter(model)  # keep_original=True: the original tensors are kept aside
    merged = logits(model, ids)
    print(f"{method}: merged vs adapted max abs diff {(merged - adapted).abs().max().item():.2e}")
    assert (merged - adapted).abs().max().item() <= 1e-5
    with pytest.raises(ConfigError):
        set_adapter(model, "other")
    unmerge_adapter(model)
    for name, param in base_params(model).items():
        assert torch.equal(param, originals[name.replace(".base_layer", "")]), f"{name} not restored exactly"
    assert torch.equal(logits(model, ids), adapted)

    merge_adapter(model, keep_original=False)  # arithmetic inverse: equal up to rounding
    unmerge_adapter(model)
    for name, param in base_params(model).items():
        torch.testing.assert_close(param, originals[name.replace(".base_layer", "")], rtol=1e-5, atol=1e-6)

    plain = merge_and_unload(model)
    assert type(plain) is Transformer and not any(isinstance(m, AdapterLayer) for m in plain.modules())
    assert not hasattr(plain, "peft_state") and all(p.requires_grad for p in plain.parameters())
    assert (logits(plain, ids) - adapted).abs().max().item() <= 1e-5
    plain.save_pretrained(tmp_path)
    assert torch.equal(logits(Transformer.from_pretrained(tmp_path), ids), logits(plain, ids))


def test_two_adapters_switch_per_call_and_mix_per_row(tmp_path):
    model = tiny_model()
    apply_adapter(model, AdapterConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), "a", log=None)
    add_adapter(model, AdapterConfig(r=2, alpha=4, target_modules="all-linear"), "b")
    randomise_adapters(model, seed=5, names=("a", "b"))
    ids = input_ids()
    set_adapter(model, "a")
    out_a = logits(model, ids)
    assert all(p.requires_grad == (".a." in n) for n, p in model.named_parameters())
    set_adapter(model, "b")
    out_b = logits(model, ids)
    with disable_adapters(model):
        out_base = logits(model, ids)
    assert torch.equal(out_base, logits(tiny_model(), ids))
    assert not torch.allclose(out_a, out_b) and not torch.allclose(out_a, out_base)
    set_adapter(model, "a")
    assert torch.equal(logits(model, ids), out_a)

    for name, expected in (("a", out_a), ("b", out_b)):  # each adapter alone, saved and reloaded, agrees
        save_adapter(model, tmp_path / name, name)
        assert torch.equal(logits(load_adapter(tiny_model(), tmp_path / name), ids), expected)

    with adapter_rows(model, ["b", None, "a"]):  # one batch, three different adapters
        mixed = logits(model, ids)
    torch.testing.assert_close(mixed[0], out_b[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[1], out_base[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[2], out_a[2], rtol=0, atol=1e-5)

    delete_adapter(model, "b")
    delete_adapter(model, "a")
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_loraplus_groups_put_b_at_lr_times_ratio():
    model = apply_adapter(tiny_model(), AdapterConfig(method="dora", target_modules=["q_proj", "down_proj"]), log=None)
    groups = param_groups(model, lr=1e-3, weight_decay=0.1, loraplus_lr_ratio=16)
    where = {id(p): g for g in groups for p in g["params"]}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert id(param) not in where
            continue
        group = where[id(param)]
        fast = ".lora_B." in name or ".lora_magnitude_vector." in name
        assert group["lr"] == pytest.approx(1e-3 * 16 if fast else 1e-3), name
        assert group["weight_decay"] == (0.0 if param.ndim < 2 else 0.1), name
    assert groups[0]["lr"] == 1e-3
    optimizer = build_optimizer(model, TrainConfig(lr=1e-3), groups)
    assert sorted({g["lr"] for g in optimizer.param_groups}) == pytest.approx([1e-3, 1.6e-2])
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())


def test_load_refuses_pickle_weights_missing_keys_and_unsupported_config(tmp_path):
    model = apply_adapter(tiny_model(), AdapterConfig(target_modules=["q_proj", "v_proj"]), log=None)
    save_adapter(model, tmp_path / "good")
    config = (tmp_path / "good" / "adapter_config.json").read_text()
    tensors = load_file(tmp_path / "good" / "adapter_model.safetensors")

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(config)
    (pickled / "adapter_model.bin").write_bytes(b"not even read")
    with pytest.raises(CheckpointError, match="adapter_model.bin.*refused"):
        load_adapter(tiny_model(), pickled)

    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "adapter_config.json").write_text(config)
    dropped = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    save_file({k: v for k, v in tensors.items() if k != dropped}, missing / "adapter_model.safetensors")
    fresh = tiny_model()
    with pytest.raises(CheckpointError, match=f"adapter_model.safetensors.*{dropped}"):
        load_adapter(fresh, missing)
    assert not hasattr(fresh, "peft_state") and not any(isinstance(m, AdapterLayer) for m in fresh.modules())

    wrong = tmp_path / "wrong_shape"
    wrong.mkdir()
    (wrong / "adapter_config.json").write_text(config.replace('"r": 8', '"r": 2'))
    save_file(tensors, wrong / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="shape"):
        load_adapter(tiny_model(), wrong)

    unsupported = tmp_path / "unsupported"
    unsupported.mkdir()
    rank_pattern = config.replace('"rank_pattern": {}', '"rank_pattern": {"q_proj": 2}')
    (unsupported / "adapter_config.json").write_text(rank_pattern)
    save_file(tensors, unsupported / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="rank_pattern"):
        load_adapter(tiny_model(), unsupported)
