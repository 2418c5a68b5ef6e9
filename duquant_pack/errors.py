"""Compiler-side errors (all `DuquantError`: one-line messages, non-zero exit in the CLI)."""

from duquant_runtime.errors import DuquantError, PackError


class CheckpointError(DuquantError):
    """A checkpoint is missing, unreadable, inconsistent or holds unusable values."""


class ConfigError(DuquantError):
    """Options or presets are invalid or select nothing."""


class BuildError(DuquantError):
    """A build cannot proceed (existing different pack, lock held, ...)."""


__all__ = ["DuquantError", "PackError", "CheckpointError", "ConfigError", "BuildError"]
