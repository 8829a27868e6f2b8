"""Typed errors. The CLI turns any `LMForgeError` into one clear line and exit code 2."""


class LMForgeError(Exception):
    """Base class for user-facing errors (bad config, bad data, bad files)."""


class ConfigError(LMForgeError):
    """A config file or override is wrong: names the key and what is accepted."""


class DataError(LMForgeError):
    """Input data is malformed: names the file and line."""


class CheckpointError(LMForgeError):
    """A checkpoint is missing, partial or corrupt: names the path and the reason."""


class MissingDependencyError(LMForgeError, ImportError):
    """An optional package a feature needs is not installed; the message says what to install."""
