import json

import pytest
import torch

from lmforge.core.errors import CheckpointError
from lmforge.train import checkpoint as ckpt
from lmforge.train.config import TrainConfig
from lmforge.train.optim import lr_multiplier, param_groups


def test_cosine_schedule_shape():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    assert lr_multiplier(0, cfg) == pytest.approx(0.1)
    assert lr_multiplier(9, cfg) == pytest.approx(1.0)
    assert lr_multiplier(10, cfg) == pytest.approx(1.0)
    assert lr_multiplier(55, cfg) == pytest.approx(0.55, abs=1e-6)
    assert lr_multiplier(100, cfg) == pytest.approx(0.1)


def test_wsd_schedule_is_flat_then_decays():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    assert lr_multiplier(50, cfg) == 1.0 and lr_multiplier(79, cfg) == 1.0
    assert lr_multiplier(89, cfg) == pytest.approx(0.5)
    assert lr_multiplier(99, cfg) == pytest.approx(0.0)


def test_param_groups_skip_norms_and_biases():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    groups = param_groups(model, 0.1)
    assert [len(g["params"]) for g in groups] == [1, 3]
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0


def _write(run_dir, step, keep_last=2):
    def write_model(d):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"weights" * 10)

    return ckpt.save_checkpoint(run_dir, step, write_model=write_model, optimizer_state={"state": {}, "x": torch.ones(3)},
                                trainer_state={"step": step}, config_yaml="a: 1\n", keep_last=keep_last)


def test_checkpoint_roundtrip_restores_rng(tmp_path):
    torch.manual_seed(0)
    _write(tmp_path, 5)
    expected = torch.rand(3)
    torch.rand(100)
    state = ckpt.load_checkpoint(ckpt.resolve_resume(tmp_path, "auto"))
    assert torch.equal(torch.rand(3), expected)
    assert state["trainer_state"] == {"step": 5}
    assert torch.equal(state["optimizer_state"]["x"], torch.ones(3))


def test_latest_pointer_and_pruning(tmp_path):
    for step in (1, 2, 3):
        _write(tmp_path, step)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert names == ["step-2", "step-3"]
    assert ckpt.resolve_resume(tmp_path, "auto").name == "step-3"


def test_corrupt_checkpoint_is_refused(tmp_path):
    path = _write(tmp_path, 1)
    (path / "model" / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(CheckpointError, match="corrupt: checksum mismatch in model/model.safetensors"):
        ckpt.load_checkpoint(path)


def test_partial_checkpoint_is_refused(tmp_path):
    path = _write(tmp_path, 1)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="partial"):
        ckpt.load_checkpoint(path)
    path2 = _write(tmp_path, 2)
    (path2 / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match="trainer_state.json is missing"):
        ckpt.load_checkpoint(path2)


def test_resume_without_checkpoint_is_fresh(tmp_path):
    assert ckpt.resolve_resume(tmp_path, "auto") is None
    assert ckpt.resolve_resume(tmp_path, "") is None
