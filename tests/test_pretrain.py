"""Pretraining end to end on a tiny config: loss falls, exact resume, bad-input handling."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import crash_during, pretrain_args, step_losses
from lmforge.cli import main
from lmforge.config import load_config
from lmforge.core.errors import CheckpointError
from lmforge.pretrain import Config, run
from lmforge.train.metrics import read_metrics


def _run(tmp: Path, data: Path, *extra: str) -> dict:
    return run(load_config(Config, None, pretrain_args(data, tmp, *extra)))


_losses = step_losses


def test_pretrain_lowers_val_loss_and_writes_hf_checkpoint(tiny_data, tmp_path):
    summary = _run(tmp_path / "run", tiny_data, "train.max_steps=30")
    assert summary["val_loss"] < summary["initial_val"]["val_loss"] - 0.5
    model_dir = Path(summary["model_dir"])
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "lmforge.json"):
        assert (model_dir / name).is_file(), name
    assert json.loads((model_dir / "lmforge.json").read_text())["stage"] == "pretrain"
    records = read_metrics(tmp_path / "run")
    assert {"loss", "lr", "grad_norm", "tokens_per_second", "mfu"} <= set(records[0])
    assert len(_losses(tmp_path / "run")) == 30


def test_checkpoint_loads_in_transformers_with_same_logits(tiny_data, tmp_path):
    transformers = pytest.importorskip("transformers")
    from lmforge.model import Transformer

    summary = _run(tmp_path / "run", tiny_data, "train.max_steps=3")
    ours = Transformer.from_pretrained(summary["model_dir"]).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(summary["model_dir"]).eval()
    tok = transformers.AutoTokenizer.from_pretrained(summary["model_dir"])
    ids = torch.tensor([tok.encode("Hello world, 你好世界")])
    with torch.no_grad():
        diff = (ours(ids) - theirs(ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_resume_reproduces_losses_in_process(tiny_data, tmp_path, monkeypatch):
    """Die in the middle of step 6 (after the step-4 checkpoint), resume, compare every step's loss."""
    full = tmp_path / "full"
    _run(full, tiny_data, "train.max_steps=10", "train.save_every=4", "train.grad_accum=2")
    interrupted = tmp_path / "interrupted"
    # step 6, first micro-batch (2 micro-batches per step)
    crash_during(monkeypatch, "lmforge.pretrain.run", 11,
                 lambda: _run(interrupted, tiny_data, "train.max_steps=10", "train.save_every=4", "train.grad_accum=2"))
    assert (interrupted / "checkpoints" / "latest").read_text().strip() == "step-4"
    _run(interrupted, tiny_data, "train.max_steps=10", "train.save_every=4", "train.grad_accum=2",
         "train.resume=auto")
    assert _losses(interrupted) == _losses(full)  # bit-identical, every step


@pytest.mark.slow
def test_kill_9_then_resume_matches_uninterrupted_cli_run(tiny_data, tmp_path):
    """The real thing: `kill -9` a CLI run after its first checkpoint, rerun with train.resume=auto."""
    args = pretrain_args(tiny_data, tmp_path / "full", "train.max_steps=40", "train.save_every=5")
    assert main(["pretrain", *args]) == 0
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "lmforge", "pretrain",
           *pretrain_args(tiny_data, run_dir, "train.max_steps=40", "train.save_every=5")]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.time() + 120
    while not latest.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest.exists(), "the run never wrote a checkpoint"
    done = read_metrics(run_dir)
    assert max(r["step"] for r in done) < 40, "killed too late to test anything"
    resumed = subprocess.run(cmd + ["train.resume=auto"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    assert _losses(run_dir) == _losses(tmp_path / "full")


def test_corrupt_checkpoint_is_refused_on_resume(tiny_data, tmp_path):
    _run(tmp_path / "run", tiny_data, "train.max_steps=4", "train.save_every=2")
    step = tmp_path / "run" / "checkpoints" / "step-4"
    weights = step / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])
    with pytest.raises(CheckpointError, match="corrupt: checksum mismatch in model/model.safetensors"):
        _run(tmp_path / "run", tiny_data, "train.max_steps=8", "train.resume=auto")


def test_refuses_to_clobber_a_finished_run(tiny_data, tmp_path, capsys):
    args = pretrain_args(tiny_data, tmp_path / "run", "train.max_steps=2")
    assert main(["pretrain", *args]) == 0
    assert main(["pretrain", *args]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["pretrain", *args, "train.overwrite=true"]) == 0


def test_cli_errors_are_one_line_and_exit_2(tiny_data, tmp_path, capsys):
    assert main(["pretrain", "train.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.lrr'" in err and "valid keys under train:" in err and "Traceback" not in err
    assert main(["pretrain", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["pretrain", f"data={tmp_path / 'nothing'}", f"train.out_dir={tmp_path / 'r'}"]) == 2
    assert "no packed dataset" in capsys.readouterr().err


def test_help_lists_every_key(capsys):
    assert main(["--help"]) == 0
    assert "pretrain" in capsys.readouterr().out
    assert main(["pretrain", "--help"]) == 0
    out = capsys.readouterr().out
    for key in ("train.lr", "train.resume", "train.parallel", "model.preset", "model.num_layers", "data"):
        assert key in out


def test_tensorboard_and_bf16_autocast(tiny_data, tmp_path):
    summary = _run(tmp_path / "run", tiny_data, "train.max_steps=3", "train.tensorboard=true",
                   "train.precision=bf16", "train.schedule=wsd", "train.activation_checkpointing=true")
    assert summary["precision"] == "bf16"
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_torch_compile_trains_like_eager(tiny_data, tmp_path):
    eager = _run(tmp_path / "eager", tiny_data, "train.max_steps=3")
    compiled = _run(tmp_path / "compiled", tiny_data, "train.max_steps=3", "train.compile=true")
    assert compiled["final_loss"] == pytest.approx(eager["final_loss"], abs=1e-3)
