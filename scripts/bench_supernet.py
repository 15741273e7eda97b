"""Benchmark: does the supernet slice (not mask)? Train-step time of the supernet at an arch vs its
extracted static twin, and min-arch vs max-arch speed against their MAC ratio.

Usage: python scripts/bench_supernet.py [--space fmnist] [--batch 64] [--repeats 7] [--steps 5] [--write]
With --write the table replaces the "Supernet" section of docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import nas4dyn
from benchlib import machine_line, replace_section


def train_step_seconds(model: torch.nn.Module, forward, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(forward(x), y).backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def macs(module: torch.nn.Module, x: torch.Tensor) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module.forward_all(x)
    return counter.get_total_flops() / 2 / len(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", default="fmnist")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="write the table into docs/BENCHMARKS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()[0]
    space = nas4dyn.load_space(args.space)
    net = nas4dyn.build_supernet(space).train()
    res = max(space.resolutions)
    x = torch.randn(args.batch, space.input_channels, res, res)
    y = torch.randint(0, space.num_classes, (args.batch,))

    rows, times = [], {}
    for label, arch in (("max", space.max_arch()), ("min", space.min_arch())):
        net.set_active(arch)
        twin = net.extract(arch).train()
        forwards = {"supernet": (net, lambda t: net.forward_all(t)[-1]), "twin": (twin, lambda t: twin.forward_all(t)[-1])}
        samples: dict[str, list[float]] = {k: [] for k in forwards}
        for name, (model, fwd) in forwards.items():  # warm-up
            train_step_seconds(model, fwd, x, y, 2)
        for _ in range(args.repeats):  # interleaved, so load from other processes hits both alike
            for name, (model, fwd) in forwards.items():
                samples[name].append(train_step_seconds(model, fwd, x, y, args.steps))
        med = {k: statistics.median(v) for k, v in samples.items()}
        times[label] = med["supernet"]
        mac = macs(twin.eval(), x[:1])
        rows.append((label, mac, med["supernet"] * 1e3, med["twin"] * 1e3, med["supernet"] / med["twin"]))

    mac_ratio = rows[0][1] / rows[1][1]
    speed_ratio = times["max"] / times["min"]
    lines = [
        f"Command: `python scripts/bench_supernet.py --space {args.space} --batch {args.batch} "
        f"--repeats {args.repeats} --steps {args.steps}{' --write' if args.write else ''}` — {machine_line(args.threads)}",
        "",
        "Train step (forward + backward + SGD step), medians of interleaved repeats, one run:",
        "",
        "| arch | MMACs/img | supernet step (ms) | extracted twin step (ms) | supernet ÷ twin | goal |",
        "|---|---|---|---|---|---|",
    ]
    for (label, mac, sup, twin, ratio), goal in zip(rows, ("≤ 1.10", "≤ 1.25")):
        lines.append(f"| {label} | {mac / 1e6:.2f} | {sup:.1f} | {twin:.1f} | {ratio:.3f} | {goal} |")
    lines += [
        "",
        f"max ÷ min supernet step time: {speed_ratio:.2f}× for a MAC ratio of {mac_ratio:.2f}× "
        f"(goal: ≥ half the MAC ratio, {mac_ratio / 2:.2f}×) — {'met' if speed_ratio >= mac_ratio / 2 else 'NOT met'}.",
        "",
        f"Load average (1 min) before → after: {load_before:.1f} → {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
        "(above the core count, other jobs shared the CPU and absolute times are inflated).",
    ]
    table = "\n".join(lines)
    print(table)
    if args.write:
        replace_section(Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md", "Supernet", table)


if __name__ == "__main__":
    main()
