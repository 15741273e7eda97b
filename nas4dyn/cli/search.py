"""`nas4dyn search` — multi-objective search of a trained supernet (Optuna, optionally on Ray Tune)."""
from __future__ import annotations

import argparse

from nas4dyn.search.objectives import METRICS

_METRICS_HELP = "; ".join(f"{name} ({desc})" for name, (_, desc) in METRICS.items())


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search", help="multi-objective search for dynamic subnets: accuracy x expected MACs x latency",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog=f"Metrics: {_METRICS_HELP}.",
    )
    p.add_argument("--run", dest="run_dir", required=True, metavar="RUN_DIR", help="run directory holding supernet.pt")
    p.add_argument("--out", required=True, metavar="SEARCH_DIR",
                   help="writes pareto.json, trials.csv, pareto.png (and study.db with the default storage)")
    p.add_argument("--objectives",
                   help="comma-separated METRIC:max|min (latency metrics need --latency-table); default "
                   "accuracy:max,latency_ms:min with --latency-table, else accuracy:max,macs_expected:min")
    p.add_argument("--latency-table", metavar="LUT.json", help="latency table from `nas4dyn profile`")
    p.add_argument("--constraint", dest="constraints", action="append", default=[], metavar="EXPR",
                   help="METRIC<=VALUE or METRIC>=VALUE, e.g. latency_ms<=4 or macs_expected<=20M (repeatable)")
    p.add_argument("--sampler", default="nsga2", choices=("nsga2", "tpe", "random"), help="Optuna sampler")
    p.add_argument("--population", type=int, default=20, help="NSGA-II population size")
    p.add_argument("--trials", type=int, default=50,
                   help="completed trials the study holds when the command ends (a rerun continues)")
    p.add_argument("--storage", metavar="URL",
                   help="Optuna RDB URL or journal:PATH (default: sqlite:///SEARCH_DIR/study.db)")
    p.add_argument("--study", default="search", metavar="NAME", help="study name inside the storage")
    p.add_argument("--backend", default="optuna", choices=("optuna", "ray"), help="run trials in this process "
                   "(optuna) or on Ray Tune workers (ray)")
    p.add_argument("--workers", type=int, default=1, help="concurrent Ray trials (--backend ray)")
    p.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster instead of starting a local one")
    p.add_argument("--data-root", metavar="DIR", help="directory holding the run's dataset files")
    p.add_argument("--static", action="store_true", help="search static subnets only (no exits, no gates)")
    p.add_argument("--seed", type=int, help="sampler seed (default: random)")
    p.add_argument("--bn-images", type=int, default=2000,
                   help="training images (a fixed subset) to recalibrate BatchNorm statistics per trial")
    p.add_argument("--val-images", type=int,
                   help="validation images per trial, a fixed subset (default: the whole validation split)")
    p.add_argument("--batch-size", type=int, default=256, help="batch size of the validation pass")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 suits a shared CPU; Ray workers always use 1 each)")
    p.add_argument("--strategy", default="measure", choices=("measure", "predictor"),
                   help="measure: measure every trial the sampler proposes; predictor: after --warmup measured "
                   "trials (the corners, then random), rounds of fitting an accuracy/exit/gate-rate predictor on the "
                   "measured trials, querying it --candidates times with NSGA-II and measuring the --round-size "
                   "most promising candidates (--trials counts measured trials either way)")
    p.add_argument("--warmup", type=int, default=40, help="--strategy predictor: measured trials before the first fit")
    p.add_argument("--round-size", type=int, default=10, help="--strategy predictor: trials measured per round")
    p.add_argument("--candidates", type=int, default=10_000,
                   help="--strategy predictor: predictor queries (NSGA-II candidates) per round")
    p.add_argument("--predictor", default="auto", choices=("auto", "mlp", "gbm", "ensemble"),
                   help="--strategy predictor: accuracy model (auto: the best out-of-fold Kendall tau of mlp, gbm "
                   "and their mean, ensemble, per round)")
    p.add_argument("--predictor-caution", type=float, default=0.0,
                   help="--strategy predictor: rate candidates by the predicted accuracy minus this times half the "
                   "MLP / LightGBM disagreement (1: the ensemble's rating becomes the lower of the two; 0: off)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import optuna
    import torch

    from nas4dyn.errors import ConfigError
    from nas4dyn.search import SearchConfig, run_search

    if args.threads < 1:
        raise ConfigError(f"--threads {args.threads}: must be 1 or more")
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one progress bar instead of a line per trial
    summary = run_search(SearchConfig(
        run_dir=args.run_dir, out_dir=args.out, objectives=args.objectives, constraints=tuple(args.constraints),
        latency_table=args.latency_table, sampler=args.sampler, trials=args.trials, storage=args.storage,
        study=args.study, backend=args.backend, workers=args.workers, ray_address=args.ray_address,
        data_root=args.data_root, static=args.static, population=args.population, seed=args.seed,
        bn_images=args.bn_images, val_images=args.val_images, batch_size=args.batch_size,
        progress=not args.no_progress, strategy=args.strategy, warmup=args.warmup, round_size=args.round_size,
        candidates=args.candidates, predictor=args.predictor, predictor_caution=args.predictor_caution,
    ))
    print(f"study {summary.study} in {summary.storage}: {summary.complete} completed, {summary.failed} failed"
          + (f" ({summary.orphaned} of a killed run)" if summary.orphaned else ""))
    ref = summary.reference
    ref_text = f"error {ref['accuracy']:.4f}, {ref['macs_expected'] / 1e6:.3f} MMACs" + (
        f", {ref['latency_ms']:.3f} ms" if "latency_ms" in ref else "")
    print(f"Pareto front: {summary.front} subnets; hypervolume {summary.hypervolume:.4f} (share of the box from "
          f"the ideal point to the reference: error of the smallest static subnet, costs of the largest: {ref_text})")
    print(f"wrote {summary.out_dir}/pareto.json, trials.csv, pareto.png")
    return 0
