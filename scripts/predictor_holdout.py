"""``bench_predictor.py --precise N``: the predictor against precise labels on subnets no study measured.

The studies' trials are labelled on a 2000-image validation subset, whose noise caps the Kendall τ any predictor
can reach against them (``--retest``). This mode scores the predictor as the goal means it, on held-out subnets
measured precisely:

1. Plan (written once to ``OUT/plan.json``, reused on restart): N subnets not among the studies' trials (same
   arch and exit budget to 0.05 count as the same), half drawn at random the way ``--sampler random`` draws,
   half the kind ``--strategy predictor`` proposes — a predictor fitted on every trial, NSGA-II over
   ``--candidates`` candidates, picked by predicted hypervolume gain over the studies' measured front.
2. Measure (``OUT/measured.json``, rewritten atomically after each subnet; a restart skips what it holds): each
   subnet with its BN recalibrated on the studies' ``bn_images``, one pass over the WHOLE validation split,
   thresholds calibrated per subset of it: ``all`` (the whole split: the precise label), ``study`` (the studies'
   own 2000-image subset: the label a search trial would have given it) and ``rest`` (the split without that
   subset: a precise label sharing no image with the training labels).
3. Score: the predictor fitted on the studies' trials (mlp, gbm, ensemble), τ, RMSE and bias against ``all``
   and ``rest``, beside the subnets' own 2000-image labels against them; the precise labels' own noise and the τ
   an exact predictor could show against them (:func:`label_noise`); with ``--precise-curve``, τ of fits on a
   quarter, half and three quarters of the trials.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import optuna
from scipy.stats import kendalltau
from tqdm import tqdm

from nas4dyn.data import subset_indices
from nas4dyn.errors import ConfigError
from nas4dyn.io import atomic_write_json
from nas4dyn.search.candidate_costs import CandidateCosts
from nas4dyn.search.encoding import budget, decode, suggest
from nas4dyn.search.objectives import budget_metric, parse_objectives
from nas4dyn.search.predictor import MIN_TRIALS, Featurizer, SubnetPredictor
from nas4dyn.search.predictor_strategy import PredictorSettings, _key, query_candidates, select
from nas4dyn.search.trial import SearchSettings, TrialContext, evaluate_arch_subsets, load_context

SETTINGS_ATTR = "nas4dyn:settings"
REFERENCE_ATTR = "nas4dyn:hv_reference"
MODELS = ("mlp", "gbm", "ensemble")


def study_settings(studies: list[optuna.Study]) -> dict[str, Any]:
    """The measuring settings every study shares (objectives, BN and validation images).

    Raises:
        ConfigError: the studies measured differently (their labels would not be one set).
    """
    keys = ("objectives", "constraints", "static", "bn_images", "val_images", "batch_size")
    found = [{k: s.user_attrs.get(SETTINGS_ATTR, {}).get(k) for k in keys} for s in studies]
    if any(f != found[0] for f in found) or found[0]["val_images"] is None:
        raise ConfigError(f"--studies: --precise needs studies measured alike on a validation subset; found {found}")
    return found[0]


def measured_keys(space: Any, trials: list) -> set:
    """The identities (arch, exit budget to 0.05) of the studies' trials: a held-out subnet is none of them."""
    return {_key(decode(space, t.params), t.params) for t in trials}


def plan_subnets(ctx: TrialContext, trials: list, n: int, reference: dict[str, float], seed: int,
                 candidates: int) -> list[dict[str, Any]]:
    """``n`` held-out parameter vectors: ``n - n // 2`` random, ``n // 2`` proposed by the predictor strategy."""
    space, static = ctx.net.space, ctx.settings.static
    seen = measured_keys(space, trials)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed + 7919))
    plan: list[dict[str, Any]] = []
    while len(plan) < n - n // 2:
        params = suggest(study.ask(), space, static)
        key = _key(decode(space, params), params)
        if key not in seen:
            seen.add(key)
            plan.append({"kind": "random", "params": params})
    costs = CandidateCosts(ctx.net, ctx.latency)
    featurizer = Featurizer(space, costs, budget_metric(ctx.settings.objectives))
    predictor = SubnetPredictor("auto", seed=seed).fit(featurizer.samples(trials))
    pool = query_candidates(ctx, predictor, featurizer, costs, PredictorSettings(candidates=candidates), seed)
    measured = [t.user_attrs["metrics"] for t in trials]
    picks = select(pool, measured, ctx, reference, n // 2, seen, np.random.default_rng(seed))
    proposed = [{"kind": "proposed", "params": c.params, "predicted": c.metrics} for c in picks]
    # interleaved, so that a measurement stopped early (--precise-no-measure scores it) holds both kinds alike
    return [p for pair in zip(plan, proposed) for p in pair] + plan[len(proposed):] + proposed[len(plan):]


def measure(ctx: TrialContext, plan: list[dict[str, Any]], subsets: dict[str, Optional[np.ndarray]],
            path: Path, more: bool = True) -> list[dict[str, Any]]:
    """Each planned subnet's metrics per subset; ``path`` holds the finished ones and grows after each
    (``more=False``: only what it holds)."""
    done = json.loads(path.read_text()) if path.is_file() else []
    if [d["params"] for d in done] != [p["params"] for p in plan[:len(done)]]:
        raise ConfigError(f"{path}: measured subnets of another plan; move it away or pass another --precise-out")
    for entry in tqdm(plan[len(done):] if more else [], desc="precise", initial=len(done), total=len(plan)):
        arch = decode(ctx.net.space, entry["params"])
        results = evaluate_arch_subsets(ctx, arch, ctx.val_batches, subsets, exit_budget=budget(entry["params"]))
        done.append({**entry, **{name: r.metrics for name, r in results.items()}})
        atomic_write_json(path, done)
    return done


def _tau_rmse(pred: np.ndarray, label: np.ndarray) -> dict[str, float]:
    return {"tau": float(kendalltau(pred, label).statistic), "rmse": float(np.sqrt(np.mean((pred - label) ** 2))),
            "bias": float(np.mean(pred - label))}


def score(ctx: TrialContext, trials: list, measured: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    """τ / RMSE / mean bias of each model (fitted on ``trials``) and of the 2000-image labels, against the
    precise labels, per group (random, proposed, all) of at least 3 subnets."""
    if len(measured) < 3:
        return {}
    space = ctx.net.space
    featurizer = Featurizer(space, CandidateCosts(ctx.net, ctx.latency), budget_metric(ctx.settings.objectives))
    model = SubnetPredictor("gbm", seed=seed)
    model._fit(featurizer.samples(trials), "gbm")  # holds both the MLP and LightGBM: every kind predicts from it
    archs = [decode(space, m["params"]) for m in measured]
    budgets = [budget(m["params"]) for m in measured]
    predicted = {}
    for kind in MODELS:
        model.chosen = kind
        predicted[kind] = model.predict(featurizer, archs, budgets).accuracy
    predicted["own subset label"] = np.asarray([m["study"]["accuracy"] for m in measured])
    groups = {"all": np.arange(len(measured))}
    for kind in ("random", "proposed"):
        groups[kind] = np.asarray([i for i, m in enumerate(measured) if m["kind"] == kind], dtype=int)
    out: dict[str, Any] = {}
    for group, rows in groups.items():
        if len(rows) < 3:
            continue
        out[group] = {"subnets": int(len(rows))}
        for target in ("all", "rest"):
            label = np.asarray([measured[i][target]["accuracy"] for i in rows])
            out[group][target] = {name: _tau_rmse(p[rows], label) for name, p in predicted.items()}
        out[group]["noise"] = label_noise([measured[i] for i in rows])
    return out


def learning_curve(ctx: TrialContext, trials: list, measured: list[dict[str, Any]], seed: int,
                   repeats: int = 3) -> list[dict[str, Any]]:
    """τ against the whole-split labels of each model fitted on a random quarter, half, three quarters and all
    of ``trials`` (``repeats`` draws each, all of them once): does the predictor still gain from more trials?"""
    featurizer = Featurizer(ctx.net.space, CandidateCosts(ctx.net, ctx.latency), budget_metric(ctx.settings.objectives))
    data = featurizer.samples(trials)
    archs = [decode(ctx.net.space, m["params"]) for m in measured]
    budgets = [budget(m["params"]) for m in measured]
    label = np.asarray([m["all"]["accuracy"] for m in measured])
    rng = np.random.default_rng(seed)
    curve = []
    for size in sorted({n for f in (0.25, 0.5, 0.75, 1.0) if (n := round(f * len(trials))) >= MIN_TRIALS}):
        taus: dict[str, list[float]] = {kind: [] for kind in MODELS}
        for _ in range(repeats if size < len(trials) else 1):
            rows = np.sort(rng.choice(len(trials), size, replace=False))
            model = SubnetPredictor("gbm", seed=seed)
            model._fit(data.subset(rows), "gbm")
            for kind in MODELS:
                model.chosen = kind
                taus[kind].append(_tau_rmse(model.predict(featurizer, archs, budgets).accuracy, label)["tau"])
        curve.append({"trials": int(size), **{k: float(np.mean(v)) for k, v in taus.items()},
                      **{f"{k}_sd": float(np.std(v)) for k, v in taus.items()}})
    return curve


def label_noise(measured: list[dict[str, Any]], draws: int = 200, seed: int = 0) -> dict[str, float]:
    """The precise labels' own noise, from the disjoint ``study`` and ``rest`` subsets (a label on n images
    carries noise of variance c / n, independent between subsets; c from the spread of their differences), and
    what it lets any predictor show, by simulation on these labels (the subnets bunch within a point or two, so
    the ranks, not a Gaussian formula, decide):

    - ``tau_ceiling``: Kendall τ between the whole-split labels and the same plus that noise once more — an exact
      predictor of the true accuracy against the labels (slightly low: the labels' spread holds their noise);
    - ``tau_split_model`` beside ``tau_split``: the τ the model expects between the two subsets' labels, and
      the τ measured (the check that the model fits)."""
    n_study, n_rest = measured[0]["study"]["samples"], measured[0]["rest"]["samples"]
    study, rest, whole = (np.asarray([m[k]["accuracy"] for m in measured]) for k in ("study", "rest", "all"))
    c = float(np.var(study - rest, ddof=1)) / (1 / n_study + 1 / n_rest)  # noise variance times images
    rng = np.random.default_rng(seed)

    def noisy(n: int) -> np.ndarray:
        return whole + rng.standard_normal(len(whole)) * np.sqrt(c / n)

    ceiling = [kendalltau(whole, noisy(n_study + n_rest)).statistic for _ in range(draws)]
    split = [kendalltau(noisy(n_study), noisy(n_rest)).statistic for _ in range(draws)]
    return {"sd_whole_split": float(np.sqrt(c / (n_study + n_rest))), "sd_study_subset": float(np.sqrt(c / n_study)),
            "sd_subnets": float(np.std(whole, ddof=1)), "study_minus_rest": float(np.mean(study - rest)),
            "tau_ceiling": float(np.mean(ceiling)), "tau_split_model": float(np.mean(split)),
            "tau_split": float(kendalltau(study, rest).statistic)}


def run_precise(args: Any, trials: list, studies: list[optuna.Study]) -> dict[str, Any]:
    """The whole mode (see the module docstring); returns the figures."""
    found = study_settings(studies)
    settings = SearchSettings(parse_objectives(",".join(found["objectives"])), bn_images=found["bn_images"],
                              static=bool(found["static"]), val_images=None, batch_size=found["batch_size"])
    if found["constraints"]:
        raise ConfigError("--precise: studies with constraints are not supported (their candidates differ)")
    ctx = load_context(args.run, settings)
    total = sum(len(y) for _, y in ctx.val_batches)
    if found["val_images"] >= total:
        raise ConfigError(f"--precise: the studies measured {found['val_images']} of {total} validation images; "
                          "there is no more precise label to compare with")
    study_rows = np.asarray(subset_indices(total, found["val_images"], settings.seed))  # what their trials measured
    subsets = {"all": None, "study": study_rows, "rest": np.setdiff1d(np.arange(total), study_rows)}
    out = Path(args.precise_out)
    out.mkdir(parents=True, exist_ok=True)
    plan_path = out / "plan.json"
    plan = json.loads(plan_path.read_text()) if plan_path.is_file() else None
    if plan is not None and len(plan) != args.precise:
        raise ConfigError(f"--precise-out {out}: holds a plan of {len(plan)} subnets; pass --precise {len(plan)} to "
                          "resume it, or another --precise-out")
    if plan is not None:
        seen = measured_keys(ctx.net.space, trials)
        if any(_key(decode(ctx.net.space, p["params"]), p["params"]) in seen for p in plan):
            raise ConfigError(f"--precise-out {out}: its plan holds subnets these --studies measured (a plan made "
                              "for other studies); pass another --precise-out")
    else:
        reference = studies[0].user_attrs[REFERENCE_ATTR]
        plan = plan_subnets(ctx, trials, args.precise, reference, args.seed, args.candidates)
        atomic_write_json(plan_path, plan)
    measured = measure(ctx, plan, subsets, out / "measured.json", more=not args.precise_no_measure)
    result = {"subnets_planned": len(plan), "subnets_measured": len(measured), "val_images": total,
              "study_val_images": found["val_images"], "bn_images": found["bn_images"],
              "scores": score(ctx, trials, measured, args.seed)}
    if getattr(args, "precise_curve", False) and len(measured) >= 3:
        result["curve"] = learning_curve(ctx, trials, measured, args.seed)
    return result


def precise_table(result: dict[str, Any]) -> str:
    """Markdown: one row per predictor (and the subnets' own subset labels) and group, against both precise labels."""
    lines = ["| group | predicts | τ vs whole split | RMSE (points) | bias (points) | τ vs the split without the "
             "studies' subset | RMSE |", "|---|---|---|---|---|---|---|"]
    for group, r in result["scores"].items():
        for name in r["all"]:
            a, b = r["all"][name], r["rest"][name]
            lines.append(f"| {group} ({r['subnets']}) | {name} | {a['tau']:.3f} | {100 * a['rmse']:.2f} | "
                         f"{100 * a['bias']:+.2f} | {b['tau']:.3f} | {100 * b['rmse']:.2f} |")
    if result.get("curve"):
        lines += ["", "| trials fitted on | " + " | ".join(f"τ {k}" for k in MODELS) + " |", "|---|---|---|---|"]
        lines += [f"| {c['trials']} | " + " | ".join(f"{c[k]:.3f} ± {c[k + '_sd']:.3f}" for k in MODELS) + " |"
                  for c in result["curve"]]
    lines += ["", "| group | label noise SD, whole split / studies' subset (points) | subnets' SD (points) | "
              "studies' subset − rest (points) | τ subset vs rest: noise model / measured | τ an exact predictor "
              "would reach against the whole-split labels |", "|---|---|---|---|---|---|"]
    for group, r in result["scores"].items():
        n = r["noise"]
        lines.append(f"| {group} ({r['subnets']}) | {100 * n['sd_whole_split']:.2f} / "
                     f"{100 * n['sd_study_subset']:.2f} | {100 * n['sd_subnets']:.2f} | "
                     f"{100 * n['study_minus_rest']:+.2f} | {n['tau_split_model']:.3f} / {n['tau_split']:.3f} | "
                     f"{n['tau_ceiling']:.3f} |")
    return "\n".join(lines)
