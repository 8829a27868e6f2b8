"""Shared plumbing: errors, atomic I/O, device/dtype choice, seeding.

Import submodules directly (`lmforge.core.io`, `lmforge.core.device`); this package does not import torch
so that light commands stay fast.
"""
from .errors import CheckpointError, ConfigError, DataError, LMForgeError
from .io import atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_file

__all__ = [
    "LMForgeError", "ConfigError", "DataError", "CheckpointError",
    "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "sha256_file",
]
