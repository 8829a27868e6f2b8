"""Training metrics: tokens/s, MFU against a measured peak, and sinks (console, metrics.jsonl, TensorBoard)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from ..core.io import atomic_write_json


def measure_peak_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large square matmul on this device and dtype (best kernel we use): the practical peak."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    kernels = [lambda: a @ b]
    if device.type == "cpu" and dtype == torch.float32:
        # our fp32 linears run on oneDNN (lmforge.model.layers), which beats torch.mm's MKL path on some CPUs
        from ..model.layers import linear

        bt = b.t().contiguous()
        kernels.append(lambda: linear(a, bt))
    best = float("inf")
    for kernel in kernels:
        kernel()
        for _ in range(repeats):
            t0 = time.perf_counter()
            kernel()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def cached_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """measure_peak_flops, cached per (device, dtype, threads) under ~/.cache/lmforge so runs agree."""
    key = f"v2-{device.type}-{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}-{dtype}-{torch.get_num_threads()}"
    cache = Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge")) / "peak_flops.json"
    table: dict[str, float] = {}
    if cache.is_file():
        try:
            table = json.loads(cache.read_text())
        except ValueError:
            table = {}
    if key not in table:
        table[key] = measure_peak_flops(device, dtype)
        try:
            atomic_write_json(cache, table)
        except OSError:
            pass
    return table[key]


class MetricsLogger:
    """Appends one JSON record per log step to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = True, enabled: bool = True,
                 truncate_after_step: int | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after_step is not None and self.path.is_file():
            # a resumed run replays the steps after its checkpoint: drop the killed run's records for them
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= truncate_after_step]
            atomic_write_json_lines(self.path, kept)
        elif truncate_after_step is None and self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:
                self.writer = None

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.writer is not None:
            step = int(record.get("step", 0))
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self.writer is not None:
            self.writer.close()


def atomic_write_json_lines(path: Path, lines: list[str]) -> None:
    from ..core.io import atomic_write_text

    atomic_write_text(path, "".join(line + "\n" for line in lines))


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
