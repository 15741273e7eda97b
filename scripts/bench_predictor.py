"""Offline evaluation of the subnet predictor on measured trials: no subnet is measured again.

Loads the completed trials of one or more search studies of a run (their arch parameters, exit budget, measured
accuracy, exit / gate rates and expected MACs), drops repeats (same arch and exit budget to 0.05, e.g. the corners
every study starts from), and scores each predictor variant out of fold with repeated K-fold (fixed seeds):

- accuracy: Kendall τ and RMSE per variant (the feature set, the model, LightGBM settings);
- rates: mean absolute error of the exit shares and gate rates, and the median / 90th-percentile relative error
  of the expected MACs a candidate would get from them (CandidateCosts, predicted gate rates), with the MLP's
  exit shares as they are and moved onto the predicted cost share of the budget's limit (what the search uses).

``--held-out NAME`` adds a second test: fit on every other study, predict the trials of the study whose path
contains NAME (e.g. the predictor strategy's own proposals: the search picks candidates where the model errs).

``--retest N`` measures how far any predictor could rank these labels: N of the trials measured again, as the
studies measured them (BN recalibrated on the same ``--bn-images``), on two disjoint sets of ``--val-images``
validation images; Kendall τ between the two measurements is the labels' own test-retest agreement.

``--precise N`` scores the predictor against precise labels on N held-out subnets measured on the whole
validation split (scripts/predictor_holdout.py; resumable, its files under ``--precise-out``).

Usage: python scripts/bench_predictor.py --run /work/runs/default --studies OUT/*/study.db [--folds 5]
       [--repeats 3] [--seed 0] [--only random] [--held-out predictor] [--retest 40 --val-images 2000
       --bn-images 1000] [--precise 72 --precise-out DIR] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Optional

import lightgbm
import numpy as np
import optuna
import torch
from scipy.stats import kendalltau

from nas4dyn.api import load_supernet_file
from nas4dyn.errors import Nas4dynError
from nas4dyn.search.candidate_costs import CandidateCosts
from nas4dyn.search.encoding import budget, decode
from nas4dyn.search.outputs import completed
from nas4dyn.search.predictor import GBM_PARAMS, Featurizer, Samples, SubnetPredictor, rates_of
from nas4dyn.search.predictor_features import FEATURE_SETS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from predictor_holdout import precise_table, run_precise  # noqa: E402


@dataclass
class Variant:
    """One row of the τ table: a feature set and a way to predict accuracy from a fitted MLP predictor."""

    name: str
    features: str
    model: str  # "mlp" | "gbm" | "ensemble" | "rank"
    overrides: Optional[dict[str, Any]] = None
    monotone: tuple[str, ...] = ()  # feature groups constrained non-decreasing (see monotone_vector)


VARIANTS = [
    Variant("MLP, base features (before)", "base", "mlp"),
    Variant("LightGBM, base features (before)", "base", "gbm"),
    Variant("MLP, extended features", "extended", "mlp"),
    Variant("LightGBM, extended features (kept)", "extended", "gbm"),
    Variant("LightGBM ext., smaller trees (7 leaves, lr 0.03, 500 rounds)", "extended", "gbm",
            {"num_leaves": 7, "min_data_in_leaf": 5, "learning_rate": 0.03, "num_boost_round": 500}),
    Variant("LightGBM ext., monotone in budget / limit / MACs / widths", "extended", "gbm", monotone=("cost",)),
    Variant("LightGBM ext., lambdarank objective", "extended", "rank"),
    Variant("mean of MLP and LightGBM, ext.", "extended", "ensemble"),
]


def load_trials(paths: list[str]) -> tuple[list, list[str]]:
    """Completed trials of every study (one per storage file), repeats dropped, and each trial's source."""
    trials, sources, seen = [], [], set()
    for path in paths:
        study = optuna.load_study(study_name=None, storage=f"sqlite:///{path}")
        for t in completed(study):
            key = (str(sorted(t.user_attrs["arch"].items())), round(budget(t.params) * 20))
            if key not in seen:
                seen.add(key)
                trials.append(t)
                sources.append(path)
    return trials, sources


def monotone_vector(featurizer: Featurizer, groups: tuple[str, ...]) -> list[int]:
    """LightGBM monotone constraints: +1 on the exit budget, the full path's MACs (both sets), and in the
    extended set the per-stage mean width and conv work, the budget's cost limit and the log MACs."""
    n = len(featurizer.space.encode(featurizer.space.max_arch()))
    vec = [0] * len(featurizer.row(featurizer.space.max_arch(), 1.0))
    if "cost" in groups:
        vec[n] = vec[n + 1] = 1
        for s in range(len(featurizer.space.stages)):
            vec[n + 2 + 4 * s + 1] = vec[n + 2 + 4 * s + 3] = 1
        stats = n + 2 + 4 * len(featurizer.space.stages)
        vec[stats + 2] = vec[stats + 3] = 1
    return vec


def accuracy_model(variant: Variant, featurizer: Featurizer, seed: int) -> Callable:
    """fit(train Samples, fitted MLP predictor) -> predict(x) for the variant's accuracy."""
    def fit(train: Samples, mlp: SubnetPredictor) -> Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
        params = {**GBM_PARAMS, "seed": seed, **(variant.overrides or {})}
        rounds = params.pop("num_boost_round")
        if variant.monotone:
            params["monotone_constraints"] = monotone_vector(featurizer, variant.monotone)
        data = lightgbm.Dataset(train.x, train.accuracy)
        if variant.model == "rank":  # relevance: the accuracy's rank in 31 levels, one query holding every trial
            levels = np.floor(np.argsort(np.argsort(train.accuracy)) / len(train) * 31).astype(int)
            params.update(objective="lambdarank", label_gain=list(range(32)), lambdarank_truncation_level=len(train))
            data = lightgbm.Dataset(train.x, levels, group=[len(train)])
        gbm = lightgbm.train(params, data, num_boost_round=rounds) if variant.model != "mlp" else None

        def predict(x: np.ndarray, emask: np.ndarray, gmask: np.ndarray) -> np.ndarray:
            mlp_acc = mlp.predict_x(x, emask, gmask).accuracy
            if variant.model == "mlp":
                return mlp_acc
            return (gbm.predict(x) + mlp_acc) / 2 if variant.model == "ensemble" else gbm.predict(x)
        return predict
    return fit


def rate_errors(featurizer: Featurizer, predictor: SubnetPredictor, trials: list, data: Samples,
                rows: np.ndarray) -> dict[str, list[float]]:
    """Per held-out trial: exit-share and gate-rate absolute errors, expected-MAC relative error (raw MLP
    shares and moved onto the predicted cost share)."""
    out: dict[str, list[float]] = {"exit_mae": [], "gate_mae": [], "macs_raw": [], "macs": []}
    pred = predictor.predict_x(data.x[rows], data.exit_mask[rows], data.gate_mask[rows])
    for j, i in enumerate(rows):
        t = trials[i]
        arch, m = decode(featurizer.space, t.params), t.user_attrs["metrics"]
        exits, gates = rates_of(featurizer, arch, pred, j, budget(t.params))
        raw = pred.exits[j][data.exit_mask[i]].tolist()
        if arch.exits:
            out["exit_mae"] += np.abs(np.asarray(exits) - m["exit_rates"]).tolist()
        out["gate_mae"] += np.abs(pred.gates[j][data.gate_mask[i]] - data.gates[i][data.gate_mask[i]]).tolist()
        for key, shares in (("macs_raw", raw), ("macs", exits)):
            got = featurizer.costs.metrics(arch, shares, gates)["macs_expected"]
            out[key].append(abs(got / m["macs_expected"] - 1))
    return out


def evaluate(trials: list, featurizers: dict[str, Featurizer], folds: int, repeats: int, seed: int,
             test_rows: Optional[np.ndarray] = None) -> dict[str, Any]:
    """Repeated K-fold over ``trials`` (or, with ``test_rows``, fit on the others and predict those once)."""
    results: dict[str, Any] = {v.name: {"tau": [], "rmse": []} for v in VARIANTS}
    rates: dict[str, dict[str, list[float]]] = {}
    for features, featurizer in featurizers.items():
        data = featurizer.samples(trials)
        variants = [v for v in VARIANTS if v.features == features]
        splits = []
        for rep in range(1 if test_rows is not None else repeats):
            if test_rows is not None:
                splits.append([(np.setdiff1d(np.arange(len(data)), test_rows), test_rows)])
            else:
                order = np.random.default_rng(seed + rep).permutation(len(data))
                splits.append([(np.setdiff1d(order, f), f) for f in np.array_split(order, folds)])
        errors: dict[str, list[float]] = {}
        for rep, split in enumerate(splits):
            predicted = {v.name: np.full(len(data), np.nan) for v in variants}
            for train, test in split:
                mlp = SubnetPredictor("mlp", seed=seed + rep)
                mlp._fit(data.subset(train), "mlp")  # the rate heads and the cost share, whatever the accuracy model
                for v in variants:
                    predict = accuracy_model(v, featurizer, seed + rep)(data.subset(train), mlp)
                    predicted[v.name][test] = predict(data.x[test], data.exit_mask[test], data.gate_mask[test])
                for k, e in rate_errors(featurizer, mlp, trials, data, test).items():
                    errors.setdefault(k, []).extend(e)
            rows = np.flatnonzero(np.isfinite(predicted[variants[0].name]))
            for v in variants:
                p, y = predicted[v.name][rows], data.accuracy[rows]
                results[v.name]["tau"].append(float(kendalltau(p, y).statistic))
                results[v.name]["rmse"].append(float(np.sqrt(np.mean((p - y) ** 2))) if v.model != "rank" else None)
        rates[features] = {"exit_mae": float(np.mean(errors["exit_mae"])), "gate_mae": float(np.mean(errors["gate_mae"])),
                           **{f"{k}_median": float(np.median(errors[k])) for k in ("macs_raw", "macs")},
                           **{f"{k}_p90": float(np.percentile(errors[k], 90)) for k in ("macs_raw", "macs")}}
    return {"accuracy": results, "rates": rates}


def table(result: dict[str, Any]) -> str:
    lines = ["| variant | τ (mean ± sd over repeats) | RMSE (points) |", "|---|---|---|"]
    for name, r in result["accuracy"].items():
        rmse = [x for x in r["rmse"] if x is not None]
        lines.append(f"| {name} | {np.mean(r['tau']):.3f} ± {np.std(r['tau']):.3f} | "
                     f"{100 * np.mean(rmse):.2f} |" if rmse else f"| {name} | {np.mean(r['tau']):.3f} ± "
                     f"{np.std(r['tau']):.3f} | n/a (ranks only) |")
    lines += ["", "| features | exit-share MAE | gate-rate MAE | expected MACs, MLP shares: median / p90 error | "
              "moved onto the predicted cost share: median / p90 |", "|---|---|---|---|---|"]
    for features, r in result["rates"].items():
        lines.append(f"| {features} | {r['exit_mae']:.3f} | {r['gate_mae']:.3f} | {100 * r['macs_raw_median']:.1f}% / "
                     f"{100 * r['macs_raw_p90']:.1f}% | {100 * r['macs_median']:.1f}% / {100 * r['macs_p90']:.1f}% |")
    return "\n".join(lines)


def retest(run: str, trials: list, n: int, val_images: int, bn_images: int, seed: int) -> dict[str, Any]:
    """Accuracy of ``n`` trials (a fixed random pick) on two disjoint validation subsets of ``val_images``."""
    from tqdm import tqdm

    from nas4dyn.search.objectives import parse_objectives
    from nas4dyn.search.trial import SearchSettings, evaluate_arch, load_context

    settings = SearchSettings(parse_objectives("accuracy:max,macs_expected:min"), bn_images=bn_images)
    ctx = load_context(run, settings)  # the whole validation split, in its fixed order
    images = torch.cat([x for x, _ in ctx.val_batches])
    labels = torch.cat([y for _, y in ctx.val_batches])
    if len(images) < 2 * val_images:
        raise SystemExit(f"--val-images {val_images}: the validation split holds {len(images)}, need twice that")
    halves = [[(images[a:min(a + 256, lo + val_images)], labels[a:min(a + 256, lo + val_images)])
               for a in range(lo, lo + val_images, 256)] for lo in (0, val_images)]
    pick = np.random.default_rng(seed).permutation(len(trials))[:n]
    acc = np.zeros((len(pick), 2))
    for row, i in enumerate(tqdm(pick, desc="retest")):
        arch = decode(ctx.net.space, trials[i].params)
        for h, batches in enumerate(halves):
            acc[row, h] = evaluate_arch(ctx, arch, batches, exit_budget=budget(trials[i].params)).metrics["accuracy"]
    return {"subnets": len(pick), "val_images": val_images, "tau": float(kendalltau(acc[:, 0], acc[:, 1]).statistic),
            "rmse_between": float(np.sqrt(np.mean((acc[:, 0] - acc[:, 1]) ** 2))),
            "tau_vs_study": [float(kendalltau(acc[:, h], [trials[i].user_attrs["metrics"]["accuracy"] for i in pick])
                                   .statistic) for h in range(2)],
            "accuracy": acc.tolist()}


def optimism(featurizer: Featurizer, path: str, cautions: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)) -> dict[str, Any]:
    """The predictor strategy's optimism on its own proposals (a ``--strategy predictor`` study at ``path``):
    each round refitted as the search fitted it (the trials measured before the round), its proposals predicted
    by the MLP and LightGBM; how far the predictions exceed the measured accuracy, whether the two models'
    disagreement marks the over-ratings, and the bias and τ of ``--predictor-caution`` values."""
    from scipy.stats import spearmanr

    from nas4dyn.search.predictor_strategy import PREDICTED_ATTR, ROUND_ATTR

    study = optuna.load_study(study_name=None, storage=f"sqlite:///{path}")
    trials = sorted(completed(study), key=lambda t: t.number)
    rounds = [v for k, v in sorted(study.user_attrs.items()) if k.startswith(ROUND_ATTR)]
    recorded, mlp, gbm, measured = [], [], [], []
    for r in rounds:
        test = [t for t in trials[r["measured"]:r["measured"] + r["enqueued"]] if PREDICTED_ATTR in t.user_attrs]
        model = SubnetPredictor("gbm", seed=r["round"])
        model._fit(featurizer.samples(trials[:r["measured"]]), "gbm")
        data = featurizer.samples(test)
        for kind, out in (("mlp", mlp), ("gbm", gbm)):
            model.chosen = kind
            out += model.predict_x(data.x, data.exit_mask, data.gate_mask).accuracy.tolist()
        recorded += [t.user_attrs[PREDICTED_ATTR]["accuracy"] for t in test]
        measured += data.accuracy.tolist()
    mlp_a, gbm_a, y = np.asarray(mlp), np.asarray(gbm), np.asarray(measured)
    ensemble, half_gap = (mlp_a + gbm_a) / 2, np.abs(mlp_a - gbm_a) / 2
    out: dict[str, Any] = {"proposals": len(y), "rounds": len(rounds),
                           "recorded_bias": float(np.mean(np.asarray(recorded) - y)),
                           "spearman_gap_vs_gbm_error": float(spearmanr(half_gap, gbm_a - y).statistic),
                           "spearman_gap_vs_ensemble_error": float(spearmanr(half_gap, ensemble - y).statistic)}
    for name, base in (("gbm", gbm_a), ("ensemble", ensemble)):
        out[name] = [{"caution": c, "bias": float(np.mean(base - c * half_gap - y)),
                      "tau": float(kendalltau(base - c * half_gap, y).statistic)} for c in cautions]
    return out


def optimism_table(result: dict[str, Any]) -> str:
    lines = [f"{result['proposals']} proposals of {result['rounds']} rounds; predicted at the time "
             f"{100 * result['recorded_bias']:+.2f} points above measured on average; half the MLP/LightGBM gap "
             f"rank-correlates with LightGBM's error at {result['spearman_gap_vs_gbm_error']:.3f}, with the "
             f"ensemble's at {result['spearman_gap_vs_ensemble_error']:.3f}", "",
             "| model | --predictor-caution | mean bias (points) | τ vs measured |", "|---|---|---|---|"]
    for name in ("gbm", "ensemble"):
        lines += [f"| {name} | {r['caution']:g} | {100 * r['bias']:+.2f} | {r['tau']:.3f} |" for r in result[name]]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="the run the studies searched (its supernet gives the MACs)")
    ap.add_argument("--studies", nargs="+", required=True, help="study.db files of searches on --run")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", help="K-fold only over the studies whose path contains this (e.g. random)")
    ap.add_argument("--held-out", help="also: fit on the other studies, predict the one whose path contains this")
    ap.add_argument("--retest", type=int, default=0, help="measure this many trials again on two disjoint subsets")
    ap.add_argument("--val-images", type=int, default=2000, help="--retest: validation images per subset")
    ap.add_argument("--bn-images", type=int, default=1000, help="--retest: BN recalibration images (as the studies)")
    ap.add_argument("--precise", type=int, default=0, help="score on this many held-out subnets measured on the "
                    "whole validation split (half random, half as the predictor strategy proposes)")
    ap.add_argument("--precise-out", help="--precise: directory of its plan and measurements (resumable)")
    ap.add_argument("--precise-no-measure", action="store_true", help="--precise: score what is measured so far")
    ap.add_argument("--precise-curve", action="store_true", help="--precise: also τ of fits on fewer trials")
    ap.add_argument("--candidates", type=int, default=10_000, help="--precise: predictor queries for the proposals")
    ap.add_argument("--optimism", help="the predictor-strategy study whose path contains this: its optimism on its "
                    "proposals, refitted round by round, and what --predictor-caution does to it")
    ap.add_argument("--skip-kfold", action="store_true", help="only --retest / --precise / --optimism")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    if args.precise and not args.precise_out:
        ap.error("--precise needs --precise-out DIR (its measurements are kept there, and reused on a restart)")
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    net, _ = load_supernet_file(f"{args.run}/supernet.pt")
    costs = CandidateCosts(net)
    featurizers = {f: Featurizer(net.space, costs, "macs_expected", f) for f in FEATURE_SETS}
    trials, sources = load_trials(args.studies)
    start = time.perf_counter()
    pool = [t for t, s in zip(trials, sources) if args.only is None or args.only in s]
    out: dict[str, Any] = {"trials": len(trials), "kfold_trials": len(pool), "folds": args.folds,
                           "repeats": args.repeats, "seed": args.seed}
    if args.retest:
        out["retest"] = retest(args.run, pool, args.retest, args.val_images, args.bn_images, args.seed)
        r = out["retest"]
        print(f"## retest: {r['subnets']} subnets on two disjoint {r['val_images']}-image validation subsets: "
              f"Kendall tau {r['tau']:.3f}, RMS difference {100 * r['rmse_between']:.2f} points; tau against the "
              f"studies' measurement {r['tau_vs_study'][0]:.3f} / {r['tau_vs_study'][1]:.3f}\n", flush=True)
    if args.precise:
        studies = [optuna.load_study(study_name=None, storage=f"sqlite:///{p}") for p in args.studies]
        try:
            out["precise"] = run_precise(args, trials, studies)
        except Nas4dynError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        print(f"## {out['precise']['subnets_measured']} held-out subnets, predictors fitted on the studies' "
              f"{len(trials)} trials, against "
              f"labels on the whole {out['precise']['val_images']}-image validation split\n\n"
              f"{precise_table(out['precise'])}\n", flush=True)
    if args.optimism:
        path = next((p for p in args.studies if args.optimism in p), None)
        if path is None:
            print(f"error: --optimism {args.optimism}: no --studies path contains it", file=sys.stderr)
            sys.exit(2)
        out["optimism"] = optimism(featurizers["extended"], path)
        print(f"## optimism of {path}\n\n{optimism_table(out['optimism'])}\n", flush=True)
    if not args.skip_kfold:
        out["kfold"] = evaluate(pool, featurizers, args.folds, args.repeats, args.seed)
        print(f"## {len(pool)} trials, {args.repeats}x {args.folds}-fold\n\n{table(out['kfold'])}\n", flush=True)
    if args.held_out and not args.skip_kfold:
        test = np.array([i for i, s in enumerate(sources) if args.held_out in s])
        out["held_out"] = {"study": args.held_out, "trials": len(test),
                           **evaluate(trials, featurizers, args.folds, 1, args.seed, test_rows=test)}
        print(f"## fit on {len(trials) - len(test)} trials of the other studies, predict the {len(test)} of "
              f"'{args.held_out}'\n\n{table(out['held_out'])}\n")
    out["seconds"] = time.perf_counter() - start
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
