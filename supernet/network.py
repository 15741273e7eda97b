"""`Supernet`: one set of shared weights holding every subnet of a space, exits and gates included.

The subnet contract has four verbs: ``space.sample`` picks an :class:`Arch`, :meth:`Supernet.set_active`
activates it, :meth:`Supernet.extract` copies it out as a standalone :class:`SubNet`, and ``Arch.to_dict``
is its configuration.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from search_spaces.arch import Arch
from search_spaces.space import SearchSpace
from supernet.blocks import BLOCK_TYPES, ElasticBlock
from supernet.dynamic.binarizers import binarize
from supernet.dynamic.dfs import DFS_RELATIVE_COST
from supernet.dynamic.gates import GlobalGater
from supernet.dynamic.heads import ExitHead, confidence
from supernet.subnet import Segment, SubNet, resize


@dataclass
class GateTrace:
    """One gate's values in the last forward pass: what the compute-budget loss and the statistics read."""

    stage: int
    block: int
    kind: str
    # N x filters (channel, emg) or N (skip; dfs: the chosen option's BitOPs cost relative to fp32);
    # relaxed in training, hard in eval
    values: torch.Tensor
    unit_macs: float  # MACs that one unit of ``values`` switches (a filter, a filter's large kernel, a branch)


@dataclass
class _Stats:
    exit_counts: list[float] = field(default_factory=list)
    gate_sums: dict[tuple[int, int], list[float]] = field(default_factory=dict)


class Supernet(nn.Module):
    """The once-for-all dynamic supernet of a :class:`SearchSpace`.

    ``forward`` in eval mode is dynamic inference (each sample's logits from the exit it leaves at, hard
    gates); in training mode it returns the final classifier's logits with relaxed gates. ``forward_all``
    returns every active exit's logits, then the final classifier's.
    """

    def __init__(self, space: SearchSpace):
        super().__init__()
        self.space = space
        self.stem = nn.Sequential(
            nn.Conv2d(space.input_channels, space.stem_channels, 3, space.stem_stride, 1, bias=False),
            nn.BatchNorm2d(space.stem_channels),
            nn.ReLU(inplace=True),
        )
        self.stages = nn.ModuleList()
        for s, st in enumerate(space.stages):
            blocks = [
                BLOCK_TYPES[st.block](st, space.block_in_channels(s, b), st.stride if b == 0 else 1, space.allowed_gates(s, b))
                for b in range(st.max_depth)
            ]
            self.stages.append(nn.ModuleList(blocks))
        self.exit_heads = nn.ModuleDict(
            {
                f"{s}_{b}": ExitHead(space.stages[s].out_channels, space.exits.hidden, space.num_classes)
                for s, b in space.exits.positions
            }
        )
        last = space.stages[-1]
        self.classifier = ExitHead(last.out_channels, space.head_channels, space.num_classes, last.act)
        self.gate_offsets = space.gate_offsets()
        self.gater: Optional[GlobalGater] = None
        if space.uses_gater:
            num_gates = max(end for _, end in self.gate_offsets.values())
            self.gater = GlobalGater(space.input_channels, space.gater.channels, space.gater.hidden, num_gates)
        self.active = space.max_arch()
        self.gate_trace: list[GateTrace] = []
        self._stats = _Stats()

    # ---- the subnet contract ---------------------------------------------------------------------------
    def set_active(self, arch: Arch) -> None:
        """Make ``arch`` the subnet that forward passes compute (validated against the space)."""
        self.active = self.space.validate(arch)

    def block(self, stage: int, block: int) -> ElasticBlock:
        return self.stages[stage][block]  # type: ignore[index]

    def _gate_rows(self, arch: Arch) -> tuple[torch.Tensor, dict[tuple[int, int], tuple[int, int]]]:
        """Gater rows used by ``arch``'s channel-gated blocks, and each block's column range in the output."""
        rows, columns, start = [], {}, 0
        for blk in arch.blocks():
            if blk.gate == "channel":
                n = self.block(blk.stage, blk.block).hidden(blk.width)
                first = self.gate_offsets[(blk.stage, blk.block)][0]
                rows.append(torch.arange(first, first + n))
                columns[(blk.stage, blk.block)] = (start, start + n)
                start += n
        return (torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)), columns

    def extract(self, arch: Optional[Arch] = None) -> SubNet:
        """A standalone :class:`SubNet` of ``arch`` (default: the active arch) with copied weights."""
        arch = self.space.validate(arch or self.active)
        rows, columns = self._gate_rows(arch)
        exits = {(e.stage, e.block): e.threshold for e in arch.exits}
        segments, blocks = [], []
        for blk in arch.blocks():
            start, end = columns.get((blk.stage, blk.block), (0, 0))
            blocks.append(self.block(blk.stage, blk.block).extract(blk.kernel, blk.width, blk.gate, start, end))
            if (blk.stage, blk.block) in exits:
                head = copy.deepcopy(self.exit_heads[f"{blk.stage}_{blk.block}"])
                segments.append(Segment(blocks, head, exits[(blk.stage, blk.block)], False))
                blocks = []
        segments.append(Segment(blocks, copy.deepcopy(self.classifier), 1.0, True))
        gater = self.gater.extract(rows) if self.gater is not None and len(rows) else None
        sub = SubNet(arch.resolution, copy.deepcopy(self.stem), gater, segments, self.space.exits.criterion,
                     self.space.num_classes)
        return sub.train(self.training)

    # ---- forward passes --------------------------------------------------------------------------------
    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every active exit in order, then of the final classifier (no sample stops)."""
        arch, hard = self.active, not self.training
        x = resize(x, arch.resolution)
        rows, columns = self._gate_rows(arch)
        gate_logits = self.gater(x, rows) if columns and self.gater is not None else None
        binarizer = self.space.gater.binarizer
        exits = {(e.stage, e.block) for e in arch.exits}
        h = self.stem(x)
        outs: list[torch.Tensor] = []
        self.gate_trace = []
        for blk in arch.blocks():
            module = self.block(blk.stage, blk.block)
            gate = skip = dfs = None
            if blk.gate == "channel":
                start, end = columns[(blk.stage, blk.block)]
                gate = binarize(gate_logits[:, start:end], binarizer, not hard)
            elif blk.gate == "skip":
                skip = binarize(module.skip_gate(h), binarizer, not hard)
            elif blk.gate == "dfs":
                dfs = module.dfs_gate.choose(h, not hard)
            size = h.shape[-1]
            h = module(h, blk.kernel, blk.width, gate, skip, emg=blk.gate == "emg", dfs=dfs)
            if blk.gate != "none":
                values = {"channel": gate, "skip": skip, "emg": module.emg_values, "dfs": dfs}[blk.gate]
                if dfs is not None:  # one number per sample: the chosen option's relative cost
                    values = dfs @ torch.tensor(DFS_RELATIVE_COST, dtype=dfs.dtype, device=dfs.device)
                unit = module.gate_unit_macs(size, blk.kernel, blk.width, blk.gate)
                self.gate_trace.append(GateTrace(blk.stage, blk.block, blk.gate, values, unit))
            if (blk.stage, blk.block) in exits:
                outs.append(self.exit_heads[f"{blk.stage}_{blk.block}"](h))
        outs.append(self.classifier(h))
        self._record_gates()
        return outs

    def forward_with_exits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, exit index per sample) with the active thresholds; computes every exit, then picks."""
        outs = self.forward_all(x)
        n = x.shape[0]
        exit_index = torch.full((n,), len(outs) - 1, dtype=torch.long, device=x.device)
        undecided = torch.ones(n, dtype=torch.bool, device=x.device)
        for i, (e, logits) in enumerate(zip(self.active.exits, outs)):
            leave = undecided & (confidence(logits, self.space.exits.criterion) >= e.threshold)
            exit_index[leave] = i
            undecided &= ~leave
        logits = torch.stack(outs, 0)[exit_index, torch.arange(n, device=x.device)]
        self._record_exits(exit_index, len(outs))
        return logits, exit_index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.forward_all(x)[-1]
        return self.forward_with_exits(x)[0]

    # ---- statistics -------------------------------------------------------------------------------------
    def _record_gates(self) -> None:
        for t in self.gate_trace:
            acc = self._stats.gate_sums.setdefault((t.stage, t.block), [0.0, 0.0])
            acc[0] += float(t.values.detach().float().mean()) * t.values.shape[0]
            acc[1] += t.values.shape[0]

    def _record_exits(self, exit_index: torch.Tensor, n_outputs: int) -> None:
        counts = torch.bincount(exit_index.cpu(), minlength=n_outputs).tolist()
        old = self._stats.exit_counts
        self._stats.exit_counts = [a + b for a, b in zip(old, counts)] if len(old) == n_outputs else counts

    def reset_stats(self) -> None:
        self._stats = _Stats()

    def exit_stats(self) -> list[float]:
        """Share of samples that left at each exit (then the final classifier) since :meth:`reset_stats`."""
        total = sum(self._stats.exit_counts)
        return [c / total for c in self._stats.exit_counts] if total else []

    def gate_stats(self) -> dict[str, float]:
        """Mean firing rate of each gated block ("stage.block": share of filters on / branches run)."""
        return {f"{s}.{b}": acc[0] / acc[1] for (s, b), acc in sorted(self._stats.gate_sums.items()) if acc[1]}

    # ---- width re-ordering ------------------------------------------------------------------------------
    @torch.no_grad()
    def sort_channels(self) -> None:
        """Re-order every block's hidden channels by importance (function unchanged), gates alongside."""
        for s, stage in enumerate(self.stages):
            for b, module in enumerate(stage):
                order = module.importance_order()
                module.permute_hidden(order)
                if self.gater is not None:
                    self.gater.permute_rows(self.gate_offsets[(s, b)][0], order)
