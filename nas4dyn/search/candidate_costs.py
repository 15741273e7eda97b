"""Costs of unmeasured candidates, from predicted exit and gate rates, at table-lookup speed.

A measured trial sums each sample's own path (:mod:`nas4dyn.search.trial`). A candidate that the predictor
scores has no samples, only predicted rates: the share ``r_e`` of images leaving at each exit and the share
of each gated block's units that are on. Its expected cost is then ``Σ_part P(reach part) · cost(part at its
mean gate state)``, where a part of segment ``s`` is reached with probability ``Σ_{e >= s} r_e`` — exact when
exits and gate states are independent and each part's cost is linear in its units (per-filter gates are, apart
from a block's all-off state; DFS is approximated by its cost-relative rate).

Latency parts come from the latency table. MAC parts come from :func:`nas4dyn.cost.macs.mac_parts`, memoised
per block configuration: a block's MACs depend only on the resolution, its stage, whether it opens the stage,
kernel, width, gate and CIGT paths (the latency table's key), so after a few hundred distinct subnets every
candidate's parts are lookups. The gater's MACs are affine in its output rows (one linear layer per row).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from nas4dyn.cost.latency import LatencyModel
from nas4dyn.cost.macs import mac_parts
from nas4dyn.cost.paths import BlockSlot, Part, arch_layout, full_cost, gater_rows
from search_spaces.arch import Arch
from supernet.network import Supernet

# A block slot's parts in mac_parts, by name prefix ("router.1.0", "gate.1.0", "block.1.0").
BLOCK_PREFIXES = ("router", "gate", "block")
EXIT_PREFIXES = ("exit", "confidence")


def expected_cost(parts: Sequence[Part], exit_rates: Sequence[float], units: Sequence[float]) -> float:
    """``Σ_part P(reach) · cost(mean units)``: ``exit_rates`` over the arch's exits then the final classifier,
    ``units[g]`` the mean units on of gated block ``g``."""
    reach = np.cumsum(np.asarray(exit_rates, dtype=float)[::-1])[::-1]  # reach[s] = P(exit index >= s)
    total = 0.0
    for part in parts:
        cost = float(part.cost(units[part.gate])) if part.gate is not None else part.full
        total += reach[part.segment] * cost
    return float(total)


def exit_costs(parts: Sequence[Part], units: Sequence[float], num_exits: int) -> np.ndarray:
    """What a sample costs when it leaves at each exit (the final classifier last), gates at their mean
    ``units``: ``expected_cost(parts, rates, units) == rates @ exit_costs(parts, units, len(rates) - 1)``."""
    segment = np.zeros(num_exits + 1)
    for part in parts:
        segment[part.segment] += float(part.cost(units[part.gate])) if part.gate is not None else part.full
    return np.cumsum(segment)


def fit_exit_shares(shares: Sequence[float], costs: Sequence[float], target: float) -> np.ndarray:
    """``shares`` (the arch's exits, then the final classifier) with the early exits' shares scaled by one
    factor, keeping their proportions, and the final classifier taking the rest, so that the expected cost
    ``shares @ costs`` meets ``target`` as closely as valid shares allow. Calibration sets the thresholds to
    meet the trial's budget on this cost, so the predicted shares are moved onto it (see SubnetPredictor)."""
    shares, costs = np.asarray(shares, dtype=float), np.asarray(costs, dtype=float)
    early = shares[:-1].sum()
    if len(shares) < 2:
        return shares
    if early < 1e-9:  # nothing predicted to leave early: spread the early mass evenly
        shares = np.r_[np.full(len(shares) - 1, 1.0 / (len(shares) - 1)), 0.0]
        early = 1.0
    early_cost = float(shares[:-1] @ costs[:-1]) / early
    if costs[-1] - early_cost <= 1e-12:
        return shares
    scale = float(np.clip((costs[-1] - target) / (early * (costs[-1] - early_cost)), 0.0, 1.0 / early))
    out = shares.copy()
    out[:-1] *= scale
    out[-1] = max(0.0, 1.0 - out[:-1].sum())
    return out


def _block_key(arch: Arch, slot: BlockSlot) -> tuple:
    return (arch.resolution, slot.stage, slot.block == 0, arch.kernels[slot.stage][slot.block],
            arch.widths[slot.stage][slot.block], slot.gate, slot.paths)


@dataclass
class CandidateCosts:
    """Expected MACs and latency of candidates from predicted rates (see the module docstring); built once per
    search process, its MAC memo grows as candidates arrive."""

    net: Supernet
    latency: Optional[LatencyModel] = None
    _blocks: dict[tuple, list[tuple[str, tuple]]] = field(default_factory=dict)  # key -> [(prefix, levels)]
    _fixed: dict[tuple, tuple] = field(default_factory=dict)  # ("stem"|"classifier", r) / (prefix, r, s, b)
    _gater: dict[int, dict[int, float]] = field(default_factory=dict)  # resolution -> rows -> MACs
    traced: int = 0  # subnets traced with mac_parts (memo misses)

    def _gater_macs(self, resolution: int, rows: int) -> Optional[float]:
        points = self._gater.get(resolution, {})
        if rows in points:
            return points[rows]
        if len(points) >= 2:  # affine in rows: extend the line through two measured row counts
            (r0, m0), (r1, m1) = sorted(points.items())[:2]
            return m0 + (m1 - m0) * (rows - r0) / (r1 - r0)
        return None

    def _memo(self, arch: Arch, layout: list[BlockSlot]) -> Optional[list[Part]]:
        """The MAC parts of ``arch`` from the memo, or None when some piece was never traced."""
        r = arch.resolution
        parts: list[Part] = []
        rows = gater_rows(self.net.space, layout)
        if rows:
            macs = self._gater_macs(r, rows)
            if macs is None:
                return None
            parts.append(Part("gater", 0, ((0.0, macs),)))
        for name in ("stem", "classifier"):
            if (name, r) not in self._fixed:
                return None
        parts.append(Part("stem", 0, self._fixed[("stem", r)]))
        gate = 0
        for slot in layout:
            pieces = self._blocks.get(_block_key(arch, slot))
            if pieces is None:
                return None
            for prefix, levels in pieces:
                index = gate if prefix == "block" and slot.gate != "none" else None
                parts.append(Part(f"{prefix}.{slot.name}", slot.segment, levels, index))
            gate += slot.gate != "none"
        for i, e in enumerate(arch.exits):
            for prefix in EXIT_PREFIXES:
                levels = self._fixed.get((prefix, r, e.stage, e.block))
                if levels is None:
                    return None
                parts.append(Part(f"{prefix}.{e.stage}.{e.block}", i, levels))
        parts.append(Part("classifier", len(arch.exits), self._fixed[("classifier", r)]))
        return parts

    def _trace(self, arch: Arch, layout: list[BlockSlot]) -> list[Part]:
        """mac_parts of ``arch`` (extracting it), stored piece by piece in the memo."""
        space = self.net.space
        parts = mac_parts(self.net.extract(arch).cpu(), arch, layout, space.input_channels)
        self.traced += 1
        r = arch.resolution
        slots = {slot.name: slot for slot in layout}
        pieces: dict[str, list[tuple[str, tuple]]] = {}
        for part in parts:
            prefix, _, where = part.name.partition(".")
            if prefix == "gater":
                rows = gater_rows(self.net.space, layout)
                self._gater.setdefault(r, {})[rows] = part.full
            elif prefix in ("stem", "classifier"):
                self._fixed[(prefix, r)] = part.levels
            elif prefix in EXIT_PREFIXES:
                s, b = map(int, where.split("."))
                self._fixed[(prefix, r, s, b)] = part.levels
            else:
                pieces.setdefault(where, []).append((prefix, part.levels))
        for name, group in pieces.items():
            self._blocks[_block_key(arch, slots[name])] = group
        return parts

    def mac_parts(self, arch: Arch) -> list[Part]:
        layout = arch_layout(self.net.space, arch)
        parts = self._memo(arch, layout)
        return parts if parts is not None else self._trace(arch, layout)

    def macs_max(self, arch: Arch) -> float:
        """MACs of the full path (every gate open, every exit head evaluated)."""
        return full_cost(self.mac_parts(arch))

    def _units(self, arch: Arch, gate_rates: Sequence[float]) -> list[float]:
        layout = arch_layout(self.net.space, arch)
        return [rate * slot.units for rate, slot in zip(gate_rates, (s for s in layout if s.gate != "none"))]

    def exit_costs(self, arch: Arch, gate_rates: Sequence[float]) -> dict[str, np.ndarray]:
        """macs_expected (and with a latency table latency_ms) of a sample leaving at each exit of ``arch`` (the
        final classifier last), its gated blocks' units on at ``gate_rates``."""
        units = self._units(arch, gate_rates)
        out = {"macs_expected": exit_costs(self.mac_parts(arch), units, len(arch.exits))}
        if self.latency is not None:
            a, b = self.latency.table.correction
            out["latency_ms"] = a * exit_costs(self.latency.table.parts(arch), units, len(arch.exits)) + b
        return out

    def metrics(self, arch: Arch, exit_rates: Sequence[float], gate_rates: Sequence[float]) -> dict[str, float]:
        """macs_max, macs_expected (and with a latency table latency_ms, latency_ms_max) of ``arch`` whose
        samples leave at each exit with ``exit_rates`` and open each gated block's units at ``gate_rates``."""
        units = self._units(arch, gate_rates)
        macs = self.mac_parts(arch)
        out = {"macs_max": full_cost(macs), "macs_expected": expected_cost(macs, exit_rates, units)}
        if self.latency is not None:
            a, b = self.latency.table.correction
            ms = self.latency.table.parts(arch)
            out["latency_ms"] = a * expected_cost(ms, exit_rates, units) + b
            out["latency_ms_max"] = a * full_cost(ms) + b
        return out
