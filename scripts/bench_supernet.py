"""Benchmark: does the supernet slice (not mask)? Train-step time of the supernet at an arch vs its
extracted static twin, and min-arch vs max-arch speed against their MAC ratio.

Usage: python scripts/bench_supernet.py [--spaces fmnist mbv3] [--batches 256 16] [--repeats 7] [--steps 5] [--write]
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


def bench_space(name: str, batch: int, args: argparse.Namespace) -> list[str]:
    """Markdown lines for one space: max and min arch, supernet vs extracted twin, and the speed goal."""
    torch.manual_seed(0)
    space = nas4dyn.load_space(name)
    net = nas4dyn.build_supernet(space).train()
    res = max(space.resolutions)
    x = torch.randn(batch, space.input_channels, res, res)
    y = torch.randint(0, space.num_classes, (batch,))

    rows, times = [], {}
    for label, arch in (("max", space.max_arch()), ("min", space.min_arch())):
        net.set_active(arch)
        twin = net.extract(arch).train()
        forwards = {"supernet": (net, lambda t: net.forward_all(t)[-1]), "twin": (twin, lambda t: twin.forward_all(t)[-1])}
        samples: dict[str, list[float]] = {k: [] for k in forwards}
        for role, (model, fwd) in forwards.items():  # warm-up
            train_step_seconds(model, fwd, x, y, 2)
        for _ in range(args.repeats):  # interleaved, so load from other processes hits both alike
            for role, (model, fwd) in forwards.items():
                samples[role].append(train_step_seconds(model, fwd, x, y, args.steps))
        med = {k: statistics.median(v) for k, v in samples.items()}
        times[label] = (med["supernet"], med["twin"])
        mac = macs(twin.eval(), x[:1])
        rows.append((label, arch.resolution, mac, med["supernet"] * 1e3, med["twin"] * 1e3,
                     med["supernet"] / med["twin"]))

    mac_ratio = rows[0][2] / rows[1][2]
    speed_ratio = times["max"][0] / times["min"][0]
    twin_ratio = times["max"][1] / times["min"][1]
    met = speed_ratio >= mac_ratio / 2
    lines = [
        f"### {name} (batch {batch})",
        "",
        "| arch | input | MMACs/img | supernet step (ms) | extracted twin step (ms) | supernet ÷ twin | goal |",
        "|---|---|---|---|---|---|---|",
    ]
    for (label, res_, mac, sup, twin, ratio), goal in zip(rows, ("≤ 1.10", "≤ 1.25")):
        lines.append(f"| {label} | {res_} | {mac / 1e6:.2f} | {sup:.1f} | {twin:.1f} | {ratio:.3f} | {goal} |")
    lines += [
        "",
        f"max ÷ min supernet step time: **{speed_ratio:.2f}×** for a MAC ratio of {mac_ratio:.2f}× "
        f"(goal: ≥ half the MAC ratio, {mac_ratio / 2:.2f}×) — {'met' if met else 'NOT met'}; the extracted "
        f"static twins themselves: {twin_ratio:.2f}×.",
        "",
    ]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spaces", nargs="+", default=["fmnist"])
    ap.add_argument("--batches", type=int, nargs="+", default=[64], help="one batch size per space")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="write the table into docs/BENCHMARKS.md")
    args = ap.parse_args()
    if len(args.batches) != len(args.spaces):
        ap.error(f"--batches: give one batch size per space ({len(args.spaces)}), got {len(args.batches)}")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    lines = [
        f"Command: `python scripts/bench_supernet.py --spaces {' '.join(args.spaces)} --batches "
        f"{' '.join(map(str, args.batches))} --repeats {args.repeats} --steps {args.steps}"
        f"{' --write' if args.write else ''}` — {machine_line(args.threads)}",
        "",
        "Train step (forward + backward + SGD step), medians of interleaved repeats, one run, random weights and "
        "inputs at the space's largest resolution (the min arch resizes to its own):",
        "",
    ]
    for name, batch in zip(args.spaces, args.batches):
        lines += bench_space(name, batch, args)
    lines.append(f"Load average (1 min) before → after: {load_before:.1f} → {os.getloadavg()[0]:.1f} on "
                 f"{os.cpu_count()} cores (above the core count, other jobs shared the CPU and absolute times are "
                 "inflated).")
    table = "\n".join(lines)
    print(table)
    if args.write:
        replace_section(Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md", "Supernet", table)


if __name__ == "__main__":
    main()
