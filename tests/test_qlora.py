"""NF4 4-bit store (codes, block quantisation, double quantisation, packing, Linear4bit) and QLoRA end to end.

Quantised results are checked against a straightforward per-block reference written here, and against the
NF4 table bitsandbytes publishes. QLoRA: LoRA on a 4-bit base trains only the adapter, saves a plain PEFT
LoRA adapter that reproduces the logits on a freshly quantised base, merges into the dequantised base, and
runs through `lmforge finetune ... finetune.method=qlora`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.model import ModelConfig, Transformer
from lmforge.model.nf4 import (NF4_CODES, Linear4bit, dequantize_nf4, nf4_storage, quantize_model_nf4,
                               quantize_nf4)
from lmforge.peft import (AdapterConfig, LoraLinear, apply_adapter, load_adapter, merge_and_unload, param_groups,
                          save_adapter)
from lmforge.peft.base import AdapterLayer
from lmforge.train.config import TrainConfig
from lmforge.train.optim import build_optimizer

from conftest import crash_during, step_losses
from conftest import finetune_args as _args
from conftest import redrawn_llama

pytestmark = pytest.mark.usefixtures("restore_threads")


@pytest.fixture(scope="module")
def base(sft_base) -> dict:
    return sft_base

# bitsandbytes' published NF4 table (functional.py, `get_4bit_type("nf4")`)
BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
           -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
           0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
           1.0]
VOCAB = 61


# ----- a plain reference implementation ------------------------------------------------------------------
def reference_quantize(weight: torch.Tensor, block: int = 64, double_quant: bool = False):
    """Per-block loops: absmax, nearest code by argmin, high nibble first; optional 8-bit absmax (block 256)."""
    flat = weight.reshape(-1).double().tolist()
    flat += [0.0] * (-len(flat) % block)
    codes, absmax = [], []
    table = NF4_CODES.double()
    for start in range(0, len(flat), block):
        values = torch.tensor(flat[start:start + block], dtype=torch.float64)
        scale = values.abs().max().item()
        absmax.append(scale)
        for v in values.tolist():
            codes.append(int(torch.argmin((table - (v / scale if scale else 0.0)).abs()).item()))
    packed = bytes((codes[i] << 4) | codes[i + 1] for i in range(0, len(codes), 2))
    absmax_t = torch.tensor(absmax, dtype=torch.float32)
    if not double_quant:
        return packed, absmax_t
    offset = absmax_t.mean()
    centred = (absmax_t - offset).tolist()
    restored = []
    for start in range(0, len(centred), 256):
        group = centred[start:start + 256]
        scale = max(abs(c) for c in group) / 127
        restored += [max(-127, min(127, round(c / scale))) * scale if scale else 0.0 for c in group]
    return packed, torch.tensor(restored, dtype=torch.float32) + offset


def reference_dequantize(packed: bytes, absmax: torch.Tensor, shape, block: int = 64) -> torch.Tensor:
    values = [NF4_CODES[(packed[j // 2] >> 4) if j % 2 == 0 else (packed[j // 2] & 15)].item()
              * absmax[j // block].item() for j in range(2 * len(packed))]
    return torch.tensor(values[:math.prod(shape)], dtype=torch.float32).view(shape)


# ----- the 4-bit store ------------------------------------------------------------------------------------
def test_nf4_codes_are_normal_quantiles_matching_bitsandbytes_table():
    assert NF4_CODES.shape == (16,) and NF4_CODES.dtype == torch.float32
    torch.testing.assert_close(NF4_CODES, torch.tensor(BNB_NF4), rtol=0, atol=1e-6)
    assert NF4_CODES[7].item() == 0.0 and NF4_CODES[0].item() == -1.0 and NF4_CODES[-1].item() == 1.0
    assert (NF4_CODES[8:] > 0).sum() == 8 and (NF4_CODES[:7] < 0).sum() == 7  # asymmetric: exact zero


@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_dequantize_matches_reference(double_quant):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(37, 45, generator=generator) * 0.05  # 1665 values: not a whole number of blocks
    weight[3, :] = 0.0  # an all-zero region: absmax 0 must not divide by zero
    ours = quantize_nf4(weight, double_quant=double_quant)
    ref_packed, ref_absmax = reference_quantize(weight, double_quant=double_quant)
    assert ours.packed.dtype == torch.uint8 and ours.packed.numel() == len(ref_packed) == 27 * 32
    assert bytes(ours.packed.tolist()) == ref_packed
    if double_quant:
        assert ours.absmax is None and ours.absmax_q.dtype == torch.int8 and ours.absmax_scale.numel() == 1
    restored = dequantize_nf4(ours)
    assert restored.shape == weight.shape and restored.dtype == torch.float32
    torch.testing.assert_close(restored, reference_dequantize(ref_packed, ref_absmax, weight.shape),
                               rtol=1e-6, atol=1e-7)
    assert torch.equal(dequantize_nf4(ours, torch.bfloat16), restored.to(torch.bfloat16))


@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantised_error_within_nf4_bound(double_quant):
    """|w − deq(w)| ≤ absmax_block · (largest half-gap between neighbouring codes) + the absmax's own error."""
    weight = torch.randn(512, 384, generator=torch.Generator().manual_seed(1)) * 0.02
    q = quantize_nf4(weight, double_quant=double_quant)
    error = (dequantize_nf4(q) - weight).abs().view(-1, 64)
    absmax = weight.abs().view(-1, 64).amax(dim=1)
    half_gap = ((NF4_CODES[1:] - NF4_CODES[:-1]) / 2).max().item()  # 0.152, between -1 and -0.696
    absmax_error = 0.0
    if double_quant:
        centred = absmax - absmax.mean()
        absmax_error = (centred.view(-1, 256).abs().amax(dim=1).max() / 254).item()  # half an int8 step
    bound = absmax[:, None] * half_gap + absmax_error + 1e-7
    assert bool((error <= bound).all())
    rel = (error.norm() / weight.norm()).item()
    print(f"double_quant={double_quant}: max abs error {error.max().item():.2e}, relative L2 error {rel:.4f}")
    assert rel < 0.12  # NF4 on normal weights: ~9-10%


def test_model_storage_under_30_percent_of_bf16_and_skips_head_embeddings_norms():
    torch.manual_seed(0)
    config = ModelConfig(model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=688, num_layers=2,
                         num_heads=4, num_kv_heads=4, max_position_embeddings=64)
    model = quantize_model_nf4(Transformer(config))
    stats = nf4_storage(model)
    print(f"NF4 storage: {stats}")
    assert stats["layers"] == 14 and stats["weights"] == 2 * (4 * 256 * 256 + 3 * 256 * 688)
    assert stats["code_bytes"] == stats["weights"] // 2
    assert stats["ratio_vs_bf16"] <= 0.30
    assert stats["ratio_vs_bf16"] == pytest.approx(0.2579, abs=0.001)  # 4 + 8/64 + 32/(64·256) bits over 16
    plain = nf4_storage(quantize_model_nf4(Transformer(config), double_quant=False))
    assert plain["ratio_vs_bf16"] == pytest.approx(4.5 / 16, abs=1e-3)
    assert type(model.lm_head) is not Linear4bit and model.model.embed_tokens.weight.dtype == torch.float32
    assert all(not isinstance(m, Linear4bit) for n, m in model.named_modules() if "norm" in n)
    assert not any("packed" in n for n, _ in model.named_parameters())  # 4-bit weights are buffers


def test_linear4bit_forward_backward_dtypes_and_state_dict():
    torch.manual_seed(0)
    dense = torch.nn.Linear(96, 80, bias=True)
    layer = Linear4bit.from_linear(dense)
    weight = layer.dequantize()
    x = torch.randn(3, 5, 96, requires_grad=True)
    out = layer(x)
    expected = x @ weight.t() + dense.bias
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    torch.testing.assert_close(x.grad, grad @ weight, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in layer.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    layer.to(torch.bfloat16)  # the fp32 constants must survive a module-wide cast
    assert layer.weight_absmax_scale.dtype == torch.float32 and torch.equal(layer.dequantize(), weight)
    fresh = Linear4bit(96, 80, bias=True)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.dequantize(), weight)


# ----- QLoRA ----------------------------------------------------------------------------------------------
def tiny_model(seed: int = 0) -> Transformer:
    return redrawn_llama(VOCAB, 64, 96, seed, std=0.1)


def qlora_model(seed: int = 0, **cfg) -> Transformer:
    model = quantize_model_nf4(tiny_model(seed))
    return apply_adapter(model, AdapterConfig(**{"r": 4, "alpha": 8, "target_modules": "all-linear", **cfg}), log=None)


def ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def buffers(model) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers() if ".weight_" in n}


def test_qlora_trains_only_the_adapter_and_leaves_4bit_base_bytes_unchanged():
    model = qlora_model().train()
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert len(layers) == 14 and all(isinstance(m.base_layer, Linear4bit) for m in layers)
    before = buffers(model)
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert adapter and all("lora_" in n for n in adapter)
    cfg = TrainConfig(lr=1e-2)
    optimizer = build_optimizer(model, cfg, param_groups(model, cfg.lr, cfg.weight_decay))
    batch = ids(4, 16)
    losses = []
    for _ in range(4):
        loss = torch.nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = dict(model.named_parameters())
    assert not [n for n, p in adapter.items() if torch.equal(p, after[n])]
    for name, tensor in buffers(model).items():
        assert torch.equal(tensor, before[name]), f"4-bit base {name} changed"
    assert not any(b.grad is not None for b in model.buffers())


def test_qlora_adapter_saves_as_plain_lora_and_reloads_on_fresh_quantised_base(tmp_path):
    model = qlora_model()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(hash(name) % 1000))
    expected = model(ids())
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4  # a normal LoRA adapter
    fresh = load_adapter(quantize_model_nf4(tiny_model()), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(fresh(ids()), expected.detach())
        assert not torch.equal(quantize_model_nf4(tiny_model())(ids()), expected)


def test_qlora_merges_into_the_dequantised_base():
    model = qlora_model()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
        adapted = model(ids())
    plain = merge_and_unload(model)
    assert type(plain) is Transformer
    assert not any(isinstance(m, (Linear4bit, AdapterLayer)) for m in plain.modules())
    with torch.no_grad():
        assert (plain(ids()) - adapted).abs().max().item() <= 1e-4


def test_qdora_on_4bit_base_runs_and_ia3_is_refused():
    model = qlora_model(method="dora")
    with torch.no_grad():
        out = model(ids())
        quantised_base = quantize_model_nf4(tiny_model())(ids())
    torch.testing.assert_close(out, quantised_base, rtol=1e-4, atol=1e-4)  # DoRA starts equal to the (4-bit) base
    from lmforge.core.errors import ConfigError
    with pytest.raises(ConfigError, match="4-bit"):
        apply_adapter(quantize_model_nf4(tiny_model()), AdapterConfig(method="ia3"), log=None)


def test_qlora_finetune_cli_run(base, tmp_path):  # noqa: F811
    from lmforge.cli import main

    out = tmp_path / "qlora"
    assert main(["finetune", *_args(base, out, "finetune.method=qlora", "finetune.r=4", "finetune.merge=true")]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "qlora" and 0 < summary["trainable_share"] < 0.2 and summary["peak_memory_mb"] > 0
    adapter = Path(summary["adapter_dir"])
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert json.loads((adapter / "lmforge.json").read_text())["method"] == "qlora"
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in tensors.items())  # it trained
    model = load_adapter(quantize_model_nf4(Transformer.from_pretrained(base["model"])), adapter).eval()
    merged = Transformer.from_pretrained(summary["model_dir"]).eval()  # merged into the dequantised base
    example = torch.tensor([[5, 17, 33, 2, 90, 41, 7, 8]])
    with torch.no_grad():
        assert (merged(example) - model(example)).abs().max() <= 1e-4


def test_qlora_resume_reproduces_losses(base, tmp_path, monkeypatch):  # noqa: F811
    """Checkpoints of a QLoRA run hold only the adapter; after a crash in step 3, resuming from step 2 onto
    the re-quantised base reproduces the uninterrupted run's losses exactly."""
    from lmforge.config import load_config
    from lmforge.finetune import Config, run

    extra = ("finetune.method=qlora", "finetune.r=4", "train.max_steps=4", "train.save_every=2")
    run(load_config(Config, None, _args(base, tmp_path / "full", *extra)))
    crash_during(monkeypatch, "lmforge.finetune.run", 3,
                 lambda: run(load_config(Config, None, _args(base, tmp_path / "cut", *extra))))
    run(load_config(Config, None, _args(base, tmp_path / "cut", *extra, "train.resume=auto")))
    assert step_losses(tmp_path / "cut") == step_losses(tmp_path / "full") and len(step_losses(tmp_path / "full")) == 4
