"""Measurements of an exported model on data: accuracy, exit and gate rates, realized MACs, latency.

Everything here runs the exported model itself (eager :class:`ExportedModel` or the loaded ``model.ts``), so
the figures describe what the shipped model does. Models take images in [0, 1]; :func:`unnormalised` turns the
normalised batches of :mod:`nas4dyn.data` loaders back into such images.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count
from tqdm import tqdm

from nas4dyn.cost.timing import CLOCKS, STATISTICS
from nas4dyn.errors import DataError
from supernet.dynamic.dfs import DFS_RELATIVE_COST


def unnormalised(loader: Iterable, mean: Sequence[float], std: Sequence[float]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x * std + mean, y)`` for the normalised ``(x, y)`` batches of ``loader``: images back in [0, 1]."""
    m = torch.tensor(list(mean)).view(1, -1, 1, 1)
    s = torch.tensor(list(std)).view(1, -1, 1, 1)
    for x, y in loader:
        yield x * s + m, y


def collect(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], limit: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All (or the first ``limit``) images and labels of ``batches`` as two tensors."""
    xs, ys, n = [], [], 0
    for x, y in batches:
        xs.append(x)
        ys.append(y)
        n += len(x)
        if limit is not None and n >= limit:
            break
    if not xs:
        raise DataError("the data split is empty: pick another --split or data source")
    x, y = torch.cat(xs), torch.cat(ys)
    return (x[:limit], y[:limit]) if limit is not None else (x, y)


@dataclass
class DecisionStats:
    """What the dynamic model decided over a data split: accuracy (0..1), share of samples per exit (the final
    classifier last), and per gated block ("stage.block", along the full path) the mean share of units on —
    for DFS gates the mean cost of the chosen option relative to fp32, as ``Supernet.gate_stats`` reports;
    ``gate_option_shares``: for one-hot choices (DFS options, CIGT paths) the share of samples per option."""

    samples: int
    accuracy: float
    exit_counts: list[int]
    exit_rates: list[float]
    exit_accuracy: list[Optional[float]]
    gate_rates: dict[str, float] = field(default_factory=dict)
    gate_option_shares: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def decision_stats(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                   desc: str = "evaluating", total: Optional[int] = None) -> DecisionStats:
    """Run ``model`` over ``batches`` of (images in [0, 1], labels) and summarise its decisions
    (``total``: the number of batches, for the progress bar)."""
    names: list[str] = list(model.exit_names)
    blocks: list[str] = list(model.gate_blocks)
    kinds: list[str] = list(model.gate_kinds)
    sizes: list[int] = list(model.gate_sizes)
    counts = torch.zeros(len(names), dtype=torch.long)
    correct_at = torch.zeros(len(names), dtype=torch.long)
    gate_on = torch.zeros(sum(sizes), dtype=torch.float64)
    n = 0
    for x, y in tqdm(batches, desc=desc, unit="batch", total=total, leave=False):
        logits, exit_index = model.forward_with_exits(x)
        hit = (logits.argmax(1) == y).long()
        counts += torch.bincount(exit_index, minlength=len(names))
        correct_at += torch.bincount(exit_index, weights=hit.double(), minlength=len(names)).long()
        if sizes:
            gate_on += model.gate_decisions(x).double().sum(0)
        n += len(x)
    if n == 0:
        raise DataError("the data split is empty: pick another --split or data source")
    gate_rates, options, start = {}, {}, 0
    for name, kind, size in zip(blocks, kinds, sizes):
        on = gate_on[start : start + size] / n
        start += size
        if kind in ("dfs", "route"):  # one-hot choices: the share of samples taking each option
            options[name] = on.tolist()
        if kind == "dfs":  # as Supernet.gate_stats: the chosen option's cost relative to fp32
            gate_rates[name] = float(on @ torch.tensor(DFS_RELATIVE_COST, dtype=on.dtype))
        elif kind != "route":  # share of units on
            gate_rates[name] = float(on.mean())
    return DecisionStats(
        samples=n,
        accuracy=float(correct_at.sum()) / n,
        exit_counts=counts.tolist(),
        exit_rates=(counts.double() / n).tolist(),
        exit_accuracy=[float(c) / int(k) if k else None for c, k in zip(correct_at.tolist(), counts.tolist())],
        gate_rates=gate_rates,
        gate_option_shares=options,
    )


def _quantized_conv_flops(x_shape: torch.Size, packed: Any, *args: Any, out_shape: torch.Size, **kwargs: Any) -> int:
    """FLOPs of a quantized (int8) conv: FlopCounterMode sees the op but has no formula for it, and its weight
    sits inside the packed parameters."""
    return conv_flop_count(list(x_shape), list(packed.unpack()[0].shape), list(out_shape), transposed=False)


# DFS int8 branches run quantized::conv2d (and conv2d_relu); counted like their float twins.
QUANTIZED_CONV_FLOPS = {torch.ops.quantized.conv2d: _quantized_conv_flops,
                        torch.ops.quantized.conv2d_relu: _quantized_conv_flops}


@torch.no_grad()
def realized_macs(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 1) -> float:
    """Mean multiply-adds per sample that ``model`` really executes on ``images`` at ``batch_size``, counted
    with ``torch.utils.flop_counter.FlopCounterMode`` (convolutions, int8 convolutions, linear layers, matrix
    products)."""
    if len(images) == 0:
        raise DataError("no images to count MACs on")
    with FlopCounterMode(display=False, custom_mapping=QUANTIZED_CONV_FLOPS) as counter:
        for i in range(0, len(images), batch_size):
            model(images[i : i + batch_size])
    return counter.get_total_flops() / 2 / len(images)


@dataclass
class Latency:
    """Latency over a fixed set of images. Every call is timed alone (``clock``: wall, or the CPU time of the
    calling thread); each call's ``statistic`` (median or min) over the repeats, averaged over the calls, is
    ``ms_per_batch`` (per sample: ``ms_per_sample``) — the latency profiler's statistic per call, then the
    expectation over the data, as ``LatencyModel.predict_expected`` predicts it. ``repeats_ms_per_sample``:
    the mean per-sample time of each repeat (to judge the noise); ``runtime``: what ran the model (torchscript:
    model.ts, or onnxruntime: model.onnx)."""

    batch_size: int
    samples: int
    ms_per_sample: float
    ms_per_batch: float
    repeats_ms_per_sample: list[float]
    threads: int
    statistic: str = "median"
    clock: str = "wall"
    runtime: str = "torchscript"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def measure_latency(model: Any, images: torch.Tensor, batch_size: int = 1, repeats: int = 5,
                    warmup: int = 1, statistic: str = "median", clock: str = "wall",
                    runtime: str = "torchscript") -> Latency:
    """Run ``model`` over ``images`` in batches of ``batch_size``, ``warmup`` + ``repeats`` times, timing each
    call. Dynamic models take a different time per sample, so every pass covers the same images. ``statistic``
    and ``clock`` are those of the latency profiler (:mod:`nas4dyn.cost.timing`), so a card can state a
    measurement of the same kind as the table's prediction (on a loaded CPU the min of whole passes would
    not be: it averages the disturbed calls in). ``images``: a tensor, or a numpy array for a ``runtime``
    onnxruntime model."""
    return measure_latencies([model], images, batch_size, repeats, warmup, statistic, clock, runtime)[0]


@torch.no_grad()
def measure_latencies(models: Sequence[Any], images: torch.Tensor, batch_size: int = 1, repeats: int = 5,
                      warmup: int = 1, statistic: str = "median", clock: str = "wall",
                      runtime: str = "torchscript", seed: int = 0) -> list[Latency]:
    """:func:`measure_latency` of several models, interleaved: in each of the ``warmup`` + ``repeats`` rounds
    every model makes one pass over ``images``, the models in a shuffled order. The machine's speed drifts
    over seconds (other jobs, a shared host), so a model timed in one stretch carries that stretch's speed;
    in rounds, every model sees all of them and the models compare with each other."""
    if len(images) == 0:
        raise DataError("no images to time")
    summarize, read_clock = STATISTICS[statistic], CLOCKS[clock]
    batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    per_call = [[[] for _ in batches] for _ in models]  # model -> batch -> timed calls
    order = list(range(len(models)))
    shuffle = random.Random(seed)
    for r in range(warmup + repeats):
        shuffle.shuffle(order)
        for m in order:
            model = models[m]
            for i, x in enumerate(batches):
                start = read_clock()
                model(x)
                if r >= warmup:
                    per_call[m][i].append(read_clock() - start)
    results = []
    for calls in per_call:
        ms_per_batch = 1e3 * sum(summarize(t) for t in calls) / len(batches)
        per_pass = [1e3 * sum(t[r] for t in calls) / len(images) for r in range(repeats)]
        results.append(Latency(batch_size, len(images), ms_per_batch * len(batches) / len(images), ms_per_batch,
                               per_pass, torch.get_num_threads(), statistic, clock, runtime))
    return results
