"""SFT end to end on a tiny random model: each method trains what it should, artefacts reload, exact resume."""
from __future__ import annotations

import importlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import crash_during, finetune_args, step_losses

from lmforge.config import load_config
from lmforge.core.errors import ConfigError
from lmforge.finetune import Config, FinetuneSection, apply_method, run

run_module = importlib.import_module("lmforge.finetune.run")


pytestmark = pytest.mark.usefixtures("restore_threads")
_args = finetune_args


@pytest.fixture(scope="module")
def base(sft_base) -> dict:
    return sft_base


def _run(base, out, *extra) -> dict:
    return run(load_config(Config, None, _args(base, out, *extra)))


def _capture_model(monkeypatch) -> dict:
    """Record the model apply_method prepared, so a test can compare the trained module with its artefact."""
    seen = {}
    real = run_module.apply_method

    def recording(model, section, lr, wd):
        seen["base"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        prepared = real(model, section, lr, wd)
        seen["prepared"] = prepared
        return prepared

    monkeypatch.setattr(run_module, "apply_method", recording)
    return seen


IDS = torch.tensor([[5, 17, 33, 2, 90, 41, 7, 8]])


@pytest.mark.parametrize("method", ["full", "freeze"])
def test_whole_model_methods_train_only_their_params_and_save_hf_dir(base, tmp_path, monkeypatch, method):
    from lmforge.model import Transformer

    seen = _capture_model(monkeypatch)
    summary = _run(base, tmp_path / method, f"finetune.method={method}", "finetune.freeze_layers=1")
    trained = seen["prepared"].model.eval()
    reloaded = Transformer.from_pretrained(summary["model_dir"]).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(IDS), trained(IDS))
    trainable = set(seen["prepared"].trainable_names)
    after = reloaded.state_dict()
    for name, before in seen["base"].items():
        if name in trainable:
            assert not torch.equal(after[name], before), f"{name} did not train"
        else:
            assert torch.equal(after[name], before), f"frozen {name} changed"
    if method == "freeze":
        assert all(n.startswith(("model.layers.1.", "model.norm.")) for n in trainable)
        assert 0 < summary["trainable_share"] < 1
    else:
        assert summary["trainable_share"] == 1.0
    assert json.loads((Path(summary["model_dir"]) / "lmforge.json").read_text())["method"] == method


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_adapter_methods_leave_base_bit_identical_and_adapter_reloads(base, tmp_path, monkeypatch, method):
    from lmforge.model import Transformer
    from lmforge.peft import load_adapter

    seen = _capture_model(monkeypatch)
    summary = _run(base, tmp_path / method, f"finetune.method={method}", "finetune.merge=true",
                   "finetune.r=4", "finetune.loraplus_lr_ratio=4")
    trained = seen["prepared"].model.eval()
    state = trained.state_dict()
    adapter_keys = [k for k in state if any(t in k for t in ("lora_", "ia3_l"))]
    assert adapter_keys and summary["trainable_share"] < 0.2
    for name, before in seen["base"].items():  # base weights now sit under `.base_layer.` where adapted
        key = name if name in state else name.replace(".weight", ".base_layer.weight")
        assert torch.equal(state[key], before), f"frozen {name} changed"
    # B starts at zero (LoRA, DoRA) and IA3 vectors at one: anything else means the adapter trained
    moved = [k for k in adapter_keys if ("lora_B" in k and state[k].abs().sum() > 0)
             or ("ia3_l" in k and not torch.equal(state[k], torch.ones_like(state[k])))]
    assert moved, "no adapter parameter trained"
    reloaded = load_adapter(Transformer.from_pretrained(base["model"]), summary["adapter_dir"]).eval()
    merged = Transformer.from_pretrained(summary["model_dir"]).eval()
    with torch.no_grad():
        expected = trained(IDS)
        assert torch.equal(reloaded(IDS), expected)
        assert (merged(IDS) - expected).abs().max() <= 1e-5
    assert (Path(summary["adapter_dir"]) / "adapter_config.json").is_file()


def test_bitfit_trains_only_biases_and_refuses_bias_free_models(base):
    from lmforge.model import Transformer

    llama = Transformer.from_pretrained(base["model"])
    with pytest.raises(ConfigError, match="no bias"):
        apply_method(llama, FinetuneSection(method="bitfit"), 1e-3, 0.0)
    qwen = Transformer(replace(llama.config, model_type="qwen2", attention_bias=True))
    prepared = apply_method(qwen, FinetuneSection(method="bitfit"), 1e-3, 0.0)
    assert prepared.trainable_names and all(n.endswith(".bias") for n in prepared.trainable_names)
    assert prepared.share < 0.02


def test_lora_adapter_loads_in_peft_with_equal_logits(base, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from lmforge.model import Transformer
    from lmforge.peft import load_adapter

    summary = _run(base, tmp_path / "lora", "finetune.method=lora", "finetune.use_rslora=true")
    ours = load_adapter(Transformer.from_pretrained(base["model"]), summary["adapter_dir"]).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(base["model"], dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf, summary["adapter_dir"]).eval()
    with torch.no_grad():
        assert (ours(IDS) - theirs(input_ids=IDS).logits).abs().max() <= 1e-4


_losses = step_losses


def test_resume_reproduces_losses_in_process(base, tmp_path, monkeypatch):
    """LoRA with dropout, NEFTune, packing and grad accumulation: crash in step 5 (after the step-4
    checkpoint, which holds only the adapter), resume with train.resume=auto, compare every step's loss."""
    extra = ("finetune.method=lora", "train.max_steps=6", "train.save_every=2", "train.grad_accum=2",
             "data.packing=true", "finetune.neftune_alpha=5", "finetune.dropout=0.1")
    _run(base, tmp_path / "full", *extra)
    # step 5, second micro-batch
    crash_during(monkeypatch, "lmforge.finetune.run", 10, lambda: _run(base, tmp_path / "crashed", *extra))
    assert (tmp_path / "crashed" / "checkpoints" / "latest").read_text().strip() == "step-4"
    _run(base, tmp_path / "crashed", *extra, "train.resume=auto")
    assert _losses(tmp_path / "crashed") == _losses(tmp_path / "full")


@pytest.mark.parametrize("method,drop", [("full", 1.0), ("lora", 0.1)])
def test_sft_lowers_val_loss_and_accuracy_runs(base, tmp_path, monkeypatch, method, drop):
    from lmforge.data.synthetic import qa_questions, split_facts
    from lmforge.eval.generative import evaluate_generative, item_from_record
    from lmforge.tokenizer import Tokenizer

    seen = _capture_model(monkeypatch)
    summary = _run(base, tmp_path / "sft", f"finetune.method={method}", "train.max_steps=20",
                   f"train.lr={3e-3 if method == 'full' else 2e-2}", "data.packing=true")
    print(f"{method}: val_loss {summary['initial_val']['val_loss']:.3f} -> {summary['val_loss']:.3f}, "
          f"trainable {summary['trainable_share']:.2%}, peak {summary['peak_memory_mb']:.0f} MB")
    assert summary["val_loss"] < summary["initial_val"]["val_loss"] - drop
    assert summary["peak_memory_mb"] > 0
    questions = qa_questions(base["world"], split_facts(base["world"], 3).test[:6])
    tok = Tokenizer.from_pretrained(base["model"])
    result = evaluate_generative(seen["prepared"].model, tok, [item_from_record(q) for q in questions], chat=True,
                                 metrics=["contains"], max_new_tokens=8)
    assert result.metrics["num_items"] == 6 and 0.0 <= result.metrics["contains"] <= 1.0


def test_recipe_loads_and_names_the_task_files_write_tasks_writes():
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(Config, root / "lmforge/recipes/quickstart/sft.yaml", ["finetune.method=dora"])
    assert cfg.finetune.method == "dora" and cfg.model.init_from.endswith("pretrain/model")
    assert [Path(p).name for p in cfg.data.path + cfg.data.val] == ["sft_train.jsonl", "sft_test.jsonl"]


def test_missing_init_from_is_a_config_error(base, tmp_path):
    with pytest.raises(ConfigError, match="model.init_from"):
        run(load_config(Config, None, [f"data.path={base['data']}", f"train.out_dir={tmp_path}"]))
