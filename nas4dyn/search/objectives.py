"""Objectives and constraints of a search, parsed from the command line.

``--objectives accuracy:max,macs_expected:min,latency_ms:min`` and ``--constraint "latency_ms<=4"``. Every
name is a metric that a trial measures (see :data:`METRICS`); objectives become Optuna directions,
constraints become Optuna constraint values (<= 0 means feasible).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from nas4dyn.errors import ConfigError

# Metric -> (natural direction, what it is). "Expected" metrics depend on the calibrated exit thresholds;
# the others are fixed by the architecture alone.
METRICS: dict[str, tuple[str, str]] = {
    "accuracy": ("max", "validation accuracy of the dynamic subnet (0..1)"),
    "macs_expected": ("min", "mean MACs per image over the validation split (exits and gates as they fire)"),
    "macs_max": ("min", "MACs per image when everything runs (every gate open, every exit evaluated)"),
    "latency_ms": ("min", "expected latency (ms) over the validation split, from the latency table"),
    "latency_ms_max": ("min", "latency (ms) of the full path, from the latency table"),
}
LATENCY_METRICS = ("latency_ms", "latency_ms_max")
# Metrics that threshold calibration can move (the others are fixed by the architecture).
EXPECTED_METRICS = ("accuracy", "macs_expected", "latency_ms")
_CONSTRAINT = re.compile(r"^\s*([A-Za-z_]+)\s*(<=|>=)\s*([-+0-9.eE]+)\s*([kMG]?)\s*$")
_SUFFIX = {"": 1.0, "k": 1e3, "M": 1e6, "G": 1e9}


@dataclass(frozen=True)
class Objective:
    """One objective: a metric and whether to maximise or minimise it."""

    metric: str
    direction: str  # "max" | "min"

    @property
    def optuna_direction(self) -> str:
        return "maximize" if self.direction == "max" else "minimize"

    def __str__(self) -> str:
        return f"{self.metric}:{self.direction}"


@dataclass(frozen=True)
class Constraint:
    """``metric <= bound`` or ``metric >= bound``."""

    metric: str
    op: str  # "<=" | ">="
    bound: float

    def violation(self, value: Any) -> Any:
        """Relative amount by which ``value`` breaks the constraint (<= 0: met). Relative, so constraints on
        MACs (1e7) and milliseconds (1) weigh alike when Optuna ranks infeasible trials by total violation.
        Works elementwise on numpy arrays."""
        excess = value - self.bound if self.op == "<=" else self.bound - value
        return excess / max(abs(self.bound), 1e-12)

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.bound:g}"


def _check_metric(name: str, where: str) -> None:
    if name not in METRICS:
        raise ConfigError(f"{where}: unknown metric {name!r}; use one of {', '.join(METRICS)}")


def parse_objectives(text: str) -> tuple[Objective, ...]:
    """``"accuracy:max,macs_expected:min"`` -> objectives; a bare name takes its natural direction.

    Raises:
        ConfigError: unknown metric or direction, duplicates, or fewer than two objectives.
    """
    objectives = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, _, direction = item.partition(":")
        name = name.strip()
        _check_metric(name, f"--objectives {text!r}")
        direction = direction.strip().lower() or METRICS[name][0]
        if direction not in ("max", "min"):
            raise ConfigError(f"--objectives: direction {direction!r} of {name} must be max or min (e.g. {name}:"
                              f"{METRICS[name][0]})")
        objectives.append(Objective(name, direction))
    names = [o.metric for o in objectives]
    if len(set(names)) != len(names):
        raise ConfigError(f"--objectives {text!r}: each metric may appear once")
    if len(objectives) < 2:
        raise ConfigError(f"--objectives {text!r}: a multi-objective search needs at least two, e.g. "
                          "accuracy:max,macs_expected:min")
    return tuple(objectives)


def parse_constraint(text: str) -> Constraint:
    """``"latency_ms<=4"``, ``"macs_expected<=20M"``, ``"accuracy>=0.85"`` -> :class:`Constraint`.

    Raises:
        ConfigError: malformed text or unknown metric.
    """
    match = _CONSTRAINT.match(text)
    if not match:
        raise ConfigError(f"--constraint {text!r}: expected METRIC<=VALUE or METRIC>=VALUE, e.g. latency_ms<=4 "
                          "or macs_expected<=20M")
    name, op, number, suffix = match.groups()
    _check_metric(name, f"--constraint {text!r}")
    try:
        bound = float(number) * _SUFFIX[suffix]
    except ValueError:
        raise ConfigError(f"--constraint {text!r}: {number!r} is not a number") from None
    return Constraint(name, op, bound)


def needs_latency(objectives: tuple[Objective, ...], constraints: tuple[Constraint, ...]) -> list[str]:
    """The latency metrics that the objectives and constraints use."""
    used = [o.metric for o in objectives] + [c.metric for c in constraints]
    return sorted({m for m in used if m in LATENCY_METRICS})


def budget_metric(objectives: tuple[Objective, ...]) -> str:
    """The expected cost that a trial's exit budget limits: the first minimised expected cost objective."""
    return next((o.metric for o in objectives if o.metric in ("macs_expected", "latency_ms") and o.direction == "min"),
                "macs_expected")
