"""Cost next to quality: wall time, tokens per second (prompt and generated) and peak memory of one eval task.

Peak memory is what the device reports without extra dependencies:
- CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` at the task's start (tensors only).
- CPU on Linux: the process' peak resident set (VmHWM in /proc/self/status), reset at the task's start by
  writing "5" to /proc/self/clear_refs, so each task reports its own peak. Where that reset is refused the
  number is the process' lifetime peak (`resource.getrusage`'s ru_maxrss), and `memory_kind` says so.
"""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


def _reset_rss_peak() -> bool:
    """Reset the kernel's peak-RSS counter for this process; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_peak_bytes() -> int:
    """Peak resident set of this process: VmHWM (Linux), else ru_maxrss (KiB on Linux, bytes on macOS)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


@dataclass
class Efficiency:
    """Counts and timings of one task; rates are derived in `to_dict`."""

    seconds: float = 0.0
    prompt_tokens: int = 0        # tokens read (prompts, scored contexts, perplexity windows)
    generated_tokens: int = 0
    requests: int = 0             # questions / prompts / documents
    peak_memory_mb: float | None = None
    memory_kind: str = ""
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        s = max(self.seconds, 1e-9)
        out: dict[str, Any] = {
            "seconds": self.seconds, "requests": self.requests, "latency_s_per_request":
            self.seconds / self.requests if self.requests else None,
            "prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated_tokens,
            "prompt_tokens_per_s": self.prompt_tokens / s, "generated_tokens_per_s": self.generated_tokens / s,
            "peak_memory_mb": self.peak_memory_mb, "memory_kind": self.memory_kind,
        }
        if self.ttft:
            out["ttft_mean_s"] = sum(self.ttft) / len(self.ttft)
        if self.tpot:
            out["tpot_mean_s"] = sum(self.tpot) / len(self.tpot)
        return out


class Meter:
    """`with Meter(device) as m: ...; m.result.prompt_tokens += ...` — times the block and records its peak memory."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.result = Efficiency()
        self._start = 0.0
        self._fresh_peak = False

    def __enter__(self) -> "Meter":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._fresh_peak = _reset_rss_peak()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.result.seconds = time.perf_counter() - self._start
        if self.device.type == "cuda":
            self.result.peak_memory_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            self.result.memory_kind = "cuda_max_allocated"
        else:
            self.result.peak_memory_mb = _rss_peak_bytes() / 2**20
            self.result.memory_kind = "cpu_rss_peak" if self._fresh_peak else "cpu_rss_peak_process_lifetime"
