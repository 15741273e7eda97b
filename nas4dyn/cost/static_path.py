"""Static twins of the paths a dynamic subnet runs: the reference of *path-equivalent overhead*.

A sample's path through an extracted :class:`SubNet` is the exit it leaves at and each block's decision on the
way (filters on, kernel sizes, branch skipped or run in int8 / fp32, width, CIGT path). :func:`path_model`
builds the static network that runs exactly that path and nothing else: no gater, no gate heads, no exit heads
it passes, no gathers — every conv a plain, pre-built module whose BatchNorm folds when frozen (an EMG block's
two kernel sizes are two convs with their BatchNorm folded in, concatenated). Timed against the dynamic model on
the same samples, it measures what the dynamic model adds on top of the work it does:

    path-equivalent overhead = dynamic model's latency ÷ latency of the static models of each sample's path.

The path models compute the dynamic model's logits (tests check it), so the two do the same arithmetic.
"""
from __future__ import annotations

import copy
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from supernet.dynamic.cigt import RoutedBlock
from supernet.dynamic.width import WidthGatedBlock
from supernet.ops.elastic import static_conv
from supernet.static_blocks import StaticBasicBlock, StaticBlock, StaticMBConvBlock, fold_bn
from supernet.subnet import SubNet, resize

RUN, SKIP, INT8 = 2, 0, 1  # how a path runs a block's branch (the DFS option order)


def _bn_rows(bn: nn.BatchNorm2d, rows: torch.Tensor) -> nn.BatchNorm2d:
    out = nn.BatchNorm2d(len(rows), eps=bn.eps).eval()
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(out, name).copy_(getattr(bn, name)[rows])
    return out


def _kept(mask: torch.Tensor) -> torch.Tensor:
    """The filters a mask keeps; filter 0 when it keeps none (the path then masks that filter to zero)."""
    keep = mask.nonzero().squeeze(1)
    return keep if keep.numel() else torch.zeros(1, dtype=torch.long)


def narrowed(blk: StaticBlock, mask: torch.Tensor) -> StaticBlock:
    """An ungated copy of a channel-gated block that runs only the filters ``mask`` keeps."""
    keep = _kept(mask)
    with torch.no_grad():
        if isinstance(blk, StaticBasicBlock):
            w2 = blk.conv2.weight[:, keep] * mask[keep].to(blk.conv2.weight.dtype)[None, :, None, None]
            return StaticBasicBlock(static_conv(blk.conv1.weight[keep], blk.stride, False), _bn_rows(blk.bn1, keep),
                                    static_conv(w2, 1, False), copy.deepcopy(blk.bn2), copy.deepcopy(blk.shortcut))
        assert isinstance(blk, StaticMBConvBlock)
        w3 = blk.project.weight[:, keep] * mask[keep].to(blk.project.weight.dtype)[None, :, None, None]
        return StaticMBConvBlock(static_conv(blk.expand.weight[keep], 1, False), _bn_rows(blk.bn1, keep),
                                 static_conv(blk.dw.weight[keep], blk.stride, True), _bn_rows(blk.bn2, keep),
                                 static_conv(w3, 1, False), copy.deepcopy(blk.bn3), copy.deepcopy(blk.act),
                                 blk.residual)


class BranchPath(nn.Module):
    """A block as one path runs it: its branch in full precision (``mode`` RUN), in int8 (INT8), or skipped."""

    def __init__(self, block: StaticBlock, mode: int = RUN):
        super().__init__()
        self.block, self.mode = block, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == 2:  # RUN
            return self.block.run(x, None)
        if self.mode == 1:  # INT8
            return self.block.run_int8(x)
        return self.block.post(x)


class EMGPath(nn.Module):
    """An EMG block for one pattern of kernel sizes: the large kernel's conv for the filters that take it, the
    centre's conv for the others (BatchNorm folded into both), concatenated; conv2 reads them in that order."""

    def __init__(self, blk: StaticBasicBlock, large: torch.Tensor):
        super().__init__()
        on, off = large.nonzero().squeeze(1), (~large).nonzero().squeeze(1)
        with torch.no_grad():
            w1, b1 = fold_bn(blk.conv1.weight, blk.bn1)
            self.register_buffer("w_large", w1[on].contiguous())
            self.register_buffer("b_large", b1[on].contiguous())
            self.register_buffer("w_small", w1[off][..., 1:-1, 1:-1].contiguous())
            self.register_buffer("b_small", b1[off].contiguous())
            self.conv2 = static_conv(blk.conv2.weight[:, torch.cat([on, off])], 1, False)
        self.has_large, self.has_small = on.numel() > 0, off.numel() > 0
        self.bn2, self.shortcut = copy.deepcopy(blk.bn2), copy.deepcopy(blk.shortcut)
        self.stride, self.padding = blk.stride, blk.padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts: List[torch.Tensor] = []
        if self.has_large:
            parts.append(F.conv2d(x, self.w_large, self.b_large, self.stride, self.padding))
        if self.has_small:
            parts.append(F.conv2d(x, self.w_small, self.b_small, self.stride, self.padding - 1))
        h = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        return F.relu(self.shortcut(x) + self.bn2(self.conv2(F.relu(h))))


def block_path(blk: nn.Module, decision: torch.Tensor) -> nn.Module:
    """The static module that runs ``blk`` as a sample with this ``decision`` row (see :func:`block_decisions`)
    does."""
    if isinstance(blk, (RoutedBlock, WidthGatedBlock)):  # one-hot route / a width's filter mask
        index = int(decision.long().argmax()) if isinstance(blk, RoutedBlock) else \
            [int(m.sum()) for m in blk.masks].index(int(decision.sum()))
        return BranchPath(copy.deepcopy(blk.paths[index]))
    kind = blk.gate_kind
    if kind == "channel":
        return BranchPath(narrowed(blk, decision.bool()))
    if kind == "emg":
        return EMGPath(blk, decision.bool())
    if kind == "skip":
        return BranchPath(_ungated(blk), RUN if bool(decision[0]) else SKIP)
    if kind == "dfs":
        return BranchPath(_ungated(blk), int(decision.long().argmax()))
    return BranchPath(_ungated(blk))


def _ungated(blk: StaticBlock) -> StaticBlock:
    plain = copy.deepcopy(blk)
    plain.skip_gate = plain.dfs_gate = None
    plain.gate_kind = "none"
    return plain


class PathModel(nn.Module):
    """One path of an exported dynamic model as a static network: normalise, resize, stem, the path's blocks,
    the head of the exit it leaves at."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, resolution: int, stem: nn.Module,
                 blocks: Sequence[nn.Module], head: nn.Module):
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())
        self.resolution = resolution
        self.stem, self.blocks, self.head = stem, nn.Sequential(*blocks), head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(resize((x - self.mean) / self.std, self.resolution))))


@torch.no_grad()
def block_decisions(sub: SubNet, x: torch.Tensor) -> List[torch.Tensor]:
    """Per block in network order, every sample's decisions along the full path (N x 0 for ungated blocks;
    the columns of ``SubNet.gate_decisions``). ``x`` is normalised."""
    x, gates = sub._prepare(x)
    h = sub.stem(x)
    out = []
    for seg in sub.segments:
        for blk in seg.blocks:
            out.append(blk.decisions(h, gates))
            h = blk(h, gates)
    return out


@torch.no_grad()
def path_model(sub: SubNet, mean: torch.Tensor, std: torch.Tensor, exit_index: int,
               decisions: Sequence[torch.Tensor]) -> PathModel:
    """The static network of one path of ``sub`` (eval mode): the sample leaves at ``exit_index`` and block
    ``i`` decides ``decisions[i]`` (one sample's row of :func:`block_decisions`)."""
    blocks, rows = [], iter(decisions)
    head = None
    for i, seg in enumerate(sub.segments):
        if i <= exit_index:
            blocks += [block_path(blk, next(rows)) for blk in seg.blocks]
            head = seg.head
    assert head is not None
    return PathModel(mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1), sub.resolution, copy.deepcopy(sub.stem),
                     blocks, copy.deepcopy(head)).eval()
