"""Resumable training checkpoints (DESIGN.md §3 "Training state").

<run>/checkpoints/step-<N>/ holds the model in HF layout, optimizer.pt, trainer_state.json (step, scheduler,
data position, metrics), rng.json + rng.safetensors, config.yaml and manifest.json (sha256 of every file).
A step dir is built under a temp name, fsynced and renamed; `latest` is rewritten last. On load the
manifest is verified first, so a partial or corrupt checkpoint is refused with the reason.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..core.errors import CheckpointError
from ..core.io import atomic_write_text, fsync_dir, sha256_file

MANIFEST = "manifest.json"


def _rng_to_files(directory: Path) -> None:
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    meta = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    (directory / "rng.json").write_text(json.dumps(meta))
    save_file(tensors, str(directory / "rng.safetensors"))


def _rng_from_files(directory: Path) -> None:
    meta = json.loads((directory / "rng.json").read_text())
    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))
    name, keys, pos, has_gauss, g = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, g))
    tensors = load_file(str(directory / "rng.safetensors"))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _fsync_tree(directory: Path) -> None:
    for root, _dirs, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


def _write_manifest(directory: Path) -> None:
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            rel = path.relative_to(directory).as_posix()
            files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    (directory / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def verify_checkpoint(directory: str | os.PathLike) -> None:
    """Raise CheckpointError unless every file in the manifest is present with the recorded checksum."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint not found: {directory}")
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {directory} is partial: no {MANIFEST} (the write was interrupted)")
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {directory}: unreadable {MANIFEST} ({e})") from None
    for rel, info in files.items():
        path = directory / rel
        if not path.is_file():
            raise CheckpointError(f"checkpoint {directory} is partial: {rel} is missing")
        if path.stat().st_size != info["bytes"] or sha256_file(path) != info["sha256"]:
            raise CheckpointError(f"checkpoint {directory} is corrupt: checksum mismatch in {rel}")


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    *,
    write_model: Callable[[Path], None],
    optimizer_state: dict[str, Any] | None,
    trainer_state: dict[str, Any],
    config_yaml: str,
    keep_last: int = 2,
) -> Path:
    """Write step-<step> atomically and point `latest` at it; returns the final directory."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step}"
    tmp = ckpt_root / f".tmp-step-{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write_model(tmp / "model")
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / "optimizer.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    (tmp / "config.yaml").write_text(config_yaml)
    _rng_to_files(tmp)
    _write_manifest(tmp)
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(ckpt_root)
    atomic_write_text(ckpt_root / "latest", final.name + "\n")
    _prune(ckpt_root, keep_last)
    return final


def _step_of(path: Path) -> int:
    return int(path.name.split("-", 1)[1])


def _prune(ckpt_root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    steps = sorted((p for p in ckpt_root.glob("step-*") if p.is_dir()), key=_step_of)
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def clean_partial(run_dir: str | os.PathLike) -> None:
    """Remove temp dirs left by a write that was killed."""
    for tmp in (Path(run_dir) / "checkpoints").glob(".tmp-step-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_resume(run_dir: str | os.PathLike, resume: str) -> Path | None:
    """'' → None; 'auto' → the `latest` step dir (None if the run has none); else the given dir."""
    if not resume:
        return None
    if resume != "auto":
        return Path(resume)
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    return pointer.parent / pointer.read_text().strip()


def load_checkpoint(directory: str | os.PathLike) -> dict[str, Any]:
    """Verify, restore RNG states, and return {model_dir, optimizer_state, trainer_state}."""
    directory = Path(directory)
    verify_checkpoint(directory)
    optimizer_state = None
    if (directory / "optimizer.pt").is_file():
        optimizer_state = torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True)
    trainer_state = json.loads((directory / "trainer_state.json").read_text())
    _rng_from_files(directory)
    return {"model_dir": directory / "model", "optimizer_state": optimizer_state, "trainer_state": trainer_state}

