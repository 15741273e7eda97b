"""Exit-threshold calibration on the validation split (budgeted, as in MSDNet).

One validation pass of a subnet with every exit evaluated gives, per sample, each exit's confidence, whether
each exit (and the final classifier) is right, and what the sample costs when it leaves at each exit
(:class:`ExitOutcomes`). Any threshold vector then maps to exit decisions, accuracy and expected costs without
another forward pass, so calibration is a search over threshold vectors: a grid of per-exit confidence
quantiles (exhaustive up to :data:`GRID_POINTS` vectors), refined one exit at a time on a finer grid. The
result is the vector with the best accuracy among those meeting every limit (the search's constraints on
expected metrics and the trial's budget); when none meets them, the one with the smallest total violation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from nas4dyn.search.objectives import Constraint

GRID_POINTS = 4096  # threshold vectors tried exhaustively
FINE_LEVELS = 33  # quantile levels per exit in the refinement
ROUNDS = 2
_CHUNK = 256  # threshold vectors evaluated at once (memory: chunk x samples x exits booleans)


@dataclass
class ExitOutcomes:
    """Per-sample outcomes of every way out of a subnet over ``N`` validation samples and ``E`` exits.

    ``confidence``: N x E; ``correct``: N x (E + 1) (the final classifier last); ``costs``: metric -> N x (E + 1),
    what the sample costs when it leaves at each exit (gates as they fired for it).
    """

    confidence: np.ndarray
    correct: np.ndarray
    costs: dict[str, np.ndarray]

    @property
    def num_exits(self) -> int:
        return self.confidence.shape[1]

    def exits_for(self, thresholds: np.ndarray) -> np.ndarray:
        """Exit index of every sample (M x N) for each of M threshold vectors (M x E): the first exit whose
        confidence reaches its threshold, else the final classifier (index E)."""
        leave = self.confidence[None, :, :] >= thresholds[:, None, :]
        final = np.ones(leave.shape[:2] + (1,), dtype=bool)
        return np.argmax(np.concatenate([leave, final], axis=2), axis=2)

    def evaluate(self, thresholds: np.ndarray) -> dict[str, np.ndarray]:
        """``accuracy`` and the mean of every cost for each of M threshold vectors (M x E)."""
        rows = np.arange(self.correct.shape[0])[None, :]
        out: dict[str, list[np.ndarray]] = {"accuracy": [], **{k: [] for k in self.costs}}
        for start in range(0, len(thresholds), _CHUNK):
            idx = self.exits_for(thresholds[start : start + _CHUNK])
            out["accuracy"].append(self.correct[rows, idx].mean(axis=1))
            for metric, cost in self.costs.items():
                out[metric].append(cost[rows, idx].mean(axis=1))
        return {k: np.concatenate(v) for k, v in out.items()}

    def cost_range(self, metric: str) -> tuple[float, float]:
        """Expected ``metric`` when every sample leaves at the first exit, and when none leaves early."""
        return float(self.costs[metric][:, 0].mean()), float(self.costs[metric][:, -1].mean())


def _levels(conf: np.ndarray, n: int) -> np.ndarray:
    """``n`` candidate thresholds of one exit: quantiles of its confidence (from "everyone leaves" to "only
    the most confident leave"), kept inside (0, 1]."""
    return np.unique(np.clip(np.quantile(conf, np.linspace(0.0, 1.0, n)), 1e-6, 1.0))


def _score(results: dict[str, np.ndarray], limits: Sequence[Constraint], prefer: Optional[str]) -> np.ndarray:
    """Order key: feasible vectors first, by accuracy, equal accuracy broken by the lower ``prefer`` cost;
    then infeasible ones by smaller total violation. Accuracy steps by 1/N >= 1e-5, so the tie-breaker
    terms (<= 1e-6) never outweigh a real difference."""
    violation = np.zeros_like(results["accuracy"])
    for c in limits:
        violation += np.maximum(0.0, c.violation(results[c.metric]))
    accuracy = results["accuracy"]
    if prefer is not None:
        cost = results[prefer]
        accuracy = accuracy - 1e-6 * cost / max(float(np.max(np.abs(cost))), 1e-12)
    return np.where(violation <= 0.0, 2.0 + accuracy, -violation + 1e-6 * accuracy)


def calibrate(outcomes: ExitOutcomes, limits: Sequence[Constraint], prefer: Optional[str] = None) -> np.ndarray:
    """The threshold vector (length E) with the best accuracy whose expected metrics meet ``limits`` (equal
    accuracy: the lower expected ``prefer`` cost)."""
    e = outcomes.num_exits
    if e == 0:
        return np.zeros(0)
    usable = [c for c in limits if c.metric == "accuracy" or c.metric in outcomes.costs]

    def best_of(candidates: np.ndarray) -> np.ndarray:
        score = _score(outcomes.evaluate(candidates), usable, prefer)
        return candidates[int(np.argmax(score))].copy()

    per_exit = max(2, min(FINE_LEVELS, int(math.floor(GRID_POINTS ** (1.0 / e)))))
    coarse = [_levels(outcomes.confidence[:, k], per_exit) for k in range(e)]
    best = best_of(np.stack(np.meshgrid(*coarse, indexing="ij"), axis=-1).reshape(-1, e))
    fine = [_levels(outcomes.confidence[:, k], FINE_LEVELS) for k in range(e)]
    for _ in range(ROUNDS):
        for k in range(e):
            # Row 0 keeps the current best, so a round never makes the choice worse.
            candidates = np.repeat(best[None, :], len(fine[k]) + 1, axis=0)
            candidates[1:, k] = fine[k]
            best = best_of(candidates)
    return best


def budget_limit(outcomes: ExitOutcomes, metric: str, budget: float) -> Constraint:
    """The trial's budget as a limit on the expected ``metric``: ``budget`` 0 is the cost of leaving at the
    first exit, 1 the cost of never leaving early."""
    lo, hi = outcomes.cost_range(metric)
    return Constraint(metric, "<=", lo + min(max(budget, 0.0), 1.0) * (hi - lo))
