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
import torch.nn.functional as F
from torch import nn

from search_spaces.arch import Arch, BlockChoice
from search_spaces.space import SearchSpace
from supernet.blocks import BLOCK_TYPES, ElasticBlock
from supernet.dynamic.binarizers import binarize
from supernet.dynamic.cigt import RoutedBlock, Router
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
    # N x filters (channel, emg, width) or N (skip; dfs: the chosen option's BitOPs cost relative to fp32);
    # relaxed in training, hard in eval
    values: torch.Tensor
    unit_macs: float  # MACs that one unit of ``values`` switches (a filter, a filter's large kernel, a branch)


@dataclass
class RouteTrace:
    """One router's path probabilities in the last forward pass (N x paths; one-hot in eval): what the
    information-gain loss and the path statistics read."""

    stage: int
    block: int
    probs: torch.Tensor


@dataclass
class _Stats:
    exit_counts: list[float] = field(default_factory=list)
    gate_sums: dict[tuple[int, int], list[float]] = field(default_factory=dict)
    route_sums: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)


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
        # CIGT: blocks of stages that may be routed get extra path copies (copy 0 is the block itself) and a
        # router each; a subnet with p paths uses the first p copies.
        self.path_copies = nn.ModuleDict()
        self.routers = nn.ModuleDict()
        self.router_temperature = 1.0  # annealed by training
        for s, st in enumerate(space.stages):
            blocks = [self._new_block(s, b) for b in range(st.max_depth)]
            self.stages.append(nn.ModuleList(blocks))
            if max(st.paths) > 1:
                for b in range(st.max_depth):
                    key = f"{s}_{b}"
                    self.path_copies[key] = nn.ModuleList(self._new_block(s, b) for _ in range(max(st.paths) - 1))
                    self.routers[key] = Router(space.block_in_channels(s, b), max(st.paths))
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
        self.route_trace: list[RouteTrace] = []
        self._stats = _Stats()

    def _new_block(self, s: int, b: int) -> ElasticBlock:
        st = self.space.stages[s]
        in_ch = self.space.block_in_channels(s, b)
        return BLOCK_TYPES[st.block](st, in_ch, st.stride if b == 0 else 1, self.space.allowed_gates(s, b))

    # ---- the subnet contract ---------------------------------------------------------------------------
    def set_active(self, arch: Arch) -> None:
        """Make ``arch`` the subnet that forward passes compute (validated against the space)."""
        self.active = self.space.validate(arch)

    def block(self, stage: int, block: int, path: int = 0) -> ElasticBlock:
        """The elastic block at a position (``path`` > 0: a CIGT path copy of it)."""
        if path == 0:
            return self.stages[stage][block]  # type: ignore[index]
        return self.path_copies[f"{stage}_{block}"][path - 1]  # type: ignore[index]

    def _gate_rows(self, arch: Arch) -> tuple[torch.Tensor, dict[tuple[int, int], tuple[int, int]],
                                              Optional[torch.Tensor], dict[tuple[int, int], tuple[int, int]]]:
        """Gater rows used by ``arch``'s channel-gated blocks, each block's column range in the per-filter logits,
        and with grouped gates (``gater.group`` > 1) each row's group and each block's range of group columns
        (the extracted gater's outputs); without, None and the filter ranges."""
        group = self.space.gater.group
        rows, groups, columns, group_columns, start, first_group = [], [], {}, {}, 0, 0
        for blk in arch.blocks():
            if blk.gate == "channel":
                n = self.block(blk.stage, blk.block).hidden(blk.width)
                first = self.gate_offsets[(blk.stage, blk.block)][0]
                rows.append(torch.arange(first, first + n))
                groups.append(first_group + torch.arange(n) // group)
                columns[(blk.stage, blk.block)] = (start, start + n)
                group_columns[(blk.stage, blk.block)] = (first_group, first_group + -(-n // group))
                start, first_group = start + n, first_group + -(-n // group)
        all_rows = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
        if group == 1 or not rows:
            return all_rows, columns, None, columns
        return all_rows, columns, torch.cat(groups), group_columns

    def extract(self, arch: Optional[Arch] = None) -> SubNet:
        """A standalone :class:`SubNet` of ``arch`` (default: the active arch) with copied weights."""
        arch = self.space.validate(arch or self.active)
        rows, _, groups, columns = self._gate_rows(arch)
        exits = {(e.stage, e.block): e.threshold for e in arch.exits}
        segments, blocks = [], []
        for blk in arch.blocks():
            start, end = columns.get((blk.stage, blk.block), (0, 0))
            paths = arch.paths[blk.stage]
            copies = [self.block(blk.stage, blk.block, p).extract(blk.kernel, blk.width, blk.gate, start, end,
                                                                   self.space.gater.group)
                      for p in range(paths)]
            if paths > 1:
                router = self.routers[f"{blk.stage}_{blk.block}"].sliced(paths)
                blocks.append(RoutedBlock(router, copies, paths))
            else:
                blocks.append(copies[0])
            if (blk.stage, blk.block) in exits:
                head = copy.deepcopy(self.exit_heads[f"{blk.stage}_{blk.block}"])
                segments.append(Segment(blocks, head, exits[(blk.stage, blk.block)], False))
                blocks = []
        segments.append(Segment(blocks, copy.deepcopy(self.classifier), 1.0, True))
        gater = self.gater.extract(rows, groups) if self.gater is not None and len(rows) else None
        sub = SubNet(arch.resolution, copy.deepcopy(self.stem), gater, segments, self.space.exits.criterion,
                     self.space.num_classes)
        # Some extracted parts (sliced gaters, width-gate masks) are built on the CPU: follow the supernet.
        return sub.to(self.device).train(self.training)

    @property
    def device(self) -> torch.device:
        """The device the supernet's weights are on."""
        return next(self.stem.parameters()).device

    # ---- forward passes --------------------------------------------------------------------------------
    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every active exit in order, then of the final classifier (no sample stops)."""
        arch, hard = self.active, not self.training
        x = resize(x, arch.resolution)
        rows, columns, groups, _ = self._gate_rows(arch)
        gate_logits = self.gater(x, rows, groups) if columns and self.gater is not None else None
        binarizer = self.space.gater.binarizer
        exits = {(e.stage, e.block) for e in arch.exits}
        h = self.stem(x)
        outs: list[torch.Tensor] = []
        self.gate_trace, self.route_trace = [], []
        for blk in arch.blocks():
            if arch.paths[blk.stage] > 1:
                h = self._routed(h, blk, arch.paths[blk.stage], hard)
                if (blk.stage, blk.block) in exits:
                    outs.append(self.exit_heads[f"{blk.stage}_{blk.block}"](h))
                continue
            module = self.block(blk.stage, blk.block)
            gate = skip = dfs = None
            if blk.gate == "channel":
                start, end = columns[(blk.stage, blk.block)]
                gate = binarize(gate_logits[:, start:end], binarizer, not hard)
            elif blk.gate == "skip":
                skip = binarize(module.skip_gate(h), binarizer, not hard)
            elif blk.gate == "dfs":
                dfs = module.dfs_gate.choose(h, not hard)
            elif blk.gate == "width":  # a mask keeping each sample's first filters, applied as a channel gate's
                gate = module.width_masks(h, blk.width, not hard)
            size = h.shape[-1]
            h = module(h, blk.kernel, blk.width, gate, skip, emg=blk.gate == "emg", dfs=dfs)
            if blk.gate != "none":
                values = {"channel": gate, "width": gate, "skip": skip, "emg": module.emg_values, "dfs": dfs}[blk.gate]
                module.emg_values = None  # the trace keeps them; a graph tensor left on the module blocks deepcopy
                if dfs is not None:  # one number per sample: the chosen option's relative cost
                    values = dfs @ torch.tensor(DFS_RELATIVE_COST, dtype=dfs.dtype, device=dfs.device)
                unit = module.gate_unit_macs(size, blk.kernel, blk.width, blk.gate)
                self.gate_trace.append(GateTrace(blk.stage, blk.block, blk.gate, values, unit))
            if (blk.stage, blk.block) in exits:
                outs.append(self.exit_heads[f"{blk.stage}_{blk.block}"](h))
        outs.append(self.classifier(h))
        self._record_traces()
        return outs

    def _routed(self, h: torch.Tensor, blk: BlockChoice, paths: int, hard: bool) -> torch.Tensor:
        """A CIGT block: every path computed, mixed by the router's tempered softmax in training and
        selected by its argmax in eval (the exported model runs only the selected path)."""
        logits = self.routers[f"{blk.stage}_{blk.block}"](h, paths)
        outs = torch.stack([self.block(blk.stage, blk.block, p)(h, blk.kernel, blk.width) for p in range(paths)])
        if hard:
            choice = logits.argmax(dim=1)
            probs = F.one_hot(choice, paths).to(h.dtype)
            out = outs[choice, torch.arange(len(h), device=h.device)]
        else:
            probs = torch.softmax(logits / self.router_temperature, dim=1)
            out = (probs.t()[:, :, None, None, None] * outs).sum(dim=0)
        self.route_trace.append(RouteTrace(blk.stage, blk.block, probs))
        return out

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
    def _record_traces(self) -> None:
        for t in self.gate_trace:
            acc = self._stats.gate_sums.setdefault((t.stage, t.block), [0.0, 0.0])
            acc[0] += float(t.values.detach().float().mean()) * t.values.shape[0]
            acc[1] += t.values.shape[0]
        for r in self.route_trace:
            counts = r.probs.detach().sum(dim=0).cpu()
            key = (r.stage, r.block)
            old = self._stats.route_sums.get(key)
            self._stats.route_sums[key] = counts if old is None or len(old) != len(counts) else old + counts

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

    def route_stats(self) -> dict[str, list[float]]:
        """Share of samples sent to each path by each router ("stage.block": [share of path 0, ...])."""
        return {f"{s}.{b}": (c / c.sum()).tolist() for (s, b), c in sorted(self._stats.route_sums.items())}

    # ---- width re-ordering ------------------------------------------------------------------------------
    @torch.no_grad()
    def sort_channels(self) -> None:
        """Re-order every block's hidden channels by importance (function unchanged), gates alongside."""
        for s, stage in enumerate(self.stages):
            for b, module in enumerate(stage):
                key = f"{s}_{b}"
                for path in self.path_copies[key] if key in self.path_copies else []:
                    path.permute_hidden(path.importance_order())  # no gater rows: routed stages are ungated
                order = module.importance_order()
                module.permute_hidden(order)
                if self.gater is not None:
                    self.gater.permute_rows(self.gate_offsets[(s, b)][0], order)

    @torch.no_grad()
    def seed_path_copies(self) -> None:
        """Copy every routed block's weights into its extra path copies.

        Called when routing starts to train: the copies begin as the trained shared block (so a routed subnet
        starts as accurate as its single-path backbone) and the router and the information-gain loss then
        specialise them, instead of training paths from scratch in a short dynamic phase.
        """
        for key, copies in self.path_copies.items():
            s, b = (int(i) for i in key.split("_"))
            for copy_ in copies:
                copy_.load_state_dict(self.stages[s][b].state_dict())
