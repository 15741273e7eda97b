"""Benchmark of `nas4dyn search` on a trained run.

1. Trials per minute, and the normalised hypervolume of the predictor strategy, NSGA-II and random search at
   the same budget of measured trials (same seeds, fresh studies, same validation measurements); the
   predictor's candidates per minute, its out-of-fold Kendall tau per round, and its tau / RMSE on the trials it
   proposed (predicted before they were measured) and, out of fold, on the random studies' trials. With
   --heldout, the same hypervolumes of each study's best trials measured again on the validation images no
   trial saw (scripts/search_heldout.py).
2. (unless --no-extras) NSGA-II against random with the reference point's accuracy (the smallest static
   subnet's) as a constraint, which tells NSGA-II the region the hypervolume counts (random search ignores
   constraints, so its unconstrained studies serve both comparisons); the best static subnet (a static search;
   highest validation accuracy), then the best dynamic subnet at <= 60% of its expected MACs (a dynamic search
   with that constraint), both measured on the test split.

Usage: python scripts/bench_search.py --run runs/NAME [--trials 120] [--population 20] [--seeds 0 1 2]
       [--strategies predictor nsga2 random] [--val-images N] [--bn-images 2000] [--no-extras]
       [--warmup 40] [--round-size 20] [--candidates 10000]
       [--out /tmp/bench_search] [--threads 1] [--jobs 1] [--reuse] [--heldout] [--write]
With --jobs K the independent studies run K at a time, one process each (--threads torch threads apiece).
With --write the results replace the "Search" section of docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial
from scipy.stats import kendalltau

from benchlib import end_with_parent, machine_line, replace_section
from nas4dyn.cost.macs import count_macs
from nas4dyn.data import load_data
from nas4dyn.search import SearchConfig, run_search
from nas4dyn.search.candidate_costs import CandidateCosts
from nas4dyn.search.outputs import completed, feasible, hypervolume
from nas4dyn.search.predictor import Featurizer, SubnetPredictor
from nas4dyn.search.predictor_strategy import PREDICTED_ATTR, ROUND_ATTR
from nas4dyn.search.runner import REFERENCE_ATTR
from nas4dyn.search.trial import Batches, SearchSettings, TrialContext, cached_batches, hv_reference, load_context
from nas4dyn.search.objectives import budget_metric, parse_objectives
from search_spaces.arch import Arch
from nas4dyn.train.bn import recalibrate_bn
from search_heldout import FRONTS, heldout_hypervolumes

OBJECTIVES = "accuracy:max,macs_expected:min"


def search(args: argparse.Namespace, name: str, kw: dict[str, Any]) -> None:
    """One search to ``--trials`` completed trials in a fresh study (``--reuse``: keep a study that already has
    them — a rerun then adds no trial). Runs in a worker process when --jobs > 1."""
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = Path(args.out) / name
    if (out / "study.db").exists() and not args.reuse:
        (out / "study.db").unlink()  # fresh study: the figures describe exactly this budget
    summary = run_search(SearchConfig(run_dir=args.run, out_dir=str(out), objectives=OBJECTIVES, trials=args.trials,
                                      population=args.population, data_root=args.data_root, progress=False,
                                      bn_images=args.bn_images, val_images=args.val_images, warmup=args.warmup,
                                      round_size=args.round_size, candidates=args.candidates, **kw))
    print(f"{name}: hv {summary.hypervolume:.4f}, {summary.complete} trials", flush=True)


def run_studies(args: argparse.Namespace, specs: dict[str, dict[str, Any]]) -> dict[str, optuna.Study]:
    """Run every named study (``name -> run_search keywords``), --jobs at a time; the finished studies."""
    if args.jobs == 1:
        for name, kw in specs.items():
            search(args, name, kw)
    else:  # spawned, not forked: a forked child of a process that ran OpenMP work can hang
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=end_with_parent) as pool:
            for future in [pool.submit(search, args, name, kw) for name, kw in specs.items()]:
                future.result()
    return {name: optuna.load_study(study_name="search", storage=f"sqlite:///{Path(args.out) / name / 'study.db'}")
            for name in specs}


def wall_minutes(studies: list[optuna.Study]) -> float:
    """Minutes from the first trial's start to the last trial's end over ``studies`` (the trial loops, without
    loading)."""
    trials = [t for study in studies for t in completed(study)]
    return (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds() / 60


def first(study: optuna.Study, budget: int | None = None) -> list[FrozenTrial]:
    """The study's first ``budget`` completed trials (all when None), by trial number."""
    return sorted(completed(study), key=lambda t: t.number)[:budget]


def study_hv(study: optuna.Study, reference: dict[str, float], budget: int | None = None) -> float:
    metrics = [t.user_attrs["metrics"] for t in first(study, budget) if feasible(t)]
    return hypervolume(metrics, parse_objectives(OBJECTIVES), reference)


STRATEGIES = {"predictor": dict(sampler="nsga2", strategy="predictor"), "nsga2": dict(sampler="nsga2"),
              "random": dict(sampler="random")}


def comparison(args: argparse.Namespace, tag: str, strategies: list[str], **kw: Any) -> dict[str, dict[str, Any]]:
    """One fresh study per seed and strategy (predictor, NSGA-II, random), named ``{strategy}{tag}_s{seed}``."""
    return {f"{s}{tag}_s{seed}": dict(seed=seed, **STRATEGIES[s], **kw) for seed in args.seeds for s in strategies}


def strategy_hv(studies: dict[str, optuna.Study], seeds: list[int], reference: dict[str, float], tag: str,
                strategies: list[str], budget: int | None = None) -> dict[str, list[float]]:
    """Hypervolume per strategy and seed (of each study's first ``budget`` completed trials)."""
    return {s: [study_hv(studies[f"{s}{tag}_s{seed}"], reference, budget) for seed in seeds] for s in strategies}


def ratio(hv: dict[str, list[float]], a: str, b: str) -> float | None:
    """Mean hypervolume of ``a`` ÷ that of ``b`` (None when ``b``'s is 0 or either did not run)."""
    if a not in hv or b not in hv or not statistics.mean(hv[b]):
        return None
    return statistics.mean(hv[a]) / statistics.mean(hv[b])


def generations(study: optuna.Study) -> int:
    """NSGA-II generations the study's trials span."""
    gens = [v for t in study.trials for k, v in t.system_attrs.items() if k.endswith(":generation")]
    return max(gens) + 1 if gens else 0


def best(studies: dict[str, optuna.Study], max_macs: float | None = None) -> dict[str, Any]:
    """The feasible trial with the best validation accuracy over the named ``studies`` (optionally at most
    ``max_macs`` expected)."""
    trials = [(name, t) for name, study in studies.items() for t in completed(study) if feasible(t)
              and (max_macs is None or t.user_attrs["metrics"]["macs_expected"] <= max_macs)]
    name, top = max(trials, key=lambda nt: nt[1].user_attrs["metrics"]["accuracy"])
    return {"arch": top.user_attrs["arch"], "val": top.user_attrs["metrics"], "trial": f"{name}#{top.number}"}


@torch.no_grad()
def test_metrics(ctx: TrialContext, arch: Arch, test: Batches) -> dict[str, float]:
    """Test accuracy and expected MACs of ``arch`` with its (validation-calibrated) thresholds."""
    recalibrate_bn(ctx.net, arch, ctx.bn_batches, n_images=ctx.settings.bn_images)
    ctx.net.set_active(arch)
    hits = sum(int((ctx.net(x).argmax(1) == y).sum()) for x, y in test)
    report = count_macs(ctx.net, arch, test)
    return {"accuracy": hits / sum(len(y) for _, y in test), "macs_expected": report.macs_expected,
            "exit_rates": report.exit_rates}


def census(studies: dict[str, optuna.Study], reference: dict[str, float]) -> str:
    """Why the hypervolumes stand where they do: how many sampled trials (the enqueued corners aside) are more
    accurate than the smallest static subnet, and what channel gates cost in accuracy."""
    sampled = [t for st in studies.values() for t in completed(st) if "fixed_params" not in t.system_attrs]
    floor = 1.0 - reference["accuracy"]
    above = sum(t.user_attrs["metrics"]["accuracy"] > floor for t in sampled)
    gated = {True: [], False: []}
    for t in sampled:
        has = any(b.gate == "channel" for b in Arch.from_dict(t.user_attrs["arch"]).blocks())
        gated[has].append(t.user_attrs["metrics"]["accuracy"])
    mean = {k: statistics.mean(v) if v else float("nan") for k, v in gated.items()}
    return (f"Of the {len(sampled)} sampled trials (corners aside), {above} are more accurate than the smallest static "
            f"subnet ({floor:.2%} val); mean validation accuracy {mean[True]:.2%} with channel gates on some block "
            f"({len(gated[True])} trials), {mean[False]:.2%} without ({len(gated[False])}).")


def show(value: float | None) -> str:
    """A hypervolume ratio, or why there is none."""
    return f"{value:.3f}×" if value is not None else "undefined (a strategy did not run or its hypervolume is 0)"


def describe(arch: Arch) -> str:
    blocks = " ".join(f"{b.kernel}/{b.width}{'' if b.gate == 'none' else '+' + b.gate}" for b in arch.blocks())
    exits = ",".join(f"{e.stage}.{e.block}@{e.threshold:.3f}" for e in arch.exits) or "none"
    return f"r{arch.resolution} d{list(arch.depths)} [{blocks}] exits {exits}"


def extras(args: argparse.Namespace, ctx: TrialContext, done: dict[str, optuna.Study],
           studies: dict[str, optuna.Study], reference: dict[str, float], floor: str, body: list[str]) -> dict[str, Any]:
    """Part 2: NSGA-II ÷ random with the reference accuracy as a floor, then the best static subnet and the best
    dynamic one at <= 60% of its expected MACs, on the test split. Appends its text to ``body``."""
    floor_studies = {name: done[name] if name in done else done[name.replace("_floor", "")]
                     for name in comparison(args, "_floor", ["nsga2", "random"])}
    hv_floor = strategy_hv(floor_studies, args.seeds, reference, "_floor", ["nsga2", "random"])
    static = best({"static": done["static"]})
    limit = 0.6 * static["val"]["macs_expected"]
    alone = argparse.Namespace(**{**vars(args), "jobs": 1, "threads": args.threads * args.jobs})  # the last study
    constrained = run_studies(alone, {"dynamic60": dict(sampler="nsga2", seed=args.seeds[0],
                                                        constraints=(f"macs_expected<={limit:.0f}",))})
    dynamic = best({**constrained, **studies, **floor_studies}, max_macs=limit)
    test = cached_batches(load_data(ctx.data_info["dataset"], data_root=args.data_root, augment=False).test, 256, None, 0)
    for entry in (static, dynamic):
        entry["test"] = test_metrics(ctx, Arch.from_dict(entry["arch"]), test)
    saving = 1 - dynamic["test"]["macs_expected"] / dynamic["val"]["macs_max"]
    sub = [
        f"| {label} | {e['trial']} | {e['val']['accuracy']:.4f} | {e['test']['accuracy']:.4f} | "
        f"{e['val']['macs_expected'] / 1e6:.2f} | {e['test']['macs_expected'] / 1e6:.2f} | "
        f"{e['val']['macs_max'] / 1e6:.2f} | `{describe(Arch.from_dict(e['arch']))}` |"
        for label, e in (("best static", static), (f"best dynamic ≤ {limit / 1e6:.2f} MMACs", dynamic))
    ]
    body += [
        "",
        f"With the reference accuracy as a constraint ({floor}; the region the hypervolume counts, told to NSGA-II; "
        "random search ignores it, so its unconstrained studies serve): NSGA-II "
        + " / ".join(f"{v:.4f}" for v in hv_floor["nsga2"])
        + f", NSGA-II ÷ random **{show(ratio(hv_floor, 'nsga2', 'random'))}**.",
        "",
        "Unconstrained: " + census(studies, reference),
        "With the floor: " + census(floor_studies, reference),
        "",
        "Best static subnet (static search, NSGA-II, same budget; best validation accuracy) and the best dynamic "
        "subnet with expected MACs ≤ 60% of it (best validation accuracy under that bound over every dynamic study "
        "above plus a dynamic NSGA-II search with the bound as constraint); thresholds calibrated on validation, then "
        "measured on the test split:",
        "",
        "| subnet | study#trial | val acc | test acc | val MMACs (expected) | test MMACs (expected) | MMACs max | arch |",
        "|---|---|---|---|---|---|---|---|",
        *sub,
        "",
        f"The dynamic pick saves {100 * saving:.0f}% of its own full-path MACs on test (exit rates "
        f"{[round(r, 2) for r in dynamic['test']['exit_rates']]}, gate rates "
        f"{ {k: round(v, 2) for k, v in dynamic['val']['gate_rates'].items()} } on validation).",
    ]
    return {"hv_floor": hv_floor, "static": static, "dynamic": dynamic}


def predictor_figures(ctx: TrialContext, studies: dict[str, optuna.Study],
                      pooled: list[FrozenTrial]) -> dict[str, Any] | None:
    """The predictor strategy's candidates per minute and fits per round; its accuracy and expected-MACs error on
    the trials it proposed (predicted before they were measured); out-of-fold tau / RMSE of each model on
    ``pooled`` trials (random search's: an unbiased sample of the space). None before a round measured two."""
    rounds = [v for st in studies.values() for k, v in st.user_attrs.items() if k.startswith(ROUND_ATTR)]
    proposed = [t for st in studies.values() for t in completed(st) if PREDICTED_ATTR in t.user_attrs]
    if not rounds or len(proposed) < 2:
        return None
    pred = np.array([t.user_attrs[PREDICTED_ATTR]["accuracy"] for t in proposed])
    meas = np.array([t.user_attrs["metrics"]["accuracy"] for t in proposed])
    macs_error = [abs(t.user_attrs[PREDICTED_ATTR]["macs_expected"] / t.user_attrs["metrics"]["macs_expected"] - 1)
                  for t in proposed]
    costs = CandidateCosts(ctx.net)
    data = Featurizer(ctx.net.space, costs, budget_metric(ctx.settings.objectives)).samples(pooled)
    return {
        "rounds": len(rounds),
        "candidates_per_min": 60 * sum(r["candidates"] for r in rounds) / sum(r["search_s"] for r in rounds),
        "candidates_per_cpu_min": 60 * sum(r["candidates"] for r in rounds) / sum(r["search_cpu_s"] for r in rounds),
        "candidates_per_round": statistics.median(r["candidates"] for r in rounds),
        "round_taus": [round(r["scores"][r["model"]]["tau"], 3) for r in sorted(rounds, key=lambda r: r["measured"])],
        "models": {m: sum(r["model"] == m for r in rounds) for m in ("mlp", "gbm", "ensemble")},
        "proposed": len(proposed),
        "proposed_tau": float(kendalltau(pred, meas).statistic),
        "proposed_rmse": float(np.sqrt(np.mean((pred - meas) ** 2))),
        "proposed_macs_error": statistics.median(macs_error),
        "pooled": len(pooled),
        "cv": SubnetPredictor().cross_validate_kinds(data, ("mlp", "gbm", "ensemble")),
    }


def hv_table(hv: dict[str, list[float]], seeds: list[int]) -> list[str]:
    """Markdown rows: hypervolume per strategy and seed, and the mean."""
    return ["| strategy | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |", "|---|" + "---|" * (len(seeds) + 1),
            *(f"| {s} | " + " | ".join(f"{v:.4f}" for v in hv[s]) + f" | {statistics.mean(hv[s]):.4f} |" for s in hv)]


def ratios(hv: dict[str, list[float]]) -> str:
    """The goal ratios of the strategies' mean hypervolumes, as one sentence."""
    return (f"Predictor ÷ random (goal ≥ 1.3×): **{show(ratio(hv, 'predictor', 'random'))}**; predictor ÷ NSGA-II "
            f"(goal ≥ 1.15×): **{show(ratio(hv, 'predictor', 'nsga2'))}**; NSGA-II ÷ random: "
            f"**{show(ratio(hv, 'nsga2', 'random'))}**")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="trained run directory")
    ap.add_argument("--data-root")
    ap.add_argument("--trials", type=int, default=120)
    ap.add_argument("--population", type=int, default=20, help="NSGA-II population (120 trials: 6 generations)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    ap.add_argument("--val-images", type=int, help="validation images per trial (default: the whole split)")
    ap.add_argument("--bn-images", type=int, default=2000, help="training images for BN recalibration per trial")
    ap.add_argument("--warmup", type=int, default=40, help="predictor strategy: measured trials before its first fit")
    ap.add_argument("--round-size", type=int, default=20, help="predictor strategy: trials measured per round")
    ap.add_argument("--candidates", type=int, default=10_000, help="predictor strategy: candidates per round")
    ap.add_argument("--no-extras", action="store_true", help="only the strategy comparison (part 1)")
    ap.add_argument("--report-only", action="store_true",
                    help="run no trial: report the studies in --out as they stand, each cut to the smallest number "
                    "of completed trials among them")
    ap.add_argument("--out", default="/tmp/bench_search")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=1, help="studies run at once, one process each")
    ap.add_argument("--reuse", action="store_true", help="keep studies in --out that already hold --trials trials")
    ap.add_argument("--write", action="store_true", help="write the results into docs/BENCHMARKS.md")
    ap.add_argument("--heldout", action="store_true", help="also re-measure each study's best trials on the "
                    "validation images its trials did not see (needs --val-images below the split's size)")
    args = ap.parse_args()
    if args.heldout and not args.val_images:
        ap.error("--heldout needs --val-images N: with the whole validation split measured, no image is held out")
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    settings = SearchSettings(parse_objectives(OBJECTIVES), bn_images=args.bn_images, val_images=args.val_images)
    ctx = load_context(args.run, settings, data_root=args.data_root)
    # Each study measures this point again and stores it; the floor needs it before any study starts.
    reference = hv_reference(ctx)
    strategies = args.strategies

    # 1. The strategies at the same budget; with the extras, NSGA-II with the reference accuracy as a floor (just
    # below the smallest static subnet's accuracy: 1 - (1 - a) may round above a, and that corner stays feasible)
    # and the static search of part 2 alongside.
    floor = f"accuracy>={1.0 - reference['accuracy'] - 1e-9:.10f}"
    plain = comparison(args, "", strategies)
    specs = dict(plain)
    if not args.no_extras:
        # Random search ignores constraints: under the floor it would sample and measure exactly its unconstrained
        # trials (same seeds), and trials below the floor add no hypervolume either way, so those are reused.
        specs.update(comparison(args, "_floor", ["nsga2"], constraints=(floor,)))
        specs["static"] = dict(sampler="nsga2", seed=args.seeds[0], static=True)
    if args.report_only:  # the studies as they stand in --out (say, stopped at a deadline)
        done = {name: optuna.load_study(study_name="search", storage=f"sqlite:///{Path(args.out) / name / 'study.db'}")
                for name in specs}
    else:
        done = run_studies(args, specs)
    for name, study in done.items():
        if study.user_attrs[REFERENCE_ATTR] != reference:  # the hypervolumes below use this process's point
            print(f"warning: study {name} stored the reference point {study.user_attrs[REFERENCE_ATTR]}, this "
                  f"process measured {reference}", flush=True)
    studies = {name: done[name] for name in plain}
    budget = min(args.trials, *(len(completed(st)) for st in studies.values()))  # the same for every study
    hv = strategy_hv(studies, args.seeds, reference, "", strategies, budget)
    durations = [t.duration.total_seconds() for st in done.values() for t in completed(st)]
    per_min_wall = len(durations) / wall_minutes(list(done.values()))
    per_min_trial = 60 / statistics.median(durations)
    results: dict[str, Any] = {"hv": hv}
    if "predictor" in strategies:
        pooled = [t for n, st in studies.items() if n.startswith("random_") for t in completed(st)]
        pooled = pooled or [t for n, st in studies.items() if n.startswith("predictor_") for t in completed(st)]
        results["predictor"] = predictor_figures(ctx, {n: st for n, st in studies.items()
                                                       if n.startswith("predictor_")}, pooled)
    gens = [generations(st) for n, st in studies.items() if n.startswith("nsga2_")]

    data = ctx.data_info["dataset"]
    cmd = (f"python scripts/bench_search.py --run {args.run} --trials {args.trials} --population {args.population} "
           f"--seeds {' '.join(map(str, args.seeds))} --strategies {' '.join(strategies)}"
           + (f" --val-images {args.val_images}" if args.val_images else "")
           + f" --bn-images {args.bn_images}"
           + (f" --warmup {args.warmup} --round-size {args.round_size} --candidates {args.candidates}"
              if "predictor" in strategies else "")
           + f" --threads {args.threads} --jobs {args.jobs}"
           + "".join(f" --{f.replace('_', '-')}" for f in ("no_extras", "report_only", "reuse", "heldout", "write")
                     if getattr(args, f)))
    val = f"{args.val_images} validation images (a fixed subset)" if args.val_images else "the whole validation split"
    body = [
        f"Command: `{cmd}` — {machine_line(args.threads)}; run `{args.run}` ({data}); objectives "
        f"{OBJECTIVES}; every trial recalibrates BN on {args.bn_images} training images and measures {val}, the "
        f"same for every strategy; wall-clock times, 1-minute load average {os.getloadavg()[0]:.1f} at the end "
        "(above ~2, other jobs shared the 2 cores).",
        "",
        f"Throughput: **{per_min_trial:.1f} trials/min** per search process (median trial "
        f"{statistics.median(durations):.1f} s, {args.threads} torch thread(s), {args.jobs} search(es) at once); "
        f"{per_min_wall:.1f} trials/min over the machine, wall-clock from the first trial's start to the last one's "
        f"end ({len(durations)} trials).",
        "",
        f"Hypervolume at {budget} measured trials"
        + (f" (each study cut to its first {budget} completed trials: not every study reached {args.trials})"
           if budget < args.trials else "")
        + ", one fresh study per seed, each starting from the same three "
        "corner subnets (largest and smallest static, largest with every exit) — the share of the box between the "
        "ideal point and the reference point (validation error of the smallest static subnet "
        f"{reference['accuracy']:.4f}, expected MACs of the largest static subnet {reference['macs_expected'] / 1e6:.2f}"
        " M) that the feasible trials dominate (Optuna's WFG hypervolume on the normalised losses):",
        "",
        *hv_table(hv, args.seeds),
        "",
        f"{ratios(hv)} (population {args.population}: {'/'.join(map(str, gens)) or 'n/a'} generations in the "
        "NSGA-II studies' trials).",
    ]
    if args.heldout:
        held, images = heldout_hypervolumes(args.run, studies, OBJECTIVES, reference, args.bn_images, args.val_images,
                                            Path(args.out) / "heldout.json", args.data_root)
        results["hv_heldout"] = hv_held = {s: [held[f"{s}_s{seed}"] for seed in args.seeds] for s in strategies}
        body += ["", f"The same studies' best trials (their first {FRONTS} non-dominated fronts) measured again "
                 f"on the {images} validation images no trial saw (`--heldout`; thresholds calibrated there at each "
                 "trial's exit budget; reference accuracy: the smallest static subnet's on those images), which "
                 "takes the luck of the best noisy measurements out of the hypervolume:", "",
                 *hv_table(hv_held, args.seeds), "", ratios(hv_held) + "."]
    if results.get("predictor") is None and "predictor" in strategies:
        body += ["", "The predictor studies measured fewer than two proposed candidates: no predictor figures."]
    elif "predictor" in results:
        p = results["predictor"]
        body += ["", (
            f"Predictor strategy ({args.warmup} warm-up trials — the corners, then random — then rounds of "
            f"{args.round_size}): {p['rounds']} rounds, median {p['candidates_per_round']:.0f} candidates each, "
            f"**{p['candidates_per_min']:.0f} candidates/min** wall-clock on the shared machine, "
            f"**{p['candidates_per_cpu_min']:.0f} per minute of the search process's CPU time** (NSGA-II over the "
            f"predictor and the cost tables, one torch thread); model picked per round by out-of-fold Kendall τ: "
            + ", ".join(f"{m} {n}×" for m, n in p["models"].items()) + f"; τ per round {p['round_taus']}. On the "
            f"{p['proposed']} trials it proposed "
            f"(predicted, then measured): accuracy τ **{p['proposed_tau']:.3f}**, RMSE {p['proposed_rmse']:.4f}; "
            f"expected MACs off by {100 * p['proposed_macs_error']:.1f}% (median). Out of fold (5 folds) on "
            f"{p['pooled']} measured trials of the random studies: "
            + "; ".join(f"{k} τ **{v['tau']:.3f}**, RMSE {v['rmse']:.4f}" for k, v in p["cv"].items())
            + " (goal τ ≥ 0.8).")]
    if not args.no_extras:
        results.update(extras(args, ctx, done, studies, reference, floor, body))
    (Path(args.out) / "bench.json").write_text(json.dumps(results, indent=2))
    text = "\n".join(body)
    print(text)
    if args.write:
        replace_section(Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md", "Search", text)


if __name__ == "__main__":
    main()
