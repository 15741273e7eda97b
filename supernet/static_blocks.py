"""Standalone blocks of an extracted subnet: plain modules, copied weights, and real skipping.

Gated-off work is not computed: a channel gate narrows the convs to the filters that are on for at least
one sample of the batch (at batch 1, exactly that sample's filters), and a skip gate runs the residual
branch only on the samples whose gate is on. The code is TorchScript-friendly.

Every BatchNorm after a conv whose filters change per sample (channel and EMG gates) is folded into that conv
here, per output filter, at extraction: a gathered subset of folded filters is still exact, and freezing (which
folds the other BatchNorms) cannot fold a conv whose weight is gathered per image.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from supernet.dynamic.dfs import DFSGate
from supernet.dynamic.gates import SkipGate


def _active_filters(mask: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Filters on for at least one sample, and whether some of them are off for some sample.

    With every filter off the branch still produces BN's constant output, so one filter is kept and
    masked to zero: the result equals computing all filters and multiplying by the gates.
    """
    keep = mask.any(0).nonzero().squeeze(1)
    if keep.numel() == 0:
        return torch.zeros(1, dtype=torch.long, device=mask.device), True
    return keep, not bool(mask.index_select(1, keep).all())


def fold_bn(weight: torch.Tensor, bn: nn.BatchNorm2d, bias: Optional[torch.Tensor] = None
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of ``bn(conv(x, weight, bias))`` as one conv, eval-mode ``bn`` folded in per output filter
    (computed in float64, stored contiguous in float32)."""
    assert bn.running_mean is not None and bn.running_var is not None
    w = weight.detach().double()
    b = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device) if bias is None else bias.detach().double()
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    folded_bias = (b - bn.running_mean.detach().double()) * scale + bn.bias.detach().double()
    return (w * scale[:, None, None, None]).float().contiguous(), folded_bias.float()


def bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    """Per-channel factor of an eval-mode BatchNorm (weight / sqrt(running_var + eps))."""
    assert bn.running_var is not None
    return (bn.weight.detach().double() / torch.sqrt(bn.running_var.detach().double() + bn.eps)).float()


# Channel-gated blocks with at most this many gate columns keep their convs pre-gathered for every subset of
# open columns (2^4 = 16 copies at half the weights on average): at batch 1 they then index a list instead of
# finding the open filters and gathering three weight tensors per image.
SUBSET_MAX_COLUMNS = 4


class StaticBlock(nn.Module):
    """Shared gating logic of the extracted blocks; subclasses define ``branch`` and the output activation."""

    # The type of the (possibly empty) pre-gathered conv lists, for TorchScript; spelled out as objects, not as
    # annotations, which this module's ``from __future__ import annotations`` turns into strings TorchScript
    # does not resolve.
    __annotations__ = {f"subset_{name}": List[torch.Tensor] for name in ("w1", "b1", "w2", "b2", "w3")}

    def __init__(self, gate_kind: str, gate_start: int, gate_end: int, skip_gate: Optional[SkipGate],
                 dfs_gate: Optional[DFSGate] = None, filters: int = 0, gate_group: int = 1):
        super().__init__()
        self.gate_kind = gate_kind
        self.gate_start = gate_start
        self.gate_end = gate_end
        # Channel gates in groups: the gate column of each of the ``filters`` gated filters (empty: one per filter).
        grouped = gate_kind == "channel" and gate_group > 1
        self.register_buffer("filter_group", torch.arange(filters) // gate_group if grouped
                             else torch.zeros(0, dtype=torch.long))
        self.skip_gate = skip_gate
        self.dfs_gate = dfs_gate
        # Set by ``SubNet`` on per-filter channel-gated blocks: where its batch-1 path keeps their open filters.
        self.keep_slot = -1
        self.stride, self.padding = 1, 0  # of the first k x k conv; set by subclasses
        # EMG blocks replace these with the per-filter thresholds and signs (see StaticBasicBlock) and the centre
        # of their first conv's BatchNorm-folded kernel.
        self.register_buffer("emg_threshold", torch.zeros(0))
        self.register_buffer("emg_sign", torch.zeros(0))
        self.register_buffer("small_weight", torch.zeros(0))
        # Channel- and EMG-gated blocks: their gathered convs with the BatchNorm after each folded in, per filter
        # (basic: conv1, conv2; MBConv: expand, depthwise, project). Empty otherwise.
        self.register_buffer("w1", torch.zeros(0))
        self.register_buffer("b1", torch.zeros(0))
        self.register_buffer("w2", torch.zeros(0))
        self.register_buffer("b2", torch.zeros(0))
        self.register_buffer("w3", torch.zeros(0))
        self.register_buffer("b3", torch.zeros(0))
        self.register_buffer("subset_powers", torch.zeros(0))  # 2^column: a sample's open columns -> subset code
        # Pre-gathered convs per subset code (see ``SUBSET_MAX_COLUMNS``; basic: w1, b1, w2; MBConv also the
        # depthwise bias b2 and w3); empty when the block does not keep them.
        self.subset_w1, self.subset_b1, self.subset_w2, self.subset_b2, self.subset_w3 = [], [], [], [], []

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # .to() / .cuda() / .double() reach buffers through _apply; the pre-gathered lists are plain attributes.
        super()._apply(fn, recurse)
        for name in ("subset_w1", "subset_b1", "subset_w2", "subset_b2", "subset_w3"):
            setattr(self, name, [fn(t) for t in getattr(self, name)])
        return self

    def subset_filters(self) -> List[torch.Tensor]:
        """For a channel gate of at most ``SUBSET_MAX_COLUMNS`` columns, the filters each subset code keeps (code
        bit i: column i open; code 0 keeps filter 0, whose output the caller zeroes), and sets ``subset_powers``;
        else an empty list."""
        columns = self.gate_end - self.gate_start
        if self.gate_kind != "channel" or columns > SUBSET_MAX_COLUMNS:
            return []
        filters = self.w1.shape[0]
        column = self.filter_group if self.filter_group.numel() > 0 else torch.arange(filters)
        self.subset_powers = 2.0 ** torch.arange(columns, dtype=torch.float)
        kept = [(torch.bitwise_right_shift(code, column) & 1).nonzero().squeeze(1) for code in range(2 ** columns)]
        kept[0] = torch.zeros(1, dtype=torch.long)
        return kept

    def subset_code(self, gate_logits: torch.Tensor) -> int:
        """The subset code of the one sample's open gate columns."""
        return int(torch.dot((gate_logits[0, self.gate_start : self.gate_end] > 0).float(), self.subset_powers))

    def run_subset(self, x: torch.Tensor, code: int) -> torch.Tensor:
        raise NotImplementedError

    def emg_gates(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(BatchNorm-folded small-kernel response of every filter, per-sample EMG gates N x filters).

        The supernet compares the unfolded response's mean m with a threshold t; folded, the mean is s m + b
        (s the BatchNorm's scale), so ``emg_threshold`` holds s t + b and ``emg_sign`` the sign of s: the gate
        is on where (mean - emg_threshold) x emg_sign > 0.
        """
        small = F.conv2d(x, self.small_weight, self.b1, self.stride, self.padding - 1)
        return small, (small.mean(dim=(2, 3)) - self.emg_threshold) * self.emg_sign > 0

    def run(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def run_filters(self, x: torch.Tensor, keep: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
        """The channel-gated branch narrowed to the filters ``keep`` (their BatchNorm-folded convs gathered),
        hidden activations multiplied by ``scale`` (N x len(keep)) when some kept filter is off for some sample."""
        raise NotImplementedError

    def run_kept(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """A per-filter channel-gated block on one sample whose open filters are ``keep`` (ascending; at batch 1
        ``SubNet`` finds them for all such blocks at once)."""
        if keep.numel() == 0:  # every filter closed: as ``_active_filters``, one filter computed and zeroed
            return self.run_filters(x, torch.zeros(1, dtype=torch.long, device=x.device), x.new_zeros(1, 1))
        return self.run_filters(x, keep, None)

    def post(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def channel_mask(self, gate_logits: torch.Tensor) -> torch.Tensor:
        """N x filters: which filters a channel gate keeps for each sample (grouped gates: their group's)."""
        mask = gate_logits[:, self.gate_start : self.gate_end] > 0
        return mask.index_select(1, self.filter_group) if self.filter_group.numel() > 0 else mask

    def gate_columns(self, filters: torch.Tensor) -> torch.Tensor:
        """The gate-column decisions (last dim) that open the filters ``filters`` (bool, last dim one per filter)
        open: with grouped gates, a group is on when any of its filters is."""
        if self.filter_group.numel() == 0:
            return filters
        groups = filters.new_zeros(filters.shape[:-1] + (self.gate_end - self.gate_start,), dtype=torch.float)
        return groups.index_add(-1, self.filter_group, filters.float()) > 0

    def decisions(self, x: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
        """Per-sample binary decisions of this block's gate (N x filters, N x 1, or N x 0)."""
        if self.gate_kind == "emg":
            return self.emg_gates(x)[1]
        if self.gate_kind == "channel":
            return self.channel_mask(gate_logits)
        route = self.route(x)
        if route is None:
            return torch.zeros(x.shape[0], 0, dtype=torch.bool, device=x.device)
        if self.dfs_gate is not None:
            return F.one_hot(route, 3) > 0  # (skip, int8, fp32)
        return (route == 2).unsqueeze(1)

    def route(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-sample option of a skip or DFS gate: 0 skip the branch, 1 int8 branch, 2 full branch."""
        skip_gate = self.skip_gate
        if skip_gate is not None:
            return (skip_gate(x) > 0).long() * 2
        dfs_gate = self.dfs_gate
        if dfs_gate is not None:
            return dfs_gate.logits(x).argmax(dim=1)
        return None

    def run_int8(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
        skip_gate = self.skip_gate
        if skip_gate is not None and x.shape[0] == 1:  # one sample: one scalar decides (the hot path at batch 1)
            return self.run(x, None) if skip_gate.opens(x) else self.post(x)
        if self.gate_kind == "none":
            return self.run(x, None)
        if self.gate_kind == "channel":
            if x.shape[0] == 1:  # one sample: its own filters, none of them off
                if self.subset_powers.numel() > 0:
                    return self.run_subset(x, self.subset_code(gate_logits))
                return self.run_kept(x, self.channel_mask(gate_logits)[0].nonzero().squeeze(1))
            return self.run(x, self.channel_mask(gate_logits))
        dfs_gate = self.dfs_gate
        if dfs_gate is not None and x.shape[0] == 1:  # one sample: one host read, then only its option runs
            option = int(dfs_gate.one_sample_logits(x).argmax())
            if option == 2:
                return self.run(x, None)
            return self.run_int8(x) if option == 1 else self.post(x)
        route = self.route(x)
        if route is None or bool((route == 2).all()):
            return self.run(x, None)
        if bool((route == 1).all()):
            return self.run_int8(x)
        out = self.post(x)
        if bool((route == 0).all()):
            return out
        out = out.clone()
        for option in [1, 2]:  # run each option only on the samples that chose it
            idx = (route == option).nonzero().squeeze(1)
            if idx.numel() > 0:
                part = x.index_select(0, idx)
                out.index_copy_(0, idx, self.run(part, None) if option == 2 else self.run_int8(part))
        return out


class Int8Branch(nn.Module):
    """A basic block's residual branch with real int8 convs (quint8 activations, per-channel qint8 weights);
    BatchNorm and ReLU run in float between them, at the quantization points the supernet trained with."""

    def __init__(self, qconv1: nn.Module, bn1: nn.BatchNorm2d, qconv2: nn.Module, bn2: nn.BatchNorm2d,
                 in1: Tuple[float, int], in2: Tuple[float, int]):
        super().__init__()
        self.qconv1, self.bn1, self.qconv2, self.bn2 = qconv1, bn1, qconv2, bn2
        self.in1_scale, self.in1_zero_point = in1
        self.in2_scale, self.in2_zero_point = in2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.quantize_per_tensor(x, self.in1_scale, self.in1_zero_point, torch.quint8)
        h = F.relu(self.bn1(self.qconv1(q).dequantize()))
        q = torch.quantize_per_tensor(h, self.in2_scale, self.in2_zero_point, torch.quint8)
        return self.bn2(self.qconv2(q).dequantize())


class StaticBasicBlock(StaticBlock):
    """Residual block: conv k x k -> BN -> ReLU -> conv k x k -> BN, plus shortcut, ReLU.

    With an EMG gate (``emg_threshold`` given), conv1 computes the centre (k-2) x (k-2) kernel for every filter
    and the full k x k kernel only for filters whose gate is on for some sample of the batch.
    """

    def __init__(self, conv1: nn.Conv2d, bn1: nn.BatchNorm2d, conv2: nn.Conv2d, bn2: nn.BatchNorm2d,
                 shortcut: nn.Module, gate_kind: str = "none", gate_start: int = 0, gate_end: int = 0,
                 skip_gate: Optional[SkipGate] = None, emg_threshold: Optional[torch.Tensor] = None,
                 dfs_gate: Optional[DFSGate] = None, int8_branch: Optional[Int8Branch] = None, gate_group: int = 1):
        super().__init__(gate_kind, gate_start, gate_end, skip_gate, dfs_gate, conv1.out_channels, gate_group)
        self.conv1, self.bn1, self.conv2, self.bn2, self.shortcut = conv1, bn1, conv2, bn2, shortcut
        self.int8_branch = int8_branch
        # Plain ints: TorchScript does not expose a submodule's constants to its parent.
        self.stride, self.padding = conv1.stride[0], conv1.padding[0]
        with torch.no_grad():
            if gate_kind in ("channel", "emg"):
                self.w1, self.b1 = fold_bn(conv1.weight, bn1)
                self.w2, self.b2 = fold_bn(conv2.weight, bn2)
            for code, keep in enumerate(self.subset_filters()):
                self.subset_w1.append(self.w1.index_select(0, keep))
                self.subset_b1.append(self.b1.index_select(0, keep))
                w2 = self.w2.index_select(1, keep)
                self.subset_w2.append(w2 if code > 0 else torch.zeros_like(w2))  # no filter open: bias only
            if emg_threshold is not None:
                scale = bn_scale(bn1)
                self.emg_threshold = scale * emg_threshold.detach() + self.b1
                self.emg_sign = torch.where(scale >= 0, 1.0, -1.0)
                self.small_weight = self.w1[..., 1:-1, 1:-1].contiguous()

    def emg_conv1(self, x: torch.Tensor) -> torch.Tensor:
        """conv1 and bn1 of an EMG block: the small kernel for every filter, the large one where a gate is on."""
        small, gates = self.emg_gates(x)
        one = x.shape[0] == 1  # one sample: every large response computed is its own, nothing to mix
        on = (gates[0] if one else gates.any(0)).nonzero().squeeze(1)
        if on.numel() == 0:
            return small
        large = F.conv2d(x, self.w1.index_select(0, on), self.b1.index_select(0, on), self.stride, self.padding)
        if one:
            return small.index_copy_(1, on, large)
        picked = torch.where(gates.index_select(1, on)[:, :, None, None], large, small.index_select(1, on))
        return small.index_copy(1, on, picked)

    def post(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x)

    def run_int8(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.int8_branch
        assert branch is not None
        return F.relu(self.shortcut(x) + branch(x))

    def run_subset(self, x: torch.Tensor, code: int) -> torch.Tensor:
        h = F.relu(F.conv2d(x, self.subset_w1[code], self.subset_b1[code], self.stride, self.padding))
        return F.relu(self.shortcut(x) + F.conv2d(h, self.subset_w2[code], self.b2, 1, self.padding))

    def run(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        if self.gate_kind == "emg":
            h = F.conv2d(F.relu(self.emg_conv1(x)), self.w2, self.b2, 1, self.padding)
        elif mask is None:
            h = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        else:
            keep, partial = _active_filters(mask)
            return self.run_filters(x, keep, mask.index_select(1, keep).to(x.dtype) if partial else None)
        return F.relu(self.shortcut(x) + h)

    def run_filters(self, x: torch.Tensor, keep: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
        h = F.relu(F.conv2d(x, self.w1.index_select(0, keep), self.b1.index_select(0, keep), self.stride,
                            self.padding))
        if scale is not None:
            h = h * scale[:, :, None, None]
        h = F.conv2d(h, self.w2.index_select(1, keep), self.b2, 1, self.padding)
        return F.relu(self.shortcut(x) + h)


class StaticMBConvBlock(StaticBlock):
    """Inverted residual: 1x1 expand -> BN -> act -> depthwise k x k -> BN -> act -> 1x1 project -> BN."""

    def __init__(self, expand: nn.Conv2d, bn1: nn.BatchNorm2d, dw: nn.Conv2d, bn2: nn.BatchNorm2d,
                 project: nn.Conv2d, bn3: nn.BatchNorm2d, act: nn.Module, residual: bool,
                 gate_kind: str = "none", gate_start: int = 0, gate_end: int = 0,
                 skip_gate: Optional[SkipGate] = None, gate_group: int = 1):
        super().__init__(gate_kind, gate_start, gate_end, skip_gate, None, expand.out_channels, gate_group)
        self.expand, self.bn1, self.dw, self.bn2 = expand, bn1, dw, bn2
        self.project, self.bn3, self.act, self.residual = project, bn3, act, residual
        self.stride, self.padding = dw.stride[0], dw.padding[0]
        if gate_kind == "channel":
            with torch.no_grad():
                self.w1, self.b1 = fold_bn(expand.weight, bn1)
                self.w2, self.b2 = fold_bn(dw.weight, bn2)
                self.w3, self.b3 = fold_bn(project.weight, bn3)
                for code, keep in enumerate(self.subset_filters()):
                    self.subset_w1.append(self.w1.index_select(0, keep))
                    self.subset_b1.append(self.b1.index_select(0, keep))
                    self.subset_w2.append(self.w2.index_select(0, keep))
                    self.subset_b2.append(self.b2.index_select(0, keep))
                    w3 = self.w3.index_select(1, keep)
                    self.subset_w3.append(w3 if code > 0 else torch.zeros_like(w3))  # no filter open: bias only

    def post(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def run_subset(self, x: torch.Tensor, code: int) -> torch.Tensor:
        h = self.act(F.conv2d(x, self.subset_w1[code], self.subset_b1[code]))
        w = self.subset_w2[code]
        h = self.act(F.conv2d(h, w, self.subset_b2[code], self.stride, self.padding, 1, w.shape[0]))
        h = F.conv2d(h, self.subset_w3[code], self.b3)
        return h + x if self.residual else h

    def run(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        if mask is None:
            h = self.act(self.bn2(self.dw(self.act(self.bn1(self.expand(x))))))
            h = self.bn3(self.project(h))
        else:
            keep, partial = _active_filters(mask)
            return self.run_filters(x, keep, mask.index_select(1, keep).to(x.dtype) if partial else None)
        return h + x if self.residual else h

    def run_filters(self, x: torch.Tensor, keep: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
        h = self.act(F.conv2d(x, self.w1.index_select(0, keep), self.b1.index_select(0, keep)))
        w, b = self.w2.index_select(0, keep), self.b2.index_select(0, keep)
        h = self.act(F.conv2d(h, w, b, self.stride, self.padding, 1, keep.numel()))
        if scale is not None:
            h = h * scale[:, :, None, None]
        h = F.conv2d(h, self.w3.index_select(1, keep), self.b3)
        return h + x if self.residual else h
