"""Feature rows and targets of the subnet predictor (:mod:`nas4dyn.search.predictor`).

A row is ``space.encode(arch)`` of the uncalibrated arch (resolution, depths, per block slot kernel, width and
one-hot gate, exits on or off), the trial's exit budget and the static path's MACs relative to the largest
subnet's; the ``extended`` feature set adds what the flat encoding leaves the model to work out from few trials:

- per stage: mean kernel, mean and smallest width, and the summed width × kernel² (its conv work), normalised;
- the exits: how many, the share of the full path's MACs a sample costs when it leaves at the first exit, the
  share the exit budget allows (calibration limits the expected cost to ``first + budget · (full - first)``),
  the log of the full path's MACs, and per exit position its cost share (1 where the position has no exit);
- the gates: how many blocks carry each gate kind.

Targets: the measured validation accuracy; the share of images leaving at each exit position and at the final
classifier; the share of each gated block's units that are on; and for archs with exits the *cost share*, the
measured expected budget metric (MACs or latency) over the limit the budget set, which places the predicted
exit shares on the cost calibration aims for.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
from optuna.trial import FrozenTrial

from nas4dyn.errors import ConfigError
from nas4dyn.search.candidate_costs import CandidateCosts
from nas4dyn.search.encoding import budget, decode
from search_spaces.arch import Arch
from search_spaces.schema import GATE_KINDS
from search_spaces.space import SearchSpace

FEATURE_SETS = ("base", "extended")


@dataclass
class Samples:
    """Measured trials as arrays: features, accuracy, exit shares (per position + final, masked), gate rates
    (per block slot, masked), cost share (NaN where the arch has no exit)."""

    x: np.ndarray
    accuracy: np.ndarray
    exits: np.ndarray
    exit_mask: np.ndarray
    gates: np.ndarray
    gate_mask: np.ndarray
    cost_share: np.ndarray

    def __len__(self) -> int:
        return len(self.accuracy)

    def subset(self, rows: np.ndarray) -> "Samples":
        return Samples(*(getattr(self, f.name)[rows] for f in fields(self)))


def cost_limit(exit_costs: np.ndarray, exit_budget: float) -> float:
    """The expected cost calibration allows at ``exit_budget`` (``exit_costs``: leaving at each exit, the
    final classifier last), as :func:`nas4dyn.search.calibrate.budget_limit` sets it."""
    return float(exit_costs[0] + min(max(exit_budget, 0.0), 1.0) * (exit_costs[-1] - exit_costs[0]))


class Featurizer:
    """Feature rows and target slots of one space (fixed length whatever the arch); ``metric`` is the expected
    cost the trials' exit budget limits (see :func:`nas4dyn.search.objectives.budget_metric`).

    Raises:
        ConfigError: an unknown feature set.
    """

    def __init__(self, space: SearchSpace, costs: CandidateCosts, metric: str = "macs_expected",
                 features: str = "extended"):
        if features not in FEATURE_SETS:
            raise ConfigError(f"predictor features {features!r}: choose one of {', '.join(FEATURE_SETS)}")
        self.space, self.costs, self.metric, self.features = space, costs, metric, features
        self.macs_reference = costs.macs_max(space.max_arch())
        self.positions = list(space.exits.positions)
        self.slots = [f"{s}.{b}" for s, st in enumerate(space.stages) for b in range(st.max_depth)]

    def row(self, arch: Arch, exit_budget: float) -> list[float]:
        macs = self.costs.exit_costs(arch, [1.0] * sum(b.gate != "none" for b in arch.blocks()))["macs_expected"]
        out = [*self.space.encode(arch), exit_budget, macs[-1] / self.macs_reference]
        if self.features == "base":
            return out
        for s, st in enumerate(self.space.stages):
            kernels, widths = np.asarray(arch.kernels[s], float), np.asarray(arch.widths[s], float)
            k, w = max(st.kernels), max(st.widths)
            out += [kernels.mean() / k, widths.mean() / w, widths.min() / w,
                    float(widths @ kernels ** 2) / (w * k * k * st.max_depth)]
        share = macs / macs[-1]
        out += [len(arch.exits), share[0], cost_limit(share, exit_budget) if arch.exits else 1.0,
                float(np.log(macs[-1] / self.macs_reference))]
        at = {(e.stage, e.block): share[i] for i, e in enumerate(arch.exits)}
        out += [at.get(p, 1.0) for p in self.positions]
        out += [sum(b.gate == kind for b in arch.blocks()) for kind in GATE_KINDS[1:]]
        return out

    def exit_mask(self, arch: Arch) -> np.ndarray:
        active = {(e.stage, e.block) for e in arch.exits}
        return np.array([p in active for p in self.positions] + [True])

    def gate_mask(self, arch: Arch) -> np.ndarray:
        gated = {f"{b.stage}.{b.block}" for b in arch.blocks() if b.gate != "none"}
        return np.array([name in gated for name in self.slots])

    def samples(self, trials: Sequence[FrozenTrial]) -> Samples:
        """The measured trials (COMPLETE, with metrics) as :class:`Samples`."""
        rows, acc, exits, emask, gates, gmask, share = [], [], [], [], [], [], []
        for t in trials:
            m = t.user_attrs["metrics"]
            arch = decode(self.space, t.params)
            rows.append(self.row(arch, budget(t.params)))
            acc.append(m["accuracy"])
            mask = self.exit_mask(arch)
            shares = np.zeros(len(mask))
            shares[mask] = m["exit_rates"]
            exits.append(shares)
            emask.append(mask)
            mask = self.gate_mask(arch)
            rate = np.zeros(len(mask))
            rate[mask] = [m["gate_rates"][name] for name, on in zip(self.slots, mask) if on]
            gates.append(rate)
            gmask.append(mask)
            limit = float("nan")
            if arch.exits and self.metric in m:
                limit = cost_limit(self.costs.exit_costs(arch, rate[mask].tolist())[self.metric], budget(t.params))
            share.append(m[self.metric] / limit if limit > 0 else float("nan"))
        return Samples(np.asarray(rows, dtype=np.float32), np.asarray(acc), np.asarray(exits), np.asarray(emask),
                       np.asarray(gates), np.asarray(gmask), np.asarray(share))
