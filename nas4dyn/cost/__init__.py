"""Cost model: exact MACs of dynamic subnets, and an on-device latency table with a validated predictor.

Names resolve lazily (as in :mod:`nas4dyn`), so the CLI can read :mod:`nas4dyn.cost.settings` without
importing torch and fvcore.
"""
from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "CostReport": "nas4dyn.cost.macs",
    "count_macs": "nas4dyn.cost.macs",
    "LatencyModel": "nas4dyn.cost.latency",
    "LatencyTable": "nas4dyn.cost.latency",
    "ProfileSettings": "nas4dyn.cost.settings",
    "profile_space": "nas4dyn.cost.profiler",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'nas4dyn.cost' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
