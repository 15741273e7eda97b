"""Search outputs: pareto.json, trials.csv, pareto.png, and the hypervolume of the front.

Hypervolume normalisation (so that studies of one supernet compare, whatever the sampler, and the number is
sensitive to the front): each objective becomes a loss divided by its value at a trivial corner of the space —
the error ``1 - accuracy`` by the validation error of the smallest static subnet (``min_arch``), each cost by
the cost of the largest static subnet (``max_arch``: its MACs, or its predicted latency) — and the reference
point is 1 in every loss. The hypervolume is then the share of the box between the ideal point (no error, no
cost) and those corners that the feasible completed trials dominate, in [0, 1]; subnets worse than the smallest
one's error or dearer than the largest one add nothing. Computed with Optuna's exact (WFG) hypervolume.
"""
from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import optuna
from optuna._hypervolume import compute_hypervolume  # Optuna's exact WFG hypervolume
from optuna.study._multi_objective import _fast_non_domination_rank
from optuna.trial import FrozenTrial, TrialState

from nas4dyn.io import atomic_write, atomic_write_json, atomic_write_text
from nas4dyn.search.objectives import Constraint, Objective

log = logging.getLogger(__name__)

AXIS_LABELS = {"latency_ms": "expected latency (ms)", "macs_expected": "expected MMACs per image"}
CSV_METRICS = ("accuracy", "macs_expected", "macs_max", "macs_min", "latency_ms", "latency_ms_max", "exit_budget",
               "samples")


def completed(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if "metrics" in t.user_attrs]


def feasible(trial: FrozenTrial) -> bool:
    return all(v <= 0.0 for v in trial.constraints.values())


def front(study: optuna.Study) -> list[FrozenTrial]:
    """Optuna's Pareto front (feasible trials only when the study has constraints), cheapest first."""
    trials = [t for t in study.best_trials if "metrics" in t.user_attrs]
    return sorted(trials, key=lambda t: (t.user_attrs["metrics"]["macs_expected"], -t.user_attrs["metrics"]["accuracy"]))


def infeasibility(study: optuna.Study, constraints: Sequence[Constraint]) -> str:
    """Why no completed trial is feasible: how many each constraint removed and the best value any reached."""
    trials = completed(study)
    parts = []
    for c in constraints:
        values = [t.user_attrs["metrics"][c.metric] for t in trials if c.metric in t.user_attrs["metrics"]]
        removed = sum(t.constraints.get(str(c), 0.0) > 0 for t in trials)
        if removed and values:
            best = max(values) if c.op == ">=" else min(values)
            parts.append(f"{c} removed {removed} (best {c.metric} reached: {best:.6g})")
    return (f"no feasible subnet among {len(trials)} completed trials: {', '.join(parts) or 'every trial failed'}; "
            "relax that --constraint (with another --study) or run more --trials")


def normalised_losses(metrics: Sequence[dict[str, Any]], objectives: Sequence[Objective],
                      reference: dict[str, float]) -> np.ndarray:
    """One row per trial: every objective as a loss in units of its reference (see the module docstring)."""
    rows = []
    for m in metrics:
        row = []
        for o in objectives:
            value = float(m[o.metric])
            if o.metric == "accuracy":
                value = 1.0 - value if o.direction == "max" else value
            elif o.direction == "max":  # a cost to maximise: its shortfall below the reference is the loss
                value = reference[o.metric] - value
            row.append(value / max(reference[o.metric], 1e-12))
        rows.append(row)
    return np.asarray(rows, dtype=float).reshape(len(rows), len(objectives))


def hypervolume(metrics: Sequence[dict[str, Any]], objectives: Sequence[Objective], reference: dict[str, float]) -> float:
    """Normalised hypervolume of the given trials' metrics, in [0, 1]."""
    ref = np.ones(len(objectives))
    losses = normalised_losses(metrics, objectives, reference)
    losses = losses[np.all(losses < ref, axis=1)]
    return float(compute_hypervolume(losses, ref)) if len(losses) else 0.0


def by_rank(trials: Sequence[FrozenTrial], objectives: Sequence[Objective],
            reference: dict[str, float]) -> list[tuple[FrozenTrial, int]]:
    """The feasible ones of ``trials`` with their non-domination rank on their measured metrics (0: no other one
    dominates them), best first, ties in the given order."""
    good = [t for t in trials if feasible(t)]
    if not good:
        return []
    losses = normalised_losses([t.user_attrs["metrics"] for t in good], objectives, reference)
    ranks = _fast_non_domination_rank(losses)
    return [(good[i], int(ranks[i])) for i in np.argsort(ranks, kind="stable")]


def study_hypervolume(study: optuna.Study, objectives: Sequence[Objective], reference: dict[str, float]) -> float:
    return hypervolume([t.user_attrs["metrics"] for t in completed(study) if feasible(t)], objectives, reference)


# ---- files --------------------------------------------------------------------------------------------------
def pareto_entries(study: optuna.Study) -> list[dict[str, Any]]:
    """pareto.json: ``[{"arch": Arch.to_dict(), "metrics": {...}}]``, cheapest first; ``metrics.trial`` is the
    Optuna trial number."""
    return [{"arch": t.user_attrs["arch"], "metrics": {**t.user_attrs["metrics"], "trial": t.number}}
            for t in front(study)]


def trials_csv(study: optuna.Study, objectives: Sequence[Objective]) -> str:
    """Every trial (any state): number, state, timing, objective values, feasibility and constraint
    violations, the main metrics, exit thresholds and rates, and the arch as JSON."""
    trials = study.get_trials(deepcopy=False)
    constraint_keys = sorted({k for t in trials for k in t.constraints})
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["number", "state", "started", "duration_s", *[f"value:{o}" for o in objectives], "feasible",
                     *[f"violation:{k}" for k in constraint_keys], *CSV_METRICS, "thresholds", "exit_rates",
                     "gate_rates", "arch"])
    for t in trials:
        m = t.user_attrs.get("metrics", {})
        values = list(t.values) if t.values is not None else [""] * len(objectives)
        duration = t.duration.total_seconds() if t.duration is not None else ""
        writer.writerow([
            t.number, t.state.name, t.datetime_start.isoformat() if t.datetime_start else "", duration, *values,
            feasible(t) if t.state == TrialState.COMPLETE else "",
            *[t.constraints.get(k, "") for k in constraint_keys],
            *[m.get(k, "") for k in CSV_METRICS],
            *[json.dumps(m[k]) if k in m else "" for k in ("thresholds", "exit_rates", "gate_rates")],
            json.dumps(t.user_attrs["arch"]) if "arch" in t.user_attrs else "",
        ])
    return out.getvalue()


def plot_pareto(study: optuna.Study, path: Path, title: str, constraints: Sequence[Constraint] = ()) -> None:
    """pareto.png: accuracy against expected latency (when measured) and expected MACs; every completed trial
    grey (infeasible ones as crosses), the front highlighted, constraint bounds dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = completed(study)
    best = front(study)
    axes_metrics = [m for m in ("latency_ms", "macs_expected") if any(m in t.user_attrs["metrics"] for t in trials)]
    axes_metrics = axes_metrics or ["macs_expected"]
    fig, axes = plt.subplots(1, len(axes_metrics), figsize=(6 * len(axes_metrics), 4.5), squeeze=False)
    for ax, metric in zip(axes[0], axes_metrics):
        scale = 1e-6 if metric == "macs_expected" else 1.0
        for ok, marker in ((True, "o"), (False, "x")):
            pts = [(t.user_attrs["metrics"][metric] * scale, t.user_attrs["metrics"]["accuracy"])
                   for t in trials if feasible(t) == ok and metric in t.user_attrs["metrics"]]
            if pts:
                ax.scatter(*zip(*pts), c="0.7", marker=marker, s=18, label="trials" if ok else "infeasible")
        pts = sorted((t.user_attrs["metrics"][metric] * scale, t.user_attrs["metrics"]["accuracy"]) for t in best
                     if metric in t.user_attrs["metrics"])
        if pts:
            ax.plot(*zip(*pts), "-o", c="tab:red", ms=5, label="Pareto front")
        for c in constraints:
            if c.metric == metric:
                ax.axvline(c.bound * scale, ls="--", c="tab:blue", lw=1, label=str(c))
            elif c.metric == "accuracy":
                ax.axhline(c.bound, ls="--", c="tab:blue", lw=1, label=str(c))
        ax.set_xlabel(AXIS_LABELS[metric])
        ax.set_ylabel("validation accuracy")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def write_outputs(study: optuna.Study, out_dir: Path, objectives: Sequence[Objective],
                  reference: dict[str, float], constraints: Sequence[Constraint] = ()) -> float:
    """Write pareto.json, trials.csv and pareto.png (each atomically); returns the normalised hypervolume."""
    out_dir.mkdir(parents=True, exist_ok=True)
    hv = study_hypervolume(study, objectives, reference)
    atomic_write_json(out_dir / "pareto.json", pareto_entries(study))
    atomic_write_text(out_dir / "trials.csv", trials_csv(study, objectives))
    plot_pareto(study, out_dir / "pareto.png", f"study {study.study_name}: {len(completed(study))} trials, "
                f"hypervolume {hv:.4f}", constraints)
    return hv
