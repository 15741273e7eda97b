"""Benchmark: one-command supernet training on Fashion-MNIST — time, and test accuracy of the max and min
subnets and of the best early-exit subnet within 60% of the max subnet's MACs.

Usage: python scripts/bench_train.py [--preset quick] [--out runs/bench-quick] [--reuse] [--write]
Trains with `nas4dyn train` (skipped with --reuse when OUT already holds a supernet), then evaluates on the
test split after BN recalibration. Exit thresholds are chosen on the validation split, never on test. With
--write the table replaces the "Training" section of docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

import nas4dyn
from benchlib import machine_line, replace_section
from nas4dyn.data import load_data, make_loader
from nas4dyn.io import atomic_write_text
from nas4dyn.train.bn import recalibrate_bn
from nas4dyn.train.evaluation import accuracy_and_rates
from nas4dyn.train.sampling import all_exits

TARGETS = {"quick": (6 * 60, 0.88, None), "default": (45 * 60, 0.935, 0.90)}  # seconds, max acc, min acc
EXIT_BUDGET, EXIT_TARGET = 0.6, 0.92


TIMING = "bench_train_timing.json"  # how long the training took, kept in OUT so that --reuse can report it


def train(args: argparse.Namespace) -> tuple[str, dict[str, float]]:
    """Train (unless --reuse finds OUT's supernet); the command and its wall time, CPU time and load averages
    (empty when a reused run was not trained by this script)."""
    cmd = ["nas4dyn", "train", "--space", args.space, "--data", "fashion-mnist", "--out", str(args.out),
           "--preset", args.preset, "--seed", str(args.seed)]
    if args.reuse and (args.out / "supernet.pt").is_file():
        path = args.out / TIMING
        return " ".join(cmd), json.loads(path.read_text()) if path.is_file() else {}
    load_before = os.getloadavg()[0]
    before, tic = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run([sys.executable, "-m", *cmd], check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    timing = {"wall_s": time.perf_counter() - tic, "load_before": load_before, "load_after": os.getloadavg()[0],
              "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}
    atomic_write_text(args.out / TIMING, json.dumps(timing))
    return " ".join(cmd), timing


def exit_candidates(net: nas4dyn.Supernet, recal, val) -> list[dict]:
    """Backbones with an exit at every allowed position; per threshold, val/test accuracy and expected MACs."""
    space = net.space
    top = space.max_arch()
    backbones = {"max": top, "max-min-widths": nas4dyn.Arch(space.name, top.resolution, top.depths, top.kernels,
                 tuple((min(st.widths),) * d for st, d in zip(space.stages, top.depths)), top.gates)}
    rows = []
    for label, backbone in backbones.items():
        arch = all_exits(space, backbone, 1.0)
        recalibrate_bn(net, arch, recal, 2000)  # exit thresholds do not change BN statistics
        for t in (0.8, 0.9, 0.95, 0.99):
            a = arch.with_thresholds([t] * len(arch.exits))
            net.set_active(a)
            val_macs = nas4dyn.count_macs(net, a, val).macs_expected
            rows.append({"backbone": label, "threshold": t, "val_acc": accuracy_and_rates(net, val)["val_acc"],
                         "val_macs": val_macs, "arch": a})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="quick", choices=sorted(TARGETS))
    ap.add_argument("--space", default="fmnist")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--reuse", action="store_true", help="evaluate OUT's supernet without training again")
    ap.add_argument("--write", action="store_true", help="write the results into docs/BENCHMARKS.md")
    args = ap.parse_args()
    args.out = args.out or Path("runs") / f"bench-{args.preset}"
    command, timing = train(args)

    torch.set_num_threads(2)
    metrics = json.loads((args.out / "train_metrics.json").read_text())
    net = nas4dyn.load_supernet(args.out)
    data = load_data("fashion-mnist")
    recal = make_loader(data.train_eval, 500, seed=0, limit=2000)
    val, test = make_loader(data.val, 500), make_loader(data.test, 500)
    results = {}
    for label, arch in (("max", net.space.max_arch()), ("min", net.space.min_arch())):
        recalibrate_bn(net, arch, recal, 2000)
        results[label] = (accuracy_and_rates(net, test)["val_acc"], nas4dyn.count_macs(net, arch).macs_max)
    max_macs = results["max"][1]
    within = [r for r in exit_candidates(net, recal, val) if r["val_macs"] <= EXIT_BUDGET * max_macs]
    best = max(within, key=lambda r: r["val_acc"], default=None)

    limit, max_goal, min_goal = TARGETS[args.preset]
    train_s = metrics["total_wall_time_s"]
    lines = [
        f"Command: `python scripts/bench_train.py --preset {args.preset} --out {args.out}"
        f"{' --reuse' if args.reuse else ''}{' --write' if args.write else ''}` "
        f"(runs `{command}`) — {machine_line(torch.get_num_threads())}",
        "",
        (f"Load average (1 min) before / after training: {timing['load_before']:.1f} / {timing['load_after']:.1f} "
         "(above ~2, other jobs shared these 2 cores and wall times are inflated)." if timing else
         "Load average during training: not known (a reused run that this script did not train)."),
        "",
        f"Training precision: {metrics.get('precision', 'fp32')} "
        f"(config: {metrics['config'].get('precision', 'fp32')}; "
        "auto = bf16 autocast where the CPU has AMX or AVX512-BF16).",
        "",
        "| measure | value | goal |",
        "|---|---|---|",
        f"| training wall time (phases incl. evaluation) | {train_s / 60:.1f} min | ≤ {limit / 60:.0f} min |",
        "| whole command wall time / CPU time | "
        + (f"{timing['wall_s'] / 60:.1f} min / {timing['cpu_s'] / 60:.1f} CPU-min" if timing
           else "not known (a reused run that this script did not train)") + " | — |",
        f"| max subnet test accuracy ({results['max'][1] / 1e6:.1f} MMACs) | {100 * results['max'][0]:.2f}% "
        f"| ≥ {100 * max_goal:.1f}% |",
        f"| min subnet test accuracy ({results['min'][1] / 1e6:.1f} MMACs) | {100 * results['min'][0]:.2f}% | "
        f"{'≥ %.1f%%' % (100 * min_goal) if min_goal else '—'} |",
    ]
    if best is not None:
        net.set_active(best["arch"])
        recalibrate_bn(net, best["arch"], recal, 2000)
        test_acc = accuracy_and_rates(net, test)["val_acc"]
        test_macs = nas4dyn.count_macs(net, best["arch"], test).macs_expected
        lines.append(
            f"| best exit subnet ≤ {EXIT_BUDGET:.0%} of max MACs (chosen on val: {best['backbone']} backbone, "
            f"all exits, threshold {best['threshold']}) | {100 * test_acc:.2f}% at {test_macs / max_macs:.0%} "
            f"of max MACs ({test_macs / 1e6:.1f} M expected) | "
            + (f"≥ {100 * EXIT_TARGET:.0f}% |" if args.preset == "default" else "— |"))
    else:
        lines.append(f"| exit subnet ≤ {EXIT_BUDGET:.0%} of max MACs | none of the candidates fits | |")
    lines += ["", "Per phase (from train_metrics.json; validation split; img/s: training images over training time, "
              "evaluation excluded):", "", "| phase | steps | wall (s) | img/s | max val acc | min val acc |",
              "|---|---|---|---|---|---|"]
    images_per_step = metrics["config"]["batch_size"] * metrics["world_size"]
    for p in metrics["phases"]:
        ips = p["steps"] * images_per_step / (p["wall_time_s"] - p["eval_time_s"])
        lines.append(f"| {p['name']} | {p['steps']} | {p['wall_time_s']:.0f} | {ips:.0f} | "
                     f"{100 * p['max_val_acc']:.2f}% | {100 * p['min_val_acc']:.2f}% |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        title = "Training" if args.preset == "quick" else f"Training ({args.preset} preset)"
        replace_section(Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md", title, table)


if __name__ == "__main__":
    main()
