"""Ranking fidelity: does the supernet rank static subnets the way training them from scratch does?

Static subnets spread over the space's MAC range (the smallest, the largest, and subnets of a fixed random pool
nearest to evenly spaced log-MAC targets between them) are each trained from scratch with one fixed recipe
(random initialisation, Adam with a cosine learning rate, the same epochs and training images
for every subnet, standard augmentation), and their validation accuracy is compared with the accuracy they
inherit from the trained supernet (weights taken as they are, BatchNorm recalibrated on training images, as
every search trial does). Reports Kendall τ between the two rankings and the mean gap (inherited − scratch).
With ``--scratch-seeds N`` each subnet is trained N times (seeds ``seed`` .. ``seed + N - 1``) and ranked by its
mean; the scratch side's own agreement (τ between the rankings of two seeds) is reported too: the ceiling any
inherited ranking can be shown to reach against these labels.

Training from scratch is the expensive part: each subnet's result is stored in OUT/scratch.json as soon as it
is done (keyed by arch and recipe), so a rerun continues and the inherited side can be redone for another run.

Usage: python scripts/bench_ranking.py --run runs/NAME [--subnets 8] [--epochs 3] [--train-images N]
       [--val-images N] [--scratch-seeds 1] [--out /tmp/bench_ranking] [--threads 1] [--write]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import kendalltau
from torch import nn
from tqdm import tqdm

import nas4dyn
from benchlib import machine_line, replace_section
from nas4dyn.data import load_data, make_loader
from nas4dyn.io import atomic_write_json
from nas4dyn.search.candidate_costs import CandidateCosts
from nas4dyn.search.objectives import parse_objectives
from nas4dyn.search.trial import SearchSettings, evaluate_arch, load_context
from search_spaces.arch import Arch

POOL = 400  # random static subnets the spread is picked from


def spread(space: Any, costs: CandidateCosts, count: int, seed: int) -> list[tuple[Arch, float]]:
    """``count`` static subnets over the MAC range: min, max, and the pool's nearest to evenly spaced log-MACs."""
    rng = random.Random(seed)
    pool = {space.min_arch(), space.max_arch(), *(space.sample(rng, dynamic=False) for _ in range(POOL))}
    macs = {a: costs.macs_max(a) for a in pool}
    lo, hi = math.log(macs[space.min_arch()]), math.log(macs[space.max_arch()])
    picked = [space.min_arch(), space.max_arch()]
    for i in range(1, count - 1):
        target = lo + (hi - lo) * i / (count - 1)
        picked.append(min((a for a in pool if a not in picked), key=lambda a: abs(math.log(macs[a]) - target)))
    return sorted(((a, macs[a]) for a in picked), key=lambda am: am[1])


@torch.no_grad()
def accuracy(model: nn.Module, batches: list) -> float:
    model.eval()
    hits = sum(int((model.forward_all(x)[-1].argmax(1) == y).sum()) for x, y in batches)
    return hits / sum(len(y) for _, y in batches)


def train_scratch(space: Any, arch: Arch, args: argparse.Namespace, seed: int, bundle: Any,
                  val: list) -> dict[str, Any]:
    """The recipe: fresh weights (``seed``), Adam lr 3e-3 cosine to 0 (a short budget: SGD at lr 0.1 reached
    about 50% in 46 steps), weight decay 5e-5, batch 128, label smoothing 0.1, ``args.epochs`` epochs over the same
    ``args.train_images`` augmented training images."""
    torch.manual_seed(seed)
    model = nas4dyn.build_supernet(space).extract(arch)
    loader = make_loader(bundle.train, 128, shuffle=True, seed=seed, drop_last=True, limit=args.train_images)
    steps = args.epochs * len(loader)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=5e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    start = time.perf_counter()
    bar = tqdm(total=steps, desc=f"scratch {arch.resolution}px", unit="step", leave=False)
    for _ in range(args.epochs):
        model.train()
        for x, y in loader:
            loss = loss_fn(model.forward_all(x)[-1], y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            if not torch.isfinite(loss):
                raise SystemExit(f"scratch training of {arch.to_dict()} diverged (loss {loss.item()})")
    bar.close()
    return {"accuracy": accuracy(model, val), "seconds": time.perf_counter() - start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="trained run directory (the inherited side)")
    ap.add_argument("--data-root")
    ap.add_argument("--subnets", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train-images", type=int, help="training images per epoch (default: the whole split)")
    ap.add_argument("--val-images", type=int, help="validation images (default: the whole split)")
    ap.add_argument("--bn-images", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0, help="picks the subnets, and the first scratch seed")
    ap.add_argument("--scratch-seeds", type=int, default=1,
                    help="trainings from scratch per subnet (ranked by their mean)")
    ap.add_argument("--out", default="/tmp/bench_ranking")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write", action="store_true", help="write the results into docs/BENCHMARKS.md")
    args = ap.parse_args()
    if args.subnets < 3:
        raise SystemExit("--subnets: at least 3 (the smallest, the largest and one between)")
    if args.scratch_seeds < 1:
        raise SystemExit("--scratch-seeds: at least 1")
    torch.set_num_threads(args.threads)
    settings = SearchSettings(parse_objectives("accuracy:max,macs_expected:min"), static=True,
                              bn_images=args.bn_images, val_images=args.val_images)
    ctx = load_context(args.run, settings, data_root=args.data_root)
    space = ctx.net.space
    archs = spread(space, CandidateCosts(ctx.net), args.subnets, args.seed)
    bundle = load_data(ctx.data_info["dataset"], data_root=args.data_root, augment=True)
    recipe = {"optimizer": "adam 3e-3 cosine", "epochs": args.epochs, "train_images": args.train_images,
              "val_images": args.val_images,
              "seed": args.seed, "dataset": ctx.data_info["dataset"]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_path = out / "scratch.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}

    def scratch_key(arch: Arch, seed: int) -> str:
        return json.dumps({"arch": arch.to_dict(), "recipe": {**recipe, "seed": seed}}, sort_keys=True)

    scratch_seeds = range(args.seed, args.seed + args.scratch_seeds)
    for seed in scratch_seeds:  # seed by seed: a cut-short run has whole seeds
        for arch, macs in archs:
            if (key := scratch_key(arch, seed)) not in cache:
                cache[key] = train_scratch(space, arch, args, seed, bundle, ctx.val_batches)
                atomic_write_json(cache_path, cache)
                print(f"scratch seed {seed}, {macs / 1e6:.2f} MMACs: {cache[key]['accuracy']:.4f} in "
                      f"{cache[key]['seconds'] / 60:.1f} min", flush=True)
    rows = []
    for arch, macs in archs:
        runs = [cache[scratch_key(arch, seed)] for seed in scratch_seeds]
        inherited = evaluate_arch(ctx, arch, ctx.val_batches).metrics["accuracy"]
        seeds = [r["accuracy"] for r in runs]
        rows.append({"arch": arch.to_dict(), "macs": macs, "scratch": float(np.mean(seeds)), "scratch_seeds": seeds,
                     "scratch_s": float(np.mean([r["seconds"] for r in runs])), "inherited": inherited})
        print(f"{macs / 1e6:7.2f} MMACs: scratch {np.mean(seeds):.4f} {seeds}, inherited {inherited:.4f}", flush=True)
    scratch = np.array([r["scratch"] for r in rows])
    inherited = np.array([r["inherited"] for r in rows])
    tau = float(kendalltau(inherited, scratch).statistic)
    gap = float(np.mean(inherited - scratch))
    # The labels' own agreement: tau between two scratch seeds' rankings, averaged over the pairs of seeds.
    pairs = [(a, b) for a in range(args.scratch_seeds) for b in range(a + 1, args.scratch_seeds)]
    self_tau = (float(np.mean([kendalltau([r["scratch_seeds"][a] for r in rows],
                                          [r["scratch_seeds"][b] for r in rows]).statistic for a, b in pairs]))
                if pairs else None)
    seed_sd = (float(np.mean([np.std(r["scratch_seeds"], ddof=1) for r in rows])) if pairs else None)
    atomic_write_json(out / "ranking.json", {"rows": rows, "tau": tau, "gap": gap, "scratch_self_tau": self_tau,
                                             "scratch_seed_sd": seed_sd, "recipe": recipe})

    cmd = (f"python scripts/bench_ranking.py --run {args.run} --subnets {args.subnets} --epochs {args.epochs}"
           + (f" --train-images {args.train_images}" if args.train_images else "")
           + (f" --val-images {args.val_images}" if args.val_images else "")
           + f" --seed {args.seed}" + (f" --scratch-seeds {args.scratch_seeds}" if args.scratch_seeds > 1 else "")
           + f" --threads {args.threads}" + (" --write" if args.write else ""))
    table = [f"| {r['macs'] / 1e6:.2f} | {r['scratch']:.4f} | {' / '.join(f'{a:.4f}' for a in r['scratch_seeds'])} "
             f"| {r['inherited']:.4f} | {r['inherited'] - r['scratch']:+.4f} | {r['scratch_s'] / 60:.1f} |"
             for r in rows]
    noise = ("" if self_tau is None else
             f" The scratch side against itself (τ between two seeds' rankings, mean over pairs): **{self_tau:.3f}**; "
             f"seed-to-seed standard deviation of a subnet's scratch accuracy: {seed_sd * 100:.2f} points.")
    body = "\n".join([
        f"Command: `{cmd}` — {machine_line(args.threads)}; run `{args.run}` ({ctx.data_info['dataset']}); "
        f"1-minute load average {os.getloadavg()[0]:.1f} at the end (above ~2, other jobs shared the 2 cores).",
        "",
        f"{len(rows)} static subnets over the space's MAC range, each trained from scratch with one recipe "
        f"({args.epochs} epochs over {args.train_images or 'all'} augmented training images, Adam lr 3e-3 "
        f"cosine, batch 128, label smoothing 0.1; seeds {args.seed}..{args.seed + args.scratch_seeds - 1}, ranked by "
        "their mean) against the accuracy inherited from the supernet "
        f"(BatchNorm recalibrated on {args.bn_images} training images); both on "
        f"{args.val_images or 'all'} validation images:",
        "",
        "| MMACs | scratch val acc (mean) | per seed | inherited val acc | inherited − scratch "
        "| scratch training (min per seed) |",
        "|---|---|---|---|---|---|",
        *table,
        "",
        f"Kendall τ (inherited vs scratch ranking; goal ≥ 0.7): **{tau:.3f}**; mean gap inherited − scratch "
        f"(goal ≥ −0.01): **{gap * 100:+.2f} points** (median {statistics.median(inherited - scratch) * 100:+.2f})."
        + noise,
    ])
    print(body)
    if args.write:
        replace_section(Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md", "Ranking", body)


if __name__ == "__main__":
    main()
