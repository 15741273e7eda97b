"""The exception root of nas4dyn.

Every error that a user can cause derives from :class:`Nas4dynError`; the CLI turns these into one line on
stderr and exit code 2. Errors about bad values also derive from ``ValueError`` so ordinary Python callers
can catch them the usual way.
"""
from __future__ import annotations


class Nas4dynError(Exception):
    """Base class of every error nas4dyn raises on purpose."""


class InvalidArchError(Nas4dynError, ValueError):
    """An architecture does not fit its search space; the message names the field and the allowed values."""


class SpaceError(Nas4dynError, ValueError):
    """A search-space file is missing, unreadable or violates the schema; every problem is listed."""


class DataError(Nas4dynError, ValueError):
    """A dataset cannot be found or read; the message says how to get it."""


class CheckpointError(Nas4dynError, ValueError):
    """A checkpoint or run directory is truncated, corrupt, or belongs to another space."""


class ConfigError(Nas4dynError, ValueError):
    """A configuration value (file, flag or objective) is invalid; the message names it and the fix."""


class DivergenceError(Nas4dynError):
    """Training produced a non-finite loss, gradient or weight; the message names the phase, the step and the
    likely cause. Nothing is written after the last good checkpoint."""
