"""nas4dyn: neural architecture search for dynamic convolutional networks.

Public names are resolved lazily (PEP 562): ``import nas4dyn.errors`` from the lower layers
(``search_spaces``, ``supernet``) then stays cheap and free of import cycles, and the CLI starts fast.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "Arch": "search_spaces.arch",
    "SearchSpace": "search_spaces.space",
    "load_space": "search_spaces.space",
    "Supernet": "supernet.network",
    "SubNet": "supernet.subnet",
    "build_supernet": "nas4dyn.api",
    "load_supernet": "nas4dyn.api",
    "count_macs": "nas4dyn.cost.macs",
    "CostReport": "nas4dyn.cost.macs",
    "LatencyModel": "nas4dyn.cost.latency",
    "LatencyTable": "nas4dyn.cost.latency",
    "export_subnet": "nas4dyn.export",
    "load_exported": "nas4dyn.export",
    "Nas4dynError": "nas4dyn.errors",
    "InvalidArchError": "nas4dyn.errors",
    "SpaceError": "nas4dyn.errors",
    "DataError": "nas4dyn.errors",
    "CheckpointError": "nas4dyn.errors",
    "ConfigError": "nas4dyn.errors",
}

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'nas4dyn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
