"""Shared plumbing: errors, atomic I/O, device/dtype choice, seeding, logging."""
from .errors import CheckpointError, ConfigError, DataError, LMForgeError
from .io import atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_file
from .device import autocast_context, parse_dtype, pick_device

__all__ = [
    "LMForgeError", "ConfigError", "DataError", "CheckpointError",
    "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "sha256_file",
    "autocast_context", "parse_dtype", "pick_device",
]
