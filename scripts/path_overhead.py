"""Path-equivalent overhead of an exported dynamic model (shared by bench_export.py and bench_mechanisms.py).

For every timed image, the static twin of the path the dynamic model takes for it
(:func:`nas4dyn.cost.static_path.path_model`: same exit, same open filters / kernel sizes / width / precision /
route, no decision machinery), scripted and frozen like the export. Overhead = the dynamic model's time ÷ the
twins' time on the same images:

- batch 1: images one by one, the dynamic model and the image's twin taking turns (random order per image);
- batch B: per batch, the dynamic model on the batch ÷ the twins on the batch's images grouped by path (one
  call per distinct path, on that path's images).

Each pass gives one ratio (sum over the images); the median over passes is reported. Before timing, each twin
is checked to give the dynamic model's logits on its images.
"""
from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from nas4dyn.cost.static_path import block_decisions, path_model
from search_spaces.arch import Arch
from supernet.network import Supernet
from supernet.scripting import freeze_scripted


@dataclass
class PathOverhead:
    """Medians over passes: ms per image of the dynamic model and of the twins, and their ratio; ``paths`` is
    the number of distinct paths among the images."""

    paths: int
    dynamic_ms: float
    twins_ms: float
    ratio: float
    spread: float  # (largest - smallest pass ratio) ÷ median


@torch.no_grad()
def path_twins(net: Supernet, arch: Arch, mean: list[float], std: list[float], images: torch.Tensor
               ) -> tuple[list[int], list[torch.jit.ScriptModule]]:
    """(twin index per image, the distinct twins) for the images (in [0, 1]) under ``arch``."""
    sub = net.extract(arch).eval()
    m, s = torch.tensor(mean), torch.tensor(std)
    x = (images - m.view(1, -1, 1, 1)) / s.view(1, -1, 1, 1)
    exits = sub.forward_with_exits(x)[1]
    decisions = block_decisions(sub, x)
    keys: dict[tuple, int] = {}
    twins: list[torch.jit.ScriptModule] = []
    index = []
    for i in range(len(images)):
        key = (int(exits[i]),) + tuple(tuple(d[i].long().tolist()) for d in decisions)
        if key not in keys:
            keys[key] = len(twins)
            twins.append(freeze_scripted(path_model(sub, m, s, int(exits[i]), [d[i] for d in decisions])))
        index.append(keys[key])
    return index, twins


@torch.no_grad()
def check_twins(dynamic: nn.Module, index: list[int], twins: list[nn.Module], images: torch.Tensor,
                tolerance: float = 1e-4) -> None:
    """Every twin gives the dynamic model's logits on its images (else the comparison is meaningless)."""
    logits = dynamic(images)
    for i, t in enumerate(index):
        err = float((twins[t](images[i : i + 1])[0] - logits[i]).abs().max())
        assert err <= tolerance, f"the path twin of image {i} differs from the dynamic model by {err:.2e}"


def timed(fn, *args) -> float:
    """Seconds one call ``fn(*args)`` takes."""
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


@torch.no_grad()
def path_overhead(dynamic: nn.Module, index: list[int], twins: list[nn.Module], images: torch.Tensor,
                  repeats: int, batch: int = 1, warmup: int = 3) -> PathOverhead:
    """Path-equivalent overhead of ``dynamic`` on ``images`` at ``batch`` (see the module docstring); every
    model first runs each of its inputs ``warmup`` times (0 when the caller warmed them up already)."""
    order = random.Random(0)
    batches = []  # (images, {twin: rows of the batch taking its path})
    for start in range(0, len(images), batch):
        groups: dict[int, list[int]] = {}
        for j, i in enumerate(range(start, min(start + batch, len(images)))):
            groups.setdefault(index[i], []).append(j)
        batches.append((images[start : start + batch], groups))
    # Warm-up: TorchScript's profiling executor optimises a graph after its first calls, so every model runs
    # each of its inputs a few times before the timing (a twin seen once would be timed unoptimised).
    for x, groups in batches:
        for _ in range(warmup):
            dynamic(x)
            for t, rows in groups.items():
                twins[t](x[rows])
    ratios, dyn_ms, twin_ms = [], [], []
    for _ in range(repeats):
        dyn = twin = 0.0
        for x, groups in batches:
            calls = [("d", None)] + [("t", g) for g in groups.items()]
            order.shuffle(calls)
            for kind, group in calls:
                if kind == "d":
                    dyn += timed(dynamic, x)
                else:
                    t, rows = group
                    twin += timed(twins[t], x[rows] if len(rows) < len(x) else x)
        ratios.append(dyn / twin)
        dyn_ms.append(dyn * 1e3 / len(images))
        twin_ms.append(twin * 1e3 / len(images))
    med = statistics.median(ratios)
    return PathOverhead(len(twins), statistics.median(dyn_ms), statistics.median(twin_ms), med,
                        (max(ratios) - min(ratios)) / med)
