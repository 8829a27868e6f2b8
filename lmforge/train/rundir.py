"""A training run's directory, shared by every stage that trains: guard, final model dir, HF model writing."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..core.errors import ConfigError
from ..core.io import atomic_write_json


def guard_run_dir(run_dir: Path, tcfg) -> None:
    """Never clobber a finished run unless asked; a resume continues it, overwrite clears it first."""
    if tcfg.resume:
        return
    if tcfg.overwrite:  # start over: a stale `latest` must not survive into the new run
        for name in ("checkpoints", "tensorboard", "model", "adapter"):
            shutil.rmtree(run_dir / name, ignore_errors=True)
        for name in ("metrics.jsonl", "summary.json"):
            (run_dir / name).unlink(missing_ok=True)
        return
    if (run_dir / "checkpoints").exists() or (run_dir / "summary.json").exists():
        raise ConfigError(f"{run_dir} already holds a run; pass train.resume=auto to continue it or "
                          f"train.overwrite=true to start over")


def replace_dir(src: Path, dst: Path) -> None:
    """Copy src to dst through a temporary sibling, so dst is either the old or the complete new copy."""
    tmp = dst.with_name("." + dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


def save_model_dir(model_config, state_dict: dict[str, torch.Tensor], tokenizer, out: Path, provenance: dict) -> None:
    """An HF-layout directory: weights + config + tokenizer + lmforge.json (how it was made)."""
    from ..model.hf import save_state_dict

    save_state_dict(model_config, state_dict, out)
    tokenizer.save_pretrained(out)
    atomic_write_json(out / "lmforge.json", provenance)
