"""Device and dtype choice, made once at the top of a run and printed in its header."""
from __future__ import annotations

import os

import torch

from .errors import ConfigError

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def pick_device(name: str = "auto") -> torch.device:
    """`auto` gives cuda when present, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"device={name!r} is not a torch device (use auto, cpu, cuda, cuda:N)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} asked for CUDA but torch.cuda.is_available() is False")
    return device


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """Map 'bf16'/'bfloat16'/... to a torch dtype; None and 'auto' stay None."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return None
    if name not in _DTYPES:
        raise ConfigError(f"dtype={name!r} is not one of {sorted(set(_DTYPES))} or 'auto'")
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def set_threads(num_threads: int = 0) -> int:
    """Use one intra-op thread per physical core on CPU (0 = leave torch's choice)."""
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    return torch.get_num_threads()


def autocast_context(device: torch.device, precision: str):
    """bf16/fp16 autocast on CPU or CUDA; a null context for fp32."""
    import contextlib

    if precision in ("fp32", "float32"):
        return contextlib.nullcontext()
    dtype = parse_dtype(precision)
    return torch.autocast(device_type=device.type, dtype=dtype)


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def cpu_name() -> str:
    """The CPU's model name (for benchmark headers): /proc/cpuinfo on Linux, else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()
