"""nas4dyn: neural architecture search for dynamic convolutional networks."""
from __future__ import annotations

from nas4dyn.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    InvalidArchError,
    Nas4dynError,
    SpaceError,
)
from search_spaces import Arch, SearchSpace, load_space
from supernet import SubNet, Supernet

__version__ = "0.1.0"


def build_supernet(space: SearchSpace | str) -> Supernet:
    """A freshly initialised :class:`Supernet` of ``space`` (a space object, built-in name or file path)."""
    return Supernet(load_space(space) if isinstance(space, str) else space)


__all__ = [
    "Arch",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "InvalidArchError",
    "Nas4dynError",
    "SearchSpace",
    "SpaceError",
    "SubNet",
    "Supernet",
    "build_supernet",
    "load_space",
]
