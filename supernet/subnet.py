"""`SubNet`: a standalone dynamic subnet extracted from the supernet (plain modules, no supernet inside).

Inference really skips: samples that pass an exit's threshold are emitted and only the rest continue
(batch compaction — at batch 1 the rest of the network does not run), and gated blocks skip gated-off work
(:mod:`supernet.static_blocks`). Batch order is preserved. TorchScript-friendly, so control flow survives
``torch.jit.script``.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from supernet.dynamic.gates import GlobalGater
from supernet.dynamic.heads import ExitHead, confidence, one_sample_leaves
from supernet.static_blocks import StaticBlock


def resize(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """Bilinear resize to the subnet's input resolution (no-op when it already matches)."""
    if x.shape[-1] == resolution and x.shape[-2] == resolution:
        return x
    return F.interpolate(x, size=[resolution, resolution], mode="bilinear", align_corners=False)


class Segment(nn.Module):
    """Blocks up to an exit, and that exit's head (the final classifier for the last segment)."""

    def __init__(self, blocks: List[StaticBlock], head: ExitHead, threshold: float, final: bool):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.set_threshold(threshold)
        self.final = final

    @torch.jit.unused
    def set_threshold(self, threshold: float) -> None:
        """Set the exit's threshold (and its float32 rounding, ``threshold32``: a host-side comparison of a
        float32 confidence with it decides exactly as the tensor comparison ``confidence(...) >= threshold``)."""
        self.threshold = threshold
        self.threshold32 = float(torch.tensor(threshold, dtype=torch.float32))

    def body(self, h: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            h = blk(h, gates)
        return h

    def one_sample_body(self, h: torch.Tensor, gates: torch.Tensor, keeps: List[torch.Tensor]) -> torch.Tensor:
        """:meth:`body` of one sample; per-filter channel-gated blocks run the open filters ``keeps`` found
        for them (:meth:`SubNet.open_filters`)."""
        for blk in self.blocks:
            slotted = False
            if hasattr(blk, "keep_slot"):  # decided when scripting (nested: ``and`` would compile both operands)
                if blk.keep_slot >= 0:
                    h = blk.run_kept(h, keeps[blk.keep_slot])
                    slotted = True
            if not slotted:  # routed and width-gated blocks, and StaticBlocks without a per-filter channel gate
                h = blk(h, gates)
        return h


class SubNet(nn.Module):
    """A standalone dynamic subnet. ``forward`` gives each sample's logits from the exit it leaves at."""

    def __init__(self, resolution: int, stem: nn.Module, gater: Optional[GlobalGater], segments: List[Segment],
                 criterion: str, num_classes: int):
        super().__init__()
        self.resolution = resolution
        self.stem = stem
        self.gater = gater
        self.segments = nn.ModuleList(segments)
        self.criterion = criterion
        self.num_classes = num_classes
        self._number_keep_slots()

    def _number_keep_slots(self) -> None:
        """Give each per-filter channel-gated block (not grouped, no pre-gathered subsets, not inside a routed
        block) a ``keep_slot`` and the gate columns it reads: at batch 1 :meth:`open_filters` finds the open
        filters of all of them with one ``masked_select`` and one host read instead of ~6 op calls per block.
        Non-persistent buffers: derived from the blocks, not weights."""
        columns, ends = [], []
        for seg in self.segments:
            for blk in seg.blocks:
                if isinstance(blk, StaticBlock):
                    per_filter = blk.filter_group.numel() == 0 and blk.subset_powers.numel() == 0
                    blk.keep_slot = len(ends) if blk.gate_kind == "channel" and per_filter else -1
                    if blk.keep_slot >= 0:
                        columns.append(torch.arange(blk.gate_start, blk.gate_end))
                        ends.append(sum(len(c) for c in columns) - 1)
        columns_t = torch.cat(columns) if columns else torch.zeros(0, dtype=torch.long)
        gate_count = 0 if self.gater is None else self.gater.fc2.out_features
        # When the slotted blocks read every gate column in order (the usual per-filter case), no gather is needed.
        self.keep_every_column = torch.equal(columns_t, torch.arange(gate_count))
        self.register_buffer("keep_columns", columns_t, persistent=False)
        self.register_buffer("keep_local", torch.cat([c - c[0] for c in columns]) if columns else columns_t,
                             persistent=False)
        self.register_buffer("keep_ends", torch.tensor(ends, dtype=torch.long), persistent=False)

    def open_filters(self, gates: torch.Tensor) -> List[torch.Tensor]:
        """Batch 1: the open filters of each slotted block (``keep_slot`` order), from the one sample's gate
        logits: one compare, one ``masked_select``, one host read of the per-block counts."""
        if self.keep_ends.numel() == 0:
            return []
        on = gates[0] > 0
        if not self.keep_every_column:
            on = on.index_select(0, self.keep_columns)
        ends: List[int] = on.cumsum(0).index_select(0, self.keep_ends).tolist()
        return self.keep_local.masked_select(on).tensor_split(ends[:-1])

    def _prepare(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = resize(x, self.resolution)
        gater = self.gater
        if gater is not None:
            return x, gater(x)
        return x, torch.zeros(x.shape[0], 0, dtype=x.dtype, device=x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:  # batch 1: no exit-index tensor to build
            x, gates = self._prepare(x)
            return self._one_sample(x, gates)[0]
        return self.forward_with_exits(x)[0]

    @torch.jit.export
    def forward_with_exits(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(logits, index of the exit each sample left at; the final classifier is the last index)."""
        x, gates = self._prepare(x)
        if x.shape[0] == 1:
            logits, left = self._one_sample(x, gates)
            return logits, torch.full([1], left, dtype=torch.long, device=x.device)
        n = x.shape[0]
        out = torch.zeros(n, self.num_classes, dtype=x.dtype, device=x.device)
        exit_index = torch.full([n], -1, dtype=torch.long, device=x.device)
        idx = torch.arange(n, device=x.device)
        h = self.stem(x)
        alive = True  # TorchScript unrolls loops over modules and allows no `break` in them
        for i, seg in enumerate(self.segments):
            if alive:
                h = seg.body(h, gates)
                logits = seg.head(h)
                if seg.final:
                    out.index_copy_(0, idx, logits)
                    exit_index.index_fill_(0, idx, i)
                else:
                    done = confidence(logits, self.criterion) >= seg.threshold
                    if bool(done.any()):
                        leave = done.nonzero().squeeze(1)
                        out.index_copy_(0, idx.index_select(0, leave), logits.index_select(0, leave))
                        exit_index.index_fill_(0, idx.index_select(0, leave), i)
                        stay = (~done).nonzero().squeeze(1)
                        alive = stay.numel() > 0
                        idx, h, gates = idx.index_select(0, stay), h.index_select(0, stay), gates.index_select(0, stay)
        return out, exit_index

    def _one_sample(self, x: torch.Tensor, gates: torch.Tensor) -> Tuple[torch.Tensor, int]:
        """Batch 1: (logits, exit index) of the sample, run until the first exit it passes, with no compaction
        bookkeeping and one host read per exit passed (:func:`~supernet.dynamic.heads.one_sample_leaves`)."""
        h = self.stem(x)
        keeps = self.open_filters(gates)
        out: Optional[torch.Tensor] = None
        left = -1
        for i, seg in enumerate(self.segments):
            if left < 0:
                h = seg.one_sample_body(h, gates, keeps)
                logits = seg.head(h)
                if seg.final or one_sample_leaves(logits, self.criterion, seg.threshold32):
                    out, left = logits, i
        assert out is not None  # the final segment always emits
        return out, left

    @torch.jit.export
    def forward_all(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Logits of every exit in order, then the final classifier; no sample stops early."""
        x, gates = self._prepare(x)
        h = self.stem(x)
        outs: List[torch.Tensor] = []
        for seg in self.segments:
            h = seg.body(h, gates)
            outs.append(seg.head(h))
        return outs

    @torch.jit.export
    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        """N x D: the final classifier's input features, every sample along the full path."""
        x, gates = self._prepare(x)
        h = self.stem(x)
        out = h.new_zeros(0)
        for seg in self.segments:
            h = seg.body(h, gates)
            if seg.final:
                out = seg.head.pooled(h)
        return out

    @torch.jit.export
    def gate_decisions(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample binary decisions of every gate along the full path (N x total gates), in block order."""
        x, gates = self._prepare(x)
        h = self.stem(x)
        parts: List[torch.Tensor] = []
        for seg in self.segments:
            for blk in seg.blocks:
                parts.append(blk.decisions(h, gates))
                h = blk(h, gates)
        return torch.cat(parts, dim=1)
