"""Benchmark of `nas4dyn search` on a trained run.

1. Trials per minute, and the normalised hypervolume of NSGA-II against random search at the same budget
   (same seeds, fresh studies, same validation measurements) — unconstrained, then with the reference point's
   accuracy (the smallest static subnet's) as a constraint, which tells NSGA-II the region the hypervolume counts
   (random search ignores constraints, so its unconstrained studies serve both comparisons).
2. The best static subnet (a static search; highest validation accuracy), then the best dynamic subnet at
   <= 60% of its expected MACs (a dynamic search with that constraint), both measured on the test split.

Usage: python scripts/bench_search.py --run runs/NAME [--trials 80] [--population 16] [--seeds 0 1]
       [--out /tmp/bench_search] [--threads 1] [--jobs 1] [--reuse] [--write]
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

import optuna
import torch

from benchlib import machine_line, replace_section
from nas4dyn.cost.macs import count_macs
from nas4dyn.data import load_data
from nas4dyn.search import SearchConfig, run_search
from nas4dyn.search.outputs import completed, feasible, hypervolume
from nas4dyn.search.runner import REFERENCE_ATTR
from nas4dyn.search.trial import Batches, SearchSettings, TrialContext, cached_batches, hv_reference, load_context
from nas4dyn.search.objectives import parse_objectives
from search_spaces.arch import Arch
from nas4dyn.train.bn import recalibrate_bn

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
                                      population=args.population, data_root=args.data_root, progress=False, **kw))
    print(f"{name}: hv {summary.hypervolume:.4f}, {summary.complete} trials", flush=True)


def run_studies(args: argparse.Namespace, specs: dict[str, dict[str, Any]]) -> dict[str, optuna.Study]:
    """Run every named study (``name -> run_search keywords``), --jobs at a time; the finished studies."""
    if args.jobs == 1:
        for name, kw in specs.items():
            search(args, name, kw)
    else:  # spawned, not forked: a forked child of a process that ran OpenMP work can hang
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for future in [pool.submit(search, args, name, kw) for name, kw in specs.items()]:
                future.result()
    return {name: optuna.load_study(study_name="search", storage=f"sqlite:///{Path(args.out) / name / 'study.db'}")
            for name in specs}


def wall_minutes(studies: list[optuna.Study]) -> float:
    """Minutes from the first trial's start to the last trial's end over ``studies`` (the trial loops, without
    loading)."""
    trials = [t for study in studies for t in completed(study)]
    return (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds() / 60


def study_hv(study: optuna.Study, reference: dict[str, float]) -> float:
    metrics = [t.user_attrs["metrics"] for t in completed(study) if feasible(t)]
    return hypervolume(metrics, parse_objectives(OBJECTIVES), reference)


def comparison(args: argparse.Namespace, tag: str, **kw: Any) -> dict[str, dict[str, Any]]:
    """One fresh study per seed and sampler (NSGA-II, random), named ``{sampler}{tag}_s{seed}``."""
    return {f"{sampler}{tag}_s{seed}": dict(sampler=sampler, seed=seed, **kw)
            for seed in args.seeds for sampler in ("nsga2", "random")}


def sampler_hv(studies: dict[str, optuna.Study], seeds: list[int], reference: dict[str, float],
               tag: str) -> tuple[dict[str, list[float]], float | None]:
    """Hypervolume per sampler and seed, and NSGA-II's mean ÷ random's (None when random's is 0)."""
    hv = {s: [study_hv(studies[f"{s}{tag}_s{seed}"], reference) for seed in seeds] for s in ("nsga2", "random")}
    mean_random = statistics.mean(hv["random"])
    return hv, (statistics.mean(hv["nsga2"]) / mean_random if mean_random else None)


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


def show(ratio: float | None) -> str:
    """A hypervolume ratio, or why there is none."""
    return f"{ratio:.3f}×" if ratio is not None else "undefined (random search's hypervolume is 0)"


def describe(arch: Arch) -> str:
    blocks = " ".join(f"{b.kernel}/{b.width}{'' if b.gate == 'none' else '+' + b.gate}" for b in arch.blocks())
    exits = ",".join(f"{e.stage}.{e.block}@{e.threshold:.3f}" for e in arch.exits) or "none"
    return f"r{arch.resolution} d{list(arch.depths)} [{blocks}] exits {exits}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="trained run directory")
    ap.add_argument("--data-root")
    ap.add_argument("--trials", type=int, default=80)
    ap.add_argument("--population", type=int, default=16)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", default="/tmp/bench_search")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=1, help="studies run at once, one process each")
    ap.add_argument("--reuse", action="store_true", help="keep studies in --out that already hold --trials trials")
    ap.add_argument("--write", action="store_true", help="write the results into docs/BENCHMARKS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ctx = load_context(args.run, SearchSettings(parse_objectives(OBJECTIVES)), data_root=args.data_root)
    # Each study measures this point again and stores it; the floor needs it before any study starts.
    reference = hv_reference(ctx)

    # 1. NSGA-II vs random at the same budget: unconstrained, then with the reference accuracy as a floor (just
    # below the smallest static subnet's accuracy: 1 - (1 - a) may round above a, and that corner stays feasible);
    # the static search of part 2 runs alongside.
    floor = f"accuracy>={1.0 - reference['accuracy'] - 1e-9:.10f}"
    plain = comparison(args, "")
    # Random search ignores constraints: under the floor it would sample and measure exactly its unconstrained
    # trials (same seeds), and trials below the floor add no hypervolume either way, so those studies are reused.
    floored = {name: kw for name, kw in comparison(args, "_floor", constraints=(floor,)).items()
               if kw["sampler"] != "random"}
    done = run_studies(args, {**plain, **floored, "static": dict(sampler="nsga2", seed=args.seeds[0], static=True)})
    for name, study in done.items():
        if study.user_attrs[REFERENCE_ATTR] != reference:  # the hypervolumes below use this process's point
            print(f"warning: study {name} stored the reference point {study.user_attrs[REFERENCE_ATTR]}, this "
                  f"process measured {reference}", flush=True)
    studies = {name: done[name] for name in plain}
    floor_studies = {name: done[name] if name in done else done[name.replace("_floor", "")]
                     for name in comparison(args, "_floor")}
    hv, ratio = sampler_hv(studies, args.seeds, reference, "")
    hv_floor, ratio_floor = sampler_hv(floor_studies, args.seeds, reference, "_floor")
    durations = [t.duration.total_seconds() for st in done.values() for t in completed(st)]
    per_min_wall = len(durations) / wall_minutes(list(done.values()))
    per_min_trial = 60 / statistics.median(durations)

    # 2. Best static subnet, then the best dynamic one at <= 60% of its expected MACs, over every dynamic study.
    static = best({"static": done["static"]})
    limit = 0.6 * static["val"]["macs_expected"]
    alone = argparse.Namespace(**{**vars(args), "jobs": 1, "threads": args.threads * args.jobs})  # the last study
    constrained = run_studies(alone, {"dynamic60": dict(sampler="nsga2", seed=args.seeds[0],
                                                        constraints=(f"macs_expected<={limit:.0f}",))})
    dynamic = best({**constrained, **studies, **floor_studies}, max_macs=limit)
    test = cached_batches(load_data(ctx.data_info["dataset"], data_root=args.data_root, augment=False).test, 256, None, 0)
    for entry in (static, dynamic):
        entry["test"] = test_metrics(ctx, Arch.from_dict(entry["arch"]), test)
    results = {"hv": hv, "hv_floor": hv_floor, "static": static, "dynamic": dynamic}
    (Path(args.out) / "bench.json").write_text(json.dumps(results, indent=2))
    saving = 1 - dynamic["test"]["macs_expected"] / dynamic["val"]["macs_max"]
    note = (f"The dynamic pick saves {100 * saving:.0f}% of its own full-path MACs on test (exit rates "
            f"{[round(r, 2) for r in dynamic['test']['exit_rates']]}, gate rates "
            f"{ {k: round(v, 2) for k, v in dynamic['val']['gate_rates'].items()} } on validation).")

    data = ctx.data_info["dataset"]
    cmd = (f"python scripts/bench_search.py --run {args.run} --trials {args.trials} --population {args.population} "
           f"--seeds {' '.join(map(str, args.seeds))} --threads {args.threads} --jobs {args.jobs}"
           f"{' --reuse' if args.reuse else ''}"
           f"{' --write' if args.write else ''}")
    rows = [f"| {s} | {label} | " + " | ".join(f"{v:.4f}" for v in table[s]) + f" | {statistics.mean(table[s]):.4f} |"
            for label, table in (("none", hv), (f"accuracy ≥ {1 - reference['accuracy']:.4f}", hv_floor))
            for s in table]
    sub = [
        f"| {label} | {e['trial']} | {e['val']['accuracy']:.4f} | {e['test']['accuracy']:.4f} | "
        f"{e['val']['macs_expected'] / 1e6:.2f} | {e['test']['macs_expected'] / 1e6:.2f} | "
        f"{e['val']['macs_max'] / 1e6:.2f} | `{describe(Arch.from_dict(e['arch']))}` |"
        for label, e in (("best static", static), (f"best dynamic ≤ {limit / 1e6:.2f} MMACs", dynamic))
    ]
    body = "\n".join([
        f"Command: `{cmd}` — {machine_line(args.threads)}; run `{args.run}` ({data}); objectives "
        f"{OBJECTIVES}; every trial recalibrates BN on 2000 training images and measures the "
        f"whole validation split; wall-clock times, 1-minute load average {os.getloadavg()[0]:.1f} at the end "
        "(above ~2, other jobs shared the 2 cores).",
        "",
        f"Throughput: **{per_min_trial:.1f} trials/min** per search process (median trial "
        f"{statistics.median(durations):.1f} s, {args.threads} torch thread(s), {args.jobs} search(es) at once); "
        f"{per_min_wall:.1f} trials/min over the machine, wall-clock from the first trial's start to the last one's "
        f"end ({len(durations)} trials: the sampler comparison and the static search).",
        "",
        f"Hypervolume at {args.trials} trials, one fresh study per seed, each starting from the same three corner "
        "subnets (largest and smallest static, largest with every exit) — the share of the box between the ideal "
        f"point and the reference point (validation error of the smallest static subnet {reference['accuracy']:.4f}, "
        f"expected MACs of the largest static subnet {reference['macs_expected'] / 1e6:.2f} M) that the feasible "
        "trials dominate (Optuna's WFG hypervolume on the normalised losses):",
        "",
        "| sampler | constraint | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean |",
        "|---|---|" + "---|" * (len(args.seeds) + 1),
        *rows,
        "",
        "Unconstrained: " + census(studies, reference),
        "With the floor: " + census(floor_studies, reference),
        "",
        f"NSGA-II ÷ random (goal ≥ 1.10×, population {args.population}): unconstrained **{show(ratio)}**; with the "
        f"reference accuracy as a constraint (the region the hypervolume counts, told to the sampler; random search "
        f"ignores it) **{show(ratio_floor)}**.",
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
        note,
    ])
    print(body)
    if args.write:
        replace_section(Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md", "Search", body)


if __name__ == "__main__":
    main()
