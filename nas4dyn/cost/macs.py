"""Exact MACs of a dynamic subnet: static pieces counted with fvcore, combined over exits and gate states.

fvcore traces one path of a model and counts exits it does not take as free. Here every piece of the
extracted :class:`~supernet.subnet.SubNet` is traced on its own at batch 1 — gater, stem, each block in each
gate state, each exit head and its confidence, the classifier — and the pieces are combined per path
(:mod:`nas4dyn.cost.paths`). Only convolutions, linear layers and matrix products count (one multiply-add =
one MAC), so a static subnet's total equals ``torch.utils.flop_counter.FlopCounterMode`` / 2. The exception
is the exit confidence (softmax and, for the entropy criterion, its elementwise ops), which has no
multiply-adds but is never free: it counts one operation per element.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Optional

import numpy as np
import torch
from torch import nn

with warnings.catch_warnings():
    # fvcore scripts a loss function at import, which recent torch flags as deprecated: noise for our users.
    warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=FutureWarning)
    from fvcore.nn.jit_analysis import JitModelAnalysis
    from fvcore.nn.jit_handles import (
        addmm_flop_jit,
        bmm_flop_jit,
        conv_flop_jit,
        einsum_flop_jit,
        elementwise_flop_counter,
        linear_flop_jit,
        matmul_flop_jit,
    )

from nas4dyn.cost.paths import (
    BlockSlot,
    Part,
    SamplePaths,
    arch_layout,
    forced_block,
    gate_kind,
    full_cost,
    min_cost,
    path_contributions,
    trace_paths,
)
from search_spaces.arch import Arch
from supernet.dynamic.cigt import RoutedBlock
from supernet.dynamic.heads import confidence
from supernet.network import Supernet
from supernet.subnet import SubNet

# The multiply-add ops (the set FlopCounterMode counts); everything else — BN, activations, pooling,
# resizing — is left out on purpose.
MAC_HANDLES = {
    "aten::_convolution": conv_flop_jit,
    "aten::addmm": addmm_flop_jit,
    "aten::linear": linear_flop_jit,
    "aten::matmul": matmul_flop_jit,
    "aten::mm": matmul_flop_jit,
    "aten::bmm": bmm_flop_jit,
    "aten::einsum": einsum_flop_jit,
}
_PER_ELEMENT = elementwise_flop_counter(1, 0)
CONFIDENCE_HANDLES = {
    op: _PER_ELEMENT
    for op in ("aten::softmax", "aten::clamp_min", "aten::log", "aten::mul", "aten::sum", "aten::neg",
               "aten::div", "aten::rsub")
}


@dataclass
class CostReport:
    """MACs of one subnet per input sample (batch 1).

    ``macs_max``: everything runs — every gate open, every exit head (and its confidence) evaluated, the
    final classifier reached. ``macs_min``: every sample leaves at the first exit (the final classifier if
    there is none) with the cheapest gate states. ``macs_expected``: the mean over the data of each sample's
    realized MACs along its own path (without data: the full path, so it equals ``macs_max``).
    ``parts`` holds each part's MACs on the full path (they sum to ``macs_max``); ``parts_expected`` each
    part's mean realized MACs (they sum to ``macs_expected``). ``exit_rates``: share of samples per exit,
    the final classifier last; ``gate_rates``: mean share of units on per gated block ("stage.block").
    """

    macs_max: int
    macs_min: int
    macs_expected: float
    parts: dict[str, int] = field(default_factory=dict)
    parts_expected: dict[str, float] = field(default_factory=dict)
    exit_rates: list[float] = field(default_factory=list)
    gate_rates: dict[str, float] = field(default_factory=dict)
    samples: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Confidence(nn.Module):
    """An exit's confidence as a module (for fvcore)."""

    def __init__(self, criterion: str):
        super().__init__()
        self.criterion = criterion

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return confidence(logits, self.criterion)


def count_ops(module: nn.Module, inputs: tuple[torch.Tensor, ...], handles: Optional[dict] = None) -> int:
    """Operations of one traced forward of ``module`` (default: multiply-adds)."""
    analysis = JitModelAnalysis(module, inputs).set_op_handle(**(handles or MAC_HANDLES))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer noise about data-dependent branches, which we fix per state
        return int(analysis.total())


def _block_levels(blk: nn.Module, h: torch.Tensor, kind: str, units: int) -> tuple[tuple[float, float], ...]:
    """MACs of a block per gate state: (units on, MACs). A decision module of the block's own is a separate
    part (see ``GateKind.decider``)."""
    if kind == "none":
        return ((0.0, float(count_ops(*_with_logits(blk, torch.zeros(0, dtype=torch.bool), h)))),)
    gate = gate_kind(kind)
    # Per-filter gates switch convs that are linear in the filters they run, so states 0, 1 and all fix the
    # line (GateKind.levels); state 0 is traced too because the block may still run work then (a channel-gated
    # block computes one masked filter when every filter is off).
    levels = []
    for on in gate.levels(blk, units):
        mask = torch.arange(units) < gate.macs_as(on)
        levels.append((float(on), float(count_ops(*_with_logits(blk, mask, h)))))
    if kind == "channel" and len(levels) == 3 and levels[1][0] > 1:
        # Grouped gates cannot be forced to one filter; the MACs are linear in the filters from one filter on
        # (a shorter last group runs fewer than the first), so the state "one filter" is on the line.
        (first, at_first), (last, at_last) = levels[1], levels[2]
        levels.insert(1, (1.0, at_first - (first - 1) * (at_last - at_first) / (last - first)))
    return tuple(levels)


def _with_logits(blk: nn.Module, mask: torch.Tensor, h: torch.Tensor) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The block forced into the state ``mask``, and its inputs, ready for :func:`count_ops`."""
    if getattr(blk, "int8_branch", None) is not None:
        # fvcore cannot trace quantized convs (their state holds a None bias); the int8 state's MACs are
        # counted through GateKind.macs_as, so a copy without the int8 branch is traced.
        blk = copy.deepcopy(blk)
        blk.int8_branch = None
    module, logits = forced_block(blk, mask)
    return module, (h, logits)


class _Method(nn.Module):
    """One method of a module as a forward: fvcore traces modules' forward methods only."""

    def __init__(self, module: nn.Module, method: str):
        super().__init__()
        self.module, self.method = module, method

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return getattr(self.module, self.method)(*inputs)


def _fixed(name: str, segment: int, module: nn.Module, inputs: tuple[torch.Tensor, ...],
           handles: Optional[dict] = None) -> Part:
    """A part that costs the same in every gate state."""
    return Part(name, segment, ((0.0, float(count_ops(module, inputs, handles))),))


@torch.no_grad()
def mac_parts(sub: SubNet, arch: Arch, layout: list[BlockSlot], input_channels: int) -> list[Part]:
    """The parts of an extracted subnet (on the CPU) with their MACs per gate state, traced at batch 1."""
    sub = sub.eval()
    x = torch.zeros(1, input_channels, arch.resolution, arch.resolution)
    parts: list[Part] = []
    gates = torch.zeros(1, 0)
    if sub.gater is not None:
        parts.append(_fixed("gater", 0, sub.gater, (x,)))
        gates = torch.ones(1, sub.gater.fc2.out_features)  # every gate open: shapes only
    parts.append(_fixed("stem", 0, sub.stem, (x,)))
    h = sub.stem(x)
    slots = iter(layout)
    gate_index = 0
    exits = iter(arch.exits)
    for seg_index, seg in enumerate(sub.segments):
        for blk in seg.blocks:
            slot = next(slots)
            gate = None
            if isinstance(blk, RoutedBlock):
                # The router only steers which path runs; every path is a copy of one ungated block.
                parts.append(_fixed(f"router.{slot.name}", seg_index, _Method(blk, "choose"), (h,)))
            elif slot.gate != "none":
                gate, gate_index = gate_index, gate_index + 1
                decider = gate_kind(slot.gate).decider(blk)
                if decider is not None:
                    parts.append(_fixed(f"gate.{slot.name}", seg_index, decider, (h,)))
            body = blk.paths[0] if isinstance(blk, RoutedBlock) else blk
            parts.append(Part(f"block.{slot.name}", seg_index, _block_levels(body, h, slot.gate, slot.units), gate))
            h = blk(h, gates)
        if seg.final:
            parts.append(_fixed("classifier", seg_index, seg.head, (h,)))
        else:
            e = next(exits)
            parts.append(_fixed(f"exit.{e.stage}.{e.block}", seg_index, seg.head, (h,)))
            parts.append(_fixed(f"confidence.{e.stage}.{e.block}", seg_index, _Confidence(sub.criterion),
                                (seg.head(h),), CONFIDENCE_HANDLES))
    return parts


def count_macs(net: Supernet, arch: Arch, loader: Optional[Iterable] = None) -> CostReport:
    """MACs of ``arch`` per sample: maximum, minimum, and expected over ``loader``'s data.

    ``loader`` yields ``(x, y)`` batches, normalised as in training; each sample's exit and gate decisions
    come from the eval-mode ``net`` with ``arch`` active (its active arch is restored afterwards). Without a
    loader the expected cost is that of the full path (gates open, no early exit).

    Raises:
        InvalidArchError: ``arch`` does not fit the net's space.
        ConfigError: the loader yields no samples.
    """
    net.space.validate(arch)
    layout = arch_layout(net.space, arch)
    parts = mac_parts(net.extract(arch).cpu(), arch, layout, net.space.input_channels)
    paths = trace_paths(net, arch, loader) if loader is not None else SamplePaths.full_path(layout, len(arch.exits))
    realized = path_contributions(parts, paths)
    return CostReport(
        macs_max=int(full_cost(parts)),
        macs_min=int(min_cost(parts)),
        macs_expected=float(np.sum([v for v in realized.values()], axis=0).mean()),
        parts={p.name: int(p.full) for p in parts},
        parts_expected={name: float(v.mean()) for name, v in realized.items()},
        exit_rates=paths.exit_rates(),
        gate_rates=paths.gate_rates(),
        samples=len(paths) if loader is not None else 0,
    )
