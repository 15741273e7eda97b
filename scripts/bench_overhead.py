"""Benchmark: path-equivalent overhead of every dynamic mechanism of one space, at batch 1 and ``--batch``.

Mechanisms: exits, channel gates, skip gates, width gates, EMG gates, DFS gates and CIGT routing, each on
bench_export's backbone (every stage at full depth and width, the middle kernel choice). The space is taken
with every gate kind allowed on every stage (where a block can hold it) and its last two stages routable in 2
and 4 paths (:func:`all_mechanisms`), so that fmnist and cifar both carry all seven mechanisms.

Weights: with ``--run``, the trained run's supernet; modules its space does not have (width, EMG and DFS gate
heads, routers) start untrained, the routed blocks' path copies start as the trained block
(``Supernet.seed_path_copies``), and every decision is calibrated as below. Without ``--run``, an untrained
supernet whose BatchNorms are randomised (weight U(0.5, 1.5), bias and running mean N(0, 0.1), running
variance U(0.5, 1.5)): the zero-initialised residual BatchNorm gammas of a fresh supernet would give all-zero
folded convs, which run faster than real ones on this CPU.

Calibration (on 1000 validation images): exits and gates as bench_export (half the images open each gate, a
width, DFS option or path wins about equally often); the routers' BatchNorms re-estimated for the routed
subnet; the DFS int8 activation ranges estimated for the DFS subnet.

Timing: the path twins of scripts/path_overhead.py on the first ``--path-samples`` test images. ``--repeats``
short reps; in each, the mechanisms in a shuffled order, each timed at batch 1 (dynamic model and path twins
taking turns image by image) and at ``--batch``, and the frozen static export of the backbone on the same
images (for the speed-up). Reported: the median over reps of the per-rep ratios and their interquartile range.
The set-up runs wherever the process runs; with ``--lock`` the timing takes the lock file (flock) and pins
itself to ``--timing-cpu`` while it holds it.

Before / after a code change in one process: ``--save DIR`` (run from the old checkout, a copy of this script
beside its code) writes the exported models and exits; ``--baseline DIR`` (repeatable) then times each saved
model as "<mechanism> (<DIR's name>)" in the same reps, against the same twins (a TorchScript file carries its
own code).

Usage: python scripts/bench_overhead.py [--space fmnist] [--run DIR] [--kinds channel,skip,...] [--path-samples 32]
       [--repeats 30] [--batch 32] [--lock /work/out/core1.lock --timing-cpu 1] [--json OUT]
       [--save DIR | --baseline DIR]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import nas4dyn  # noqa: E402
from bench_export import backbone, calibrate_exits, calibrate_gates, load_images  # noqa: E402
from benchlib import machine_line, timing_cpu  # noqa: E402
from path_overhead import check_twins, path_overhead, path_twins, timed  # noqa: E402
from nas4dyn.export.measure import realized_macs  # noqa: E402
from nas4dyn.export.torchscript import load_exported, save_torchscript  # noqa: E402
from nas4dyn.train.sampling import gated  # noqa: E402
from search_spaces.arch import Arch, ExitChoice  # noqa: E402
from search_spaces.space import SearchSpace  # noqa: E402
from supernet.dynamic.cigt import Router  # noqa: E402
from supernet.dynamic.dfs import ActRange  # noqa: E402
from supernet.network import Supernet  # noqa: E402

GATE_KINDS = ("channel", "skip", "width", "emg", "dfs")
MECHANISMS = ("exits",) + GATE_KINDS + ("routing",)
GOALS = {"exits": 1.05, "skip gates": 1.05, "width gates": 1.05}  # the others: 1.10


def all_mechanisms(space: SearchSpace) -> SearchSpace:
    """``space`` with every gate kind allowed on every stage and its last two stages routable (2 and 4 paths)."""
    last = len(space.stages) - 1
    stages = tuple(dataclasses.replace(
        st, gates=tuple(dict.fromkeys(st.gates + GATE_KINDS)),
        paths=(1, 2, 4) if s == last else (1, 2) if s == last - 1 else st.paths) for s, st in enumerate(space.stages))
    return dataclasses.replace(space, stages=stages)


@torch.no_grad()
def supernet(space_name: str, run: str | None) -> tuple[Supernet, dict | None, str]:
    """(supernet of the all-mechanisms space in eval mode, the run's normalisation or None, weights described)."""
    torch.manual_seed(0)  # the modules a run lacks start the same in every run of this script
    if run:
        from nas4dyn.api import load_supernet_file

        trained, info = load_supernet_file(Path(run) / "supernet.pt")
        net = Supernet(all_mechanisms(trained.space))
        missing, unexpected = net.load_state_dict(trained.state_dict(), strict=False)
        assert not unexpected, f"the run has weights the all-mechanisms space lacks: {unexpected[:5]}"
        net.seed_path_copies()
        kinds = sorted({k.split(".")[0] if k.startswith(("path_copies", "routers")) else k.split(".")[-2]
                        for k in missing})
        return net.eval(), info, f"trained run {run}; new modules ({', '.join(kinds)}) as described above"
    net = Supernet(all_mechanisms(nas4dyn.load_space(space_name)))
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
            m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
    return net.eval(), None, "untrained, BatchNorms randomised"


@torch.no_grad()
def calibrate_in_training_mode(net: Supernet, arch: Arch, x: torch.Tensor, kinds: tuple[type, ...]) -> None:
    """Re-estimate the statistics of the ``kinds`` modules (router BatchNorms, DFS activation ranges) for ``arch``
    on ``x``: only they run in training mode, with cumulative averages for BatchNorms."""
    mods = [m for m in net.modules() if isinstance(m, kinds)]
    for m in mods:
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
        m.train()
    net.set_active(arch)
    net.forward_all(x)
    for m in mods:
        m.eval()


def variants_of(net: Supernet, x: torch.Tensor) -> dict[str, Arch]:
    """Calibrated archs of the seven mechanisms on bench_export's backbone (x: normalised validation images)."""
    space = net.space
    base = backbone(space)
    exits = tuple(ExitChoice(s, b, 1.0) for s, b in space.exits.positions if b == 1)[:2]
    variants = {"exits": calibrate_exits(net, dataclasses.replace(base, exits=exits), x, 0.4)}
    variants.update({f"{kind} gates": gated(space, base, kind) for kind in GATE_KINDS})
    variants["routing"] = dataclasses.replace(base, paths=tuple(max(st.paths) for st in space.stages))
    calibrate_gates(net, variants, x)
    routers = tuple({type(m) for r in net.routers.values() for m in r.modules()
                     if isinstance(m, nn.modules.batchnorm._BatchNorm)})
    calibrate_in_training_mode(net, variants["routing"], x, routers)
    calibrate_in_training_mode(net, variants["dfs gates"], x, (ActRange,))
    return variants


def twin_tolerance(name: str) -> float:
    """How far a mechanism's path twins may differ from it: int8 branches (DFS) 1e-3, as a last-bit difference
    upstream can move a value across a quantization step; 1e-4 otherwise."""
    return 1e-3 if name == "dfs gates" else 1e-4


def calibrated(space_name: str, run: str | None, n_val: int, n_test: int
               ) -> tuple[Supernet, dict[str, Arch], torch.Tensor, list[float], list[float], str, str]:
    """(supernet, calibrated variants, test images in [0, 1], mean, std, weights described, image source):
    :func:`supernet` calibrated on ``n_val`` validation images (:func:`variants_of`)."""
    net, info, weights = supernet(space_name, run)
    val, test, mean, std, source = load_images(net.space, n_val, n_test)
    if info:
        mean, std = list(info["mean"]), list(info["std"])
    norm = (val - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    return net, variants_of(net, norm), test, mean, std, weights, source


@torch.no_grad()
def static_ms(model: nn.Module, images: torch.Tensor, batch: int) -> float:
    """ms per image of ``model`` over ``images`` at ``batch`` (one pass)."""
    return 1e3 * sum(timed(model, images[i : i + batch]) for i in range(0, len(images), batch)) / len(images)


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", default="fmnist", help="the space (with --run: the run's)")
    ap.add_argument("--run", help="a trained run directory (default: an untrained supernet of --space)")
    ap.add_argument("--path-samples", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lock", help="a lock file to hold (flock) while timing")
    ap.add_argument("--timing-cpu", type=int, help="the CPU to pin the timing to")
    ap.add_argument("--json", help="write the per-rep figures here")
    ap.add_argument("--kinds", default=",".join(MECHANISMS), help="mechanisms timed, comma-separated")
    ap.add_argument("--save", help="write the exported models to this directory and exit (no timing)")
    ap.add_argument("--baseline", action="append", default=[],
                    help="also time the models --save wrote to this directory (repeatable)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    net, variants, test, mean, std, weights, source = calibrated(args.space, args.run, 1000, args.path_samples)
    kinds = {k if k in ("exits", "routing") else f"{k} gates" for k in args.kinds.split(",")}
    variants = {name: arch for name, arch in variants.items() if name in kinds}
    models, twins = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, arch in {"static": backbone(net.space), **variants}.items():
            path = Path(args.save or tmp) / f"{name.replace(' ', '_')}.ts"
            save_torchscript(nas4dyn.export_subnet(net, arch, {"mean": mean, "std": std}), path)
            models[name] = load_exported(path)
    if args.save:
        return
    for name, arch in list(variants.items()):
        twins[name] = path_twins(net, arch, mean, std, test)
        check_twins(models[name], *twins[name], test, twin_tolerance(name))
        print(f"{name}: {len(twins[name][1])} distinct paths", flush=True)
        for folder in map(Path, args.baseline):
            saved, label = folder / f"{name.replace(' ', '_')}.ts", f"{name} ({folder.name})"
            if saved.exists():  # the same arch and weights, so it must fit the same twins
                models[label] = load_exported(saved)
                check_twins(models[label], *twins[name], test, twin_tolerance(name))
                variants[label], twins[label] = arch, twins[name]
    macs = {name: realized_macs(m, test, 1) for name, m in models.items()}
    batches = (1, args.batch)
    with timing_cpu(args.lock, args.timing_cpu), torch.no_grad():
        load = [os.getloadavg()[0]]
        started = time.time()
        for name in models:  # warm-up: TorchScript optimises a graph after its first calls
            for b in batches:
                if name == "static":
                    static_ms(models[name], test, b), static_ms(models[name], test, b)
                else:
                    path_overhead(models[name], *twins[name], test, 1, b)
        reps: dict[str, dict[int, list]] = {name: {b: [] for b in batches} for name in models}
        order = random.Random(0)
        for _ in range(args.repeats):
            names = list(models)
            order.shuffle(names)
            for name in names:
                for b in batches:
                    if name == "static":
                        reps[name][b].append(static_ms(models[name], test, b))
                    else:
                        o = path_overhead(models[name], *twins[name], test, 1, b, warmup=0)
                        reps[name][b].append((o.ratio, o.dynamic_ms, o.twins_ms))
        seconds = time.time() - started
        load.append(os.getloadavg()[0])
    print(f"{net.space.name}, {weights}; {source} images; {machine_line(1)}; timing {seconds:.0f} s "
          f"on CPU {args.timing_cpu}; 1-minute load {load[0]:.2f} at the start of the timing, {load[1]:.2f} at the end")
    head = "| mechanism | distinct paths | MACs ÷ static | speed-up over static (b1) |"
    for b in batches:
        head += f" ms/img dynamic / twins (b{b}) | overhead b{b} [IQR] |"
    print(head + " goal (b1) |")
    print("|---" * (4 + 2 * len(batches) + 1) + "|")
    for name in variants:
        speed = statistics.median(s / d[1] for s, d in zip(reps["static"][1], reps[name][1]))
        row = f"| {name} | {len(twins[name][1])} | {macs[name] / macs['static']:.2f} | {speed:.3f} |"
        for b in batches:
            lo, mid, hi = quartiles([r[0] for r in reps[name][b]])
            dyn, twn = (statistics.median(r[i] for r in reps[name][b]) for i in (1, 2))
            row += f" {dyn:.3f} / {twn:.3f} | **{mid:.3f}** [{lo:.3f}-{hi:.3f}] |"
        lo, mid, hi = quartiles([r[0] for r in reps[name][1]])
        goal = GOALS.get(name, 1.10)
        print(row + f" ≤ {goal:.2f} {'met' if mid <= goal else 'NOT met'} |", flush=True)
    if args.json:
        from nas4dyn.io import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps({"space": net.space.name, "weights": weights, "load": load,
                                                       "seconds": seconds, "macs": macs, "reps": reps}, indent=1))


if __name__ == "__main__":
    main()
