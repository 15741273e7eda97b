"""One search trial: parameters -> arch -> BN recalibration -> validation pass -> thresholds -> metrics.

:class:`TrialContext` holds what every trial needs (the supernet, a fixed training subset for BatchNorm
recalibration, the validation batches, the latency model); it is built once per process and is picklable, so
Ray ships it to its workers. Costs come from :mod:`nas4dyn.cost`: the MACs of each part of the subnet
(``mac_parts``) and the latency table's entries, combined along each sample's path with the cost model's own
rules (``path_contributions``) — so a trial's ``macs_expected`` equals ``count_macs(net, arch, val_loader)``
for the calibrated arch, while the whole trial needs one forward pass over the validation data.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from nas4dyn.cost.latency import LatencyModel
from nas4dyn.cost.macs import count_macs, mac_parts
from nas4dyn.cost.paths import (
    BlockSlot,
    Part,
    SamplePaths,
    arch_layout,
    full_cost,
    gate_states,
    gated_slots,
    min_cost,
    path_contributions,
)
from nas4dyn.errors import CheckpointError, ConfigError, DataError
from nas4dyn.search.calibrate import ExitOutcomes, budget_limit, calibrate
from nas4dyn.search.encoding import budget, decode
from nas4dyn.search.objectives import EXPECTED_METRICS, Constraint, Objective, budget_metric, needs_latency
from search_spaces.arch import Arch
from supernet.dynamic.heads import confidence
from supernet.network import Supernet
from nas4dyn.train.bn import recalibrate_bn

log = logging.getLogger(__name__)
Batches = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class SearchSettings:
    """What a search optimises and how each trial measures it."""

    objectives: tuple[Objective, ...]
    constraints: tuple[Constraint, ...] = ()
    static: bool = False  # search static subnets only (no exits, no gates)
    bn_images: int = 2000  # training images for BatchNorm recalibration (a fixed subset)
    val_images: Optional[int] = None  # validation images per trial (None: the whole split)
    batch_size: int = 256
    seed: int = 0  # picks the fixed subsets


@dataclass
class TrialResult:
    """A finished trial: the calibrated arch and its metrics (what pareto.json lists)."""

    arch: Arch
    metrics: dict[str, Any]

    def objective_values(self, objectives: tuple[Objective, ...]) -> list[float]:
        return [float(self.metrics[o.metric]) for o in objectives]

    def constraint_values(self, constraints: tuple[Constraint, ...]) -> dict[str, float]:
        return {str(c): float(c.violation(self.metrics[c.metric])) for c in constraints}


@dataclass
class TrialContext:
    """Everything a trial needs, loaded once per process."""

    net: Supernet
    settings: SearchSettings
    bn_batches: Batches
    val_batches: Batches
    latency: Optional[LatencyModel] = None
    data_info: dict[str, Any] = field(default_factory=dict)

    @property
    def cost_metrics(self) -> list[str]:
        return ["macs_expected"] + (["latency_ms"] if self.latency is not None else [])


# ---- loading --------------------------------------------------------------------------------------------------
def cached_batches(dataset: Any, batch_size: int, limit: Optional[int], seed: int) -> Batches:
    """The dataset (a fixed-seed subset of ``limit`` images) as in-memory batches, read once: every trial
    reuses them instead of re-running the per-image transforms."""
    from nas4dyn.data import make_loader

    return [(x, y) for x, y in make_loader(dataset, batch_size, limit=limit, seed=seed)]


def load_context(run_dir: str | Path, settings: SearchSettings, latency_table: Optional[str] = None,
                 data_root: Optional[str] = None) -> TrialContext:
    """Load a run's supernet and its data (``data_info["dataset"]`` of supernet.pt) for searching.

    Raises:
        CheckpointError: no readable supernet in ``run_dir``.
        DataError: the data cannot be found or does not fit the supernet.
        ConfigError: a latency metric without ``latency_table``, or a table of another space.
    """
    from nas4dyn.api import load_supernet_file

    path = Path(run_dir) / "supernet.pt"
    if not path.is_file():
        raise CheckpointError(f"--run {run_dir}: no supernet.pt here; train one with `nas4dyn train --out {run_dir}`")
    net, data_info = load_supernet_file(path)
    bundle = load_run_data(net, data_info, path, data_root)
    latency = _load_latency(latency_table, net, settings)
    return TrialContext(
        # NHWC, as in training: 1.3x the trials per minute of NCHW on the fmnist space (2 CPU cores).
        net=net.to(memory_format=torch.channels_last),
        settings=settings,
        bn_batches=cached_batches(bundle.train_eval, settings.batch_size, settings.bn_images, settings.seed),
        val_batches=cached_batches(bundle.val, settings.batch_size, settings.val_images, settings.seed),
        latency=latency,
        data_info=dict(data_info),
    )


def load_run_data(net: Supernet, data_info: dict[str, Any], path: Path, data_root: Optional[str] = None) -> Any:
    """The data a run was trained on (its DataBundle, without augmentation), as the run read it.

    Raises:
        CheckpointError: ``data_info`` (of the supernet file ``path``) has no data description.
        DataError: the data cannot be found or does not fit the supernet.
    """
    from nas4dyn.data import load_data

    dataset = data_info.get("dataset")
    if not dataset:
        raise CheckpointError(f"{path}: has no data description (data.dataset); re-save it with nas4dyn train")
    synthetic = None
    if dataset == "synthetic":  # regenerated with the shape the supernet was saved with
        synthetic = {k: int(data_info[k]) for k in ("num_classes", "channels", "resolution") if k in data_info}
    bundle = load_data(dataset, data_root=data_root, augment=False, synthetic=synthetic,
                       skip_unreadable=bool(data_info.get("unreadable_skipped")))  # as the run did
    if (bundle.info.channels, bundle.info.num_classes) != (net.space.input_channels, net.space.num_classes):
        raise DataError(f"data {dataset}: {bundle.info.channels} channels / {bundle.info.num_classes} classes, but "
                        f"the supernet takes {net.space.input_channels} / {net.space.num_classes}; pass --data-root "
                        "holding the data the run was trained on")
    return bundle


def _load_latency(latency_table: Optional[str], net: Supernet, settings: SearchSettings) -> Optional[LatencyModel]:
    used = needs_latency(settings.objectives, settings.constraints)
    if latency_table is None:
        if used:
            raise ConfigError(f"{', '.join(used)} needs --latency-table LUT.json (make one with "
                              f"`nas4dyn profile --space {net.space.name} --out lut.json`)")
        return None
    model = LatencyModel.load(latency_table)
    if model.table.space.name != net.space.name:
        raise ConfigError(f"--latency-table {latency_table}: profiled for space {model.table.space.name!r}, but the "
                          f"run's space is {net.space.name!r}; profile this space with `nas4dyn profile`")
    model.check_space(net.space)  # an edited space can keep the entry keys but change the shapes timed
    model.predict(net.space.max_arch())  # fails early (ConfigError) when the table lacks entries
    missing = model.table.missing_gates()
    if missing:  # a trial drawing one of these would fail mid-search
        raise ConfigError(f"--latency-table {latency_table}: a {model.table.runtime} table with no entries for "
                          f"{', '.join(missing)}; search a space without them (drop them from its gates) or "
                          "with a table that has them (torchscript carries every gate kind)")
    return model


# ---- one trial ----------------------------------------------------------------------------------------------
@torch.no_grad()
def _validation_pass(net: Supernet, arch: Arch, batches: Batches) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(confidence N x E, correct N x (E + 1), gate units on N x G) with every exit evaluated."""
    net.set_active(arch)
    net.eval()
    conf, correct, units = [], [], []
    for x, y in batches:
        outs = net.forward_all(x)
        conf.append(torch.stack([confidence(o, net.space.exits.criterion) for o in outs[:-1]], 1)
                    if len(outs) > 1 else torch.zeros(len(x), 0))
        correct.append(torch.stack([o.argmax(1) == y for o in outs], 1))
        units.append(gate_states(net.gate_trace, len(x)))  # the cost model's units, DFS options included
    net.reset_stats()
    return (torch.cat(conf).numpy().astype(np.float64), torch.cat(correct).numpy(),
            torch.cat(units).double().numpy())


def _per_exit(parts: list[Part], units: np.ndarray, num_exits: int, gated: list[BlockSlot]) -> np.ndarray:
    """N x (E + 1): each sample's cost when it leaves at each exit (gate units as they fired for it)."""
    n = units.shape[0]
    cols = []
    for e in range(num_exits + 1):
        paths = SamplePaths(np.full(n, e), units, num_exits, gated)
        cols.append(np.sum(list(path_contributions(parts, paths).values()), axis=0))
    return np.stack(cols, 1)


def evaluate_arch(ctx: TrialContext, arch: Arch, batches: Batches, exit_budget: float = 1.0) -> TrialResult:
    """Recalibrate BN for ``arch`` (fixed training subset), measure every exit on ``batches``, calibrate the
    thresholds (limits: the search's constraints on expected metrics and ``exit_budget``), and report."""
    return evaluate_arch_subsets(ctx, arch, batches, {"all": None}, exit_budget)["all"]


def evaluate_arch_subsets(ctx: TrialContext, arch: Arch, batches: Batches, subsets: dict[str, Optional[np.ndarray]],
                          exit_budget: float = 1.0) -> dict[str, TrialResult]:
    """:func:`evaluate_arch` for several subsets of the images of ``batches`` (row indices into their
    concatenation; None: all) with one BN recalibration and one validation pass: each subset's thresholds are
    calibrated on that subset alone, as a trial measuring only those images would calibrate them."""
    net, space = ctx.net, ctx.net.space
    recalibrate_bn(net, arch, ctx.bn_batches, n_images=ctx.settings.bn_images)
    conf, correct, units = _validation_pass(net, arch, batches)
    layout = arch_layout(space, arch)
    gated = gated_slots(layout)
    parts = {"macs_expected": mac_parts(net.extract(arch), arch, layout, space.input_channels)}
    if ctx.latency is not None:
        parts["latency_ms"] = ctx.latency.table.parts(arch)
    costs = {metric: _per_exit(p, units, len(arch.exits), gated) for metric, p in parts.items()}
    if ctx.latency is not None:  # the table's fitted end-to-end correction, a * table_sum + b
        a, b = ctx.latency.table.correction
        costs["latency_ms"] = a * costs["latency_ms"] + b
    results = {}
    for name, rows in subsets.items():
        take = slice(None) if rows is None else np.asarray(rows)
        outcomes = ExitOutcomes(conf[take], correct[take], {metric: c[take] for metric, c in costs.items()})
        results[name] = _calibrated(ctx, arch, outcomes, units[take], gated, parts["macs_expected"], exit_budget)
    return results


def _calibrated(ctx: TrialContext, arch: Arch, outcomes: ExitOutcomes, units: np.ndarray, gated: list[BlockSlot],
                macs_parts: list[Part], exit_budget: float) -> TrialResult:
    """Calibrate the exit thresholds on ``outcomes`` and report the metrics they give."""
    num_exits = len(arch.exits)
    metric = budget_metric(ctx.settings.objectives)
    limits = [c for c in ctx.settings.constraints if c.metric in EXPECTED_METRICS]
    if num_exits:
        limits.append(budget_limit(outcomes, metric, exit_budget))
    thresholds = calibrate(outcomes, limits, prefer=metric)
    arch = arch.with_thresholds([float(t) for t in thresholds])
    exits = outcomes.exits_for(thresholds[None, :])[0]
    paths = SamplePaths(exits, units, num_exits, gated)
    rows = np.arange(len(exits))
    costs, correct = outcomes.costs, outcomes.correct
    metrics: dict[str, Any] = {
        "accuracy": float(correct[rows, exits].mean()),
        "macs_max": int(full_cost(macs_parts)),
        "macs_min": int(min_cost(macs_parts)),
        "macs_expected": float(costs["macs_expected"][rows, exits].mean()),
    }
    if ctx.latency is not None:
        metrics["latency_ms"] = float(costs["latency_ms"][rows, exits].mean())
        metrics["latency_ms_max"] = float(ctx.latency.predict(arch))
    metrics.update(
        exit_rates=paths.exit_rates(),
        gate_rates=paths.gate_rates(),
        thresholds=[float(t) for t in thresholds],
        exit_budget=float(exit_budget),
        samples=int(len(exits)),
    )
    return TrialResult(arch, metrics)


def run_trial(ctx: TrialContext, params: dict[str, Any]) -> TrialResult:
    """The trial of one parameter vector (see :mod:`nas4dyn.search.encoding`), on the validation batches."""
    return evaluate_arch(ctx, decode(ctx.net.space, params), ctx.val_batches, exit_budget=budget(params))


# ---- bounds -------------------------------------------------------------------------------------------------
def _cheap_candidates(ctx: TrialContext) -> list[Arch]:
    """The smallest static subnet, and (dynamic searches) the same with its first possible exit and with
    every block carrying one gate kind — the subnets whose cheapest path bounds every subnet's cost."""
    space = ctx.net.space
    smallest = space.min_arch()
    if ctx.settings.static:
        return [smallest]
    first_exit = next(((s, b) for s, b in space.exits.positions if b < smallest.depths[s]), None)
    kinds = sorted({g for s, st in enumerate(space.stages) for b in range(st.max_depth) for g in space.allowed_gates(s, b)})
    candidates = []
    for kind in kinds:
        gates = tuple(
            tuple(kind if kind in space.allowed_gates(blk.stage, blk.block, blk.kernel, blk.width) else "none"
                  for blk in smallest.blocks() if blk.stage == s)
            for s in range(len(space.stages))
        )
        arch = dataclasses.replace(smallest, gates=gates)
        candidates.append(arch)
        if first_exit is not None:
            candidates.append(dataclasses.replace(arch, exits=((first_exit[0], first_exit[1], 0.5),)))
    return candidates


def cheapest_costs(ctx: TrialContext) -> dict[str, float]:
    """A lower bound of every cost metric over the space: the cheapest path (leave at the first exit, gates
    at their cheapest state) of the cheapest candidate subnets."""
    best: dict[str, float] = {}
    for arch in _cheap_candidates(ctx):
        report = count_macs(ctx.net, arch)
        values = {"macs_expected": report.macs_min, "macs_max": report.macs_max}
        if ctx.latency is not None:
            gated = gated_slots(arch_layout(ctx.net.space, arch))
            values["latency_ms"] = ctx.latency.predict_path(arch, 0, [0.0] * len(gated))
            values["latency_ms_max"] = ctx.latency.predict(arch)
        for metric, value in values.items():
            best[metric] = min(best.get(metric, math.inf), float(value))
    return best


def check_constraints(ctx: TrialContext) -> None:
    """Fail before any trial when a cost constraint is beyond even the cheapest subnet.

    Raises:
        ConfigError: naming the constraint and the smallest value any subnet reaches.
    """
    upper = [c for c in ctx.settings.constraints if c.op == "<=" and c.metric != "accuracy"]
    if not upper:
        return
    floor = cheapest_costs(ctx)
    for c in upper:
        if floor[c.metric] > c.bound:
            raise ConfigError(f"--constraint {c}: no subnet can meet it — even the cheapest has {c.metric} "
                              f"{floor[c.metric]:.6g}; relax the bound to at least that")


def hv_reference(ctx: TrialContext) -> dict[str, float]:
    """The hypervolume reference point per metric: the validation error of the smallest static subnet (measured
    like a trial) and every cost of the largest static subnet — what the trivial corners of the space reach."""
    space = ctx.net.space
    smallest = evaluate_arch(ctx, space.min_arch(), ctx.val_batches)
    largest = space.max_arch()
    ref = {"accuracy": 1.0 - smallest.metrics["accuracy"]}
    ref["macs_expected"] = ref["macs_max"] = float(count_macs(ctx.net, largest).macs_max)
    if ctx.latency is not None:
        ref["latency_ms"] = ref["latency_ms_max"] = float(ctx.latency.predict(largest))
    return ref
