"""Optuna parameters <-> :class:`Arch`.

NSGA-II (and Optuna's samplers generally) do not model conditional parameters: a parameter that exists only
for some depths would be missing from part of the population and crossover would drop it. So every trial
suggests the same flat vector — kernel, width and gate for every block slot up to the maximum depth, the path
count of every routed stage, an on/off switch for every exit candidate — and :func:`decode` ignores what the
sampled depths (or a routed stage, which takes no gates) leave unused. The gate of a
slot is suggested from every kind the slot allows with any kernel; a kind that the chosen kernel rules out
decodes to ``"none"``.
"""
from __future__ import annotations

from typing import Any, Protocol

from search_spaces.arch import Arch, ExitChoice
from search_spaces.space import SearchSpace

BUDGET = "exit_budget"
# Placeholder threshold of a decoded exit; calibration replaces it.
UNCALIBRATED = 1.0


class Suggester(Protocol):
    """The part of ``optuna.Trial`` used here (Ray's define-by-run captor has it too)."""

    def suggest_categorical(self, name: str, choices: Any) -> Any: ...

    def suggest_float(self, name: str, low: float, high: float) -> float: ...


def _unrouted(paths: tuple[int, ...]) -> int:
    """The path count of a stage that takes no routing choice: 1 when allowed (no CIGT trellis)."""
    return 1 if 1 in paths else min(paths)


def suggest(trial: Suggester, space: SearchSpace, static: bool = False) -> dict[str, Any]:
    """Ask ``trial`` for one full parameter vector of ``space`` (``static``: no exits, no gates, no budget)."""
    params: dict[str, Any] = {"resolution": trial.suggest_categorical("resolution", list(space.resolutions))}
    for s, st in enumerate(space.stages):
        params[f"depth.{s}"] = trial.suggest_categorical(f"depth.{s}", list(st.depths))
        if not static and len(st.paths) > 1:
            params[f"paths.{s}"] = trial.suggest_categorical(f"paths.{s}", list(st.paths))
        for b in range(st.max_depth):
            params[f"kernel.{s}.{b}"] = trial.suggest_categorical(f"kernel.{s}.{b}", list(st.kernels))
            params[f"width.{s}.{b}"] = trial.suggest_categorical(f"width.{s}.{b}", list(st.widths))
            gates = space.allowed_gates(s, b)
            if not static and len(gates) > 1:
                params[f"gate.{s}.{b}"] = trial.suggest_categorical(f"gate.{s}.{b}", list(gates))
    if not static:
        for s, b in space.exits.positions:
            params[f"exit.{s}.{b}"] = trial.suggest_categorical(f"exit.{s}.{b}", [False, True])
        # Where the thresholds put the subnet between leaving at its first exit (0) and never leaving early (1).
        params[BUDGET] = trial.suggest_float(BUDGET, 0.0, 1.0)
    return params


def decode(space: SearchSpace, params: dict[str, Any]) -> Arch:
    """The arch of a parameter vector; exits carry the placeholder threshold until calibrated.

    Raises:
        InvalidArchError: the parameters do not fit ``space`` (e.g. a study of another space).
    """
    depths = tuple(int(params[f"depth.{s}"]) for s in range(len(space.stages)))
    # A stage without a routing choice keeps its only path count.
    paths = tuple(int(params.get(f"paths.{s}", _unrouted(st.paths))) for s, st in enumerate(space.stages))
    kernels, widths, gates = [], [], []
    for s, d in enumerate(depths):
        ks = tuple(int(params[f"kernel.{s}.{b}"]) for b in range(d))
        kernels.append(ks)
        widths.append(tuple(int(params[f"width.{s}.{b}"]) for b in range(d)))
        # A routed stage takes no gates.
        chosen = [str(params.get(f"gate.{s}.{b}", "none")) if paths[s] == 1 else "none" for b in range(d)]
        gates.append(tuple(g if g in space.allowed_gates(s, b, k, w) else "none"
                           for b, (g, k, w) in enumerate(zip(chosen, ks, widths[-1]))))
    exits = tuple(
        ExitChoice(s, b, UNCALIBRATED)
        for s, b in space.exits.positions
        if params.get(f"exit.{s}.{b}", False) and b < depths[s]
    )
    arch = Arch(space.name, int(params["resolution"]), depths, tuple(kernels), tuple(widths), tuple(gates), exits,
                paths)
    return space.validate(arch)


def corner_params(space: SearchSpace, static: bool = False) -> list[dict[str, Any]]:
    """Parameter vectors of the space's corners, to start a fresh study from: the largest static subnet, the
    smallest, and (dynamic searches) the largest with every exit at an even exit budget. Samplers that learn
    from good trials (NSGA-II's first generation, TPE) then start from the supernet's best-trained subnets."""
    def vector(pick: int, exits: bool, exit_budget: float) -> dict[str, Any]:
        params: dict[str, Any] = {"resolution": sorted(space.resolutions)[pick]}
        for s, st in enumerate(space.stages):
            params[f"depth.{s}"] = sorted(st.depths)[pick]
            if not static and len(st.paths) > 1:
                params[f"paths.{s}"] = _unrouted(st.paths)
            for b in range(st.max_depth):
                params[f"kernel.{s}.{b}"] = sorted(st.kernels)[pick]
                params[f"width.{s}.{b}"] = sorted(st.widths)[pick]
                if not static and len(space.allowed_gates(s, b)) > 1:
                    params[f"gate.{s}.{b}"] = "none"
        if not static:
            params.update({f"exit.{s}.{b}": exits for s, b in space.exits.positions})
            params[BUDGET] = exit_budget
        return params

    corners = [vector(-1, False, 1.0), vector(0, False, 1.0)]
    return corners if static or not space.exits.positions else corners + [vector(-1, True, 0.5)]


def budget(params: dict[str, Any]) -> float:
    """The trial's exit budget in [0, 1] (1 for static searches: never leave early)."""
    return float(params.get(BUDGET, 1.0))
