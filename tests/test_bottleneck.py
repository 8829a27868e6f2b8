"""Bottleneck (Houlsby / Pfeiffer) adapters: placement, zero-init start, training, save/load, refusals, CLI run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.core.errors import CheckpointError, ConfigError
from lmforge.model import Transformer
from lmforge.peft import (AdapterConfig, BottleneckLayer, adapter_rows, apply_adapter, disable_adapters,
                          load_adapter, merge_and_unload, param_groups, save_adapter, set_adapter, add_adapter)
from lmforge.train.config import TrainConfig
from lmforge.train.optim import build_optimizer

from conftest import finetune_args as _args
from conftest import redrawn_llama

pytestmark = pytest.mark.usefixtures("restore_threads")


@pytest.fixture(scope="module")
def base(sft_base) -> dict:
    return sft_base


VOCAB = 61


def tiny_model(seed: int = 0) -> Transformer:
    return redrawn_llama(VOCAB, 32, 48, seed, std=0.2)


def ids(batch: int = 3, length: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomise(model, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adapter_up" in name or "adapter_down" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)


@pytest.mark.parametrize("placement,targets", [("pfeiffer", ["mlp.down_proj"]),
                                               ("houlsby", ["self_attn.o_proj", "mlp.down_proj"])])
def test_placement_sizes_and_zero_init_start_equal_to_base(placement, targets):
    model = apply_adapter(tiny_model(), AdapterConfig(method="bottleneck", reduction_factor=4, placement=placement),
                          log=None)
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, BottleneckLayer))
    assert wrapped == sorted(f"model.layers.{i}.{t}" for i in range(2) for t in targets)
    layer = model.get_submodule(wrapped[0])
    assert layer.adapter_down["default"].weight.shape == (8, 32)  # 32 / 4
    assert torch.count_nonzero(layer.adapter_up["default"].weight) == 0
    with torch.no_grad():
        assert torch.equal(model(ids()), tiny_model()(ids()))
    sized = apply_adapter(tiny_model(), AdapterConfig(method="bottleneck", bottleneck_size=5), log=None)
    assert sized.get_submodule("model.layers.0.mlp.down_proj").adapter_up["default"].weight.shape == (32, 5)


@pytest.mark.parametrize("nonlinearity", ["relu", "gelu", "silu", "tanh"])
def test_training_changes_only_adapter_params(nonlinearity):
    model = apply_adapter(tiny_model(), AdapterConfig(method="bottleneck", placement="houlsby",
                                                      nonlinearity=nonlinearity), log=None).train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter_down." in n or ".adapter_up." in n for n in trainable)
    cfg = TrainConfig(lr=1e-2)
    optimizer = build_optimizer(model, cfg, param_groups(model, cfg.lr, cfg.weight_decay))
    batch = ids(4, 12)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = dict(model.named_parameters())
    assert not [n for n, p in trainable.items() if torch.equal(p, after[n])]
    assert all(torch.equal(p, after[n]) for n, p in frozen.items())


def test_save_load_reproduces_logits_and_config_is_lmforge_own(tmp_path):
    model = apply_adapter(tiny_model(), AdapterConfig(method="bottleneck", placement="houlsby", bottleneck_size=6,
                                                      nonlinearity="gelu"), log=None)
    randomise(model)
    with torch.no_grad():
        expected = model(ids())
        assert (expected - tiny_model()(ids())).abs().max() > 0.1
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "BOTTLENECK" and config["bottleneck_size"] == 6 and config["nonlinearity"] == "gelu"
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.o_proj.adapter_down.weight" in keys and len(keys) == 16
    fresh = load_adapter(tiny_model(), tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(ids()), expected)

    bad = json.loads((tmp_path / "adapter_config.json").read_text())
    bad["placement"] = "everywhere"
    (tmp_path / "adapter_config.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="placement"):
        load_adapter(tiny_model(), tmp_path)


def test_merge_refused_switching_rows_and_disable_work():
    model = apply_adapter(tiny_model(), AdapterConfig(method="bottleneck"), "a", log=None)
    add_adapter(model, AdapterConfig(method="bottleneck", bottleneck_size=3, nonlinearity="tanh"), "b")
    randomise(model)
    with torch.no_grad():
        out_a = model(ids())
        set_adapter(model, "b")
        out_b = model(ids())
        with disable_adapters(model):
            out_base = model(ids())
        with adapter_rows(model, ["a", None, "b"]):
            mixed = model(ids())
    assert torch.equal(out_base, tiny_model()(ids()).detach())
    torch.testing.assert_close(mixed[0], out_a[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[1], out_base[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[2], out_b[2], rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="cannot be merged"):
        merge_and_unload(model)
    with pytest.raises(ConfigError, match="one kind of adapter"):
        add_adapter(model, AdapterConfig(method="lora", target_modules=["down_proj"]), "c")


def test_adapter_finetune_cli_run_and_merge_refused_up_front(base, tmp_path):  # noqa: F811
    from lmforge.cli import main

    out = tmp_path / "adapter"
    assert main(["finetune", *_args(base, out, "finetune.method=adapter", "finetune.adapter_placement=houlsby",
                                    "finetune.adapter_size=8")]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "adapter" and 0 < summary["trainable_share"] < 0.2
    adapter = Path(summary["adapter_dir"])
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "BOTTLENECK"
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert any("adapter_up" in k and v.abs().sum() > 0 for k, v in tensors.items())  # it trained
    model = load_adapter(Transformer.from_pretrained(base["model"]), adapter).eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 17, 33, 2]]))).all()
    assert main(["finetune", *_args(base, tmp_path / "merge", "finetune.method=adapter", "finetune.merge=true")]) == 2
