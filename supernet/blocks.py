"""Elastic blocks of the supernet: residual (regular convs) and MBConv, with optional channel and skip gates.

Every block is called with its active kernel and width; gates come in as per-sample tensors (0/1 in eval,
relaxed in training). Gating is applied after the hidden activation and, for skip gates, to the whole
residual branch; :mod:`supernet.static_blocks` computes the same function while skipping the gated-off work.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from search_spaces.schema import StageSpec
from supernet.dynamic.dfs import DFSGate, DFSQuantizer, fake_quant_weight, quantized_conv
from supernet.dynamic.emg import EMGGate
from supernet.dynamic.gates import SkipGate
from supernet.dynamic.heads import ACTIVATIONS
from supernet.dynamic.width import WidthGate, WidthGatedBlock
from supernet.ops.elastic import ElasticBatchNorm2d, ElasticConv2d, static_conv
from supernet.static_blocks import Int8Branch, StaticBasicBlock, StaticBlock, StaticMBConvBlock


def _mask(h: torch.Tensor, gate: Optional[torch.Tensor]) -> torch.Tensor:
    return h if gate is None else h * gate[:, :, None, None]


class ElasticBlock(nn.Module):
    """What both block types share: geometry, the optional skip gate, and the gated residual sum."""

    def __init__(self, spec: StageSpec, in_ch: int, stride: int, gates: tuple[str, ...]):
        super().__init__()
        self.spec, self.in_ch, self.out_ch, self.stride = spec, in_ch, spec.out_channels, stride
        self.hidden_max = spec.hidden_channels(max(spec.widths), in_ch)
        self.skip_gate = SkipGate(in_ch) if "skip" in gates else None
        self.emg_gate = EMGGate(self.hidden_max) if "emg" in gates else None
        self.dfs_gate = DFSGate(in_ch) if "dfs" in gates else None
        self.dfs_quant = DFSQuantizer() if "dfs" in gates else None
        self.width_gate = WidthGate(in_ch, len(spec.widths)) if "width" in gates else None
        self.emg_values: Optional[torch.Tensor] = None  # the EMG gates of the last forward (N x hidden)

    def hidden(self, width: int) -> int:
        return self.spec.hidden_channels(width, self.in_ch)

    def branch(self, x: torch.Tensor, kernel: int, width: int, gate: Optional[torch.Tensor],
               emg: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def combine(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def branch_int8(self, x: torch.Tensor, kernel: int, width: int) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, kernel: int, width: int, gate: Optional[torch.Tensor] = None,
                skip: Optional[torch.Tensor] = None, emg: bool = False,
                dfs: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``gate``: per-sample filter gates (N x hidden); ``skip``: per-sample branch gates (N); ``emg``: let
        the block's EMG gate pick each filter's kernel size (its gates land in ``emg_values``); ``dfs``:
        per-sample one-hot (skip, int8, fp32) choices (N x 3)."""
        branch = self.branch(x, kernel, width, gate, emg)
        if skip is not None:
            branch = branch * skip[:, None, None, None]
        if dfs is not None:
            low = self.branch_int8(x, kernel, width)
            if self.training:
                branch = dfs[:, 2, None, None, None] * branch + dfs[:, 1, None, None, None] * low
            else:  # exact selection, as the exported model computes only the chosen option
                choice = dfs.argmax(dim=1)[:, None, None, None]
                branch = torch.where(choice == 2, branch, torch.where(choice == 1, low, torch.zeros_like(low)))
        return self.combine(x, branch)

    def out_size(self, size: int) -> int:
        return (size - 1) // self.stride + 1

    def gate_unit_macs(self, size: int, kernel: int, width: int, kind: str) -> float:
        """MACs that one unit of a ``kind`` gate switches at input size ``size``: a hidden filter (channel),
        the whole residual branch (skip), or one filter's large-kernel conv (emg)."""
        per_filter = self.filter_macs(size, kernel)
        if kind in ("skip", "dfs"):
            return per_filter * self.hidden(width)
        if kind == "emg":
            return float(self.out_size(size) ** 2 * kernel * kernel * self.in_ch)
        return per_filter

    def filter_macs(self, size: int, kernel: int) -> float:
        """MACs of the branch that belong to one hidden filter."""
        raise NotImplementedError

    def importance_order(self) -> torch.Tensor:
        raise NotImplementedError

    def extract(self, kernel: int, width: int, gate: str, gate_start: int, gate_end: int,
                gate_group: int = 1) -> nn.Module:
        """The standalone block (a :class:`StaticBlock`; a :class:`WidthGatedBlock` for a width gate); a channel
        gate reads gate logits ``gate_start:gate_end``, one per ``gate_group`` consecutive filters."""
        raise NotImplementedError

    def width_masks(self, x: torch.Tensor, width: int, training: bool) -> torch.Tensor:
        """Per-sample masks (N x hidden filters at ``width``) of the block's width gate: each sample's chosen
        width keeps its first filters (relaxed in training)."""
        assert self.width_gate is not None
        options = self.spec.width_options(width)
        first = self.spec.widths.index(options[0])
        return self.width_gate.choose(x, first, [self.hidden(w) for w in options], self.hidden(width), training)

    def width_gated(self, kernel: int, width: int) -> WidthGatedBlock:
        """The standalone width-gated block: one static branch per width option and the gate's sliced copy."""
        assert self.width_gate is not None
        options = self.spec.width_options(width)
        gate = self.width_gate.sliced(self.spec.widths.index(options[0]), len(options))
        return WidthGatedBlock(gate, [self.extract(kernel, w, "none", 0, 0) for w in options],
                               [self.hidden(w) for w in options])

    def _static_skip_gate(self, gate: str) -> Optional[SkipGate]:
        return copy.deepcopy(self.skip_gate) if gate == "skip" else None


class ElasticBasicBlock(ElasticBlock):
    """Residual block of two k x k regular convs; elastic kernel and hidden width."""

    def __init__(self, spec: StageSpec, in_ch: int, stride: int, gates: tuple[str, ...]):
        super().__init__(spec, in_ch, stride, gates)
        self.conv1 = ElasticConv2d(in_ch, self.hidden_max, spec.kernels, stride)
        self.bn1 = ElasticBatchNorm2d(self.hidden_max)
        self.conv2 = ElasticConv2d(self.hidden_max, self.out_ch, spec.kernels, 1)
        self.bn2 = nn.BatchNorm2d(self.out_ch)
        nn.init.zeros_(self.bn2.weight)  # zero-init residual: each block starts as identity
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_ch != self.out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, self.out_ch, 1, stride, bias=False), nn.BatchNorm2d(self.out_ch))

    def branch(self, x: torch.Tensor, kernel: int, width: int, gate: Optional[torch.Tensor],
               emg: bool = False) -> torch.Tensor:
        hidden = self.hidden(width)
        if emg and self.emg_gate is not None:
            weight = self.conv1.kernel_weight(hidden, self.in_ch, kernel)
            h, self.emg_values = self.emg_gate(x, weight, self.stride)
        else:
            h = self.conv1(x, hidden, kernel)
        h = _mask(F.relu(self.bn1(h)), gate)
        return self.bn2(self.conv2(h, self.out_ch, kernel))

    def branch_int8(self, x: torch.Tensor, kernel: int, width: int) -> torch.Tensor:
        """The branch in int8 (per-channel weights, quint8 activations): fake-quantised in training, the real
        int8 kernels of the extracted block in eval, so that supernet and extracted subnet agree exactly."""
        if not self.training:
            with torch.no_grad():
                return self.int8_branch(kernel, width).eval()(x)
        return self.fake_int8_branch(x, kernel, width)

    def fake_int8_branch(self, x: torch.Tensor, kernel: int, width: int) -> torch.Tensor:
        """The int8 branch emulated with fake quantization (differentiable; updates ranges in training)."""
        q, hidden = self.dfs_quant, self.hidden(width)
        assert q is not None
        w1 = fake_quant_weight(self.conv1.kernel_weight(hidden, self.in_ch, kernel))
        h = F.relu(self.bn1(q.out1(F.conv2d(q.in1(x), w1, None, self.stride, kernel // 2))))
        w2 = fake_quant_weight(self.conv2.kernel_weight(self.out_ch, hidden, kernel))
        return self.bn2(q.out2(F.conv2d(q.in2(h), w2, None, 1, kernel // 2)))

    def int8_branch(self, kernel: int, width: int) -> Int8Branch:
        """The standalone int8 branch (real quantized convs) at the quantization points trained with."""
        q, hidden = self.dfs_quant, self.hidden(width)
        assert q is not None
        w1 = self.conv1.kernel_weight(hidden, self.in_ch, kernel)
        w2 = self.conv2.kernel_weight(self.out_ch, hidden, kernel)
        return Int8Branch(quantized_conv(w1, self.stride, q.out1), self.bn1.sliced(hidden),
                          quantized_conv(w2, 1, q.out2), copy.deepcopy(self.bn2), q.in1.qparams(), q.in2.qparams())

    def combine(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        return F.relu(self.shortcut(x) + branch)

    def filter_macs(self, size: int, kernel: int) -> float:
        return float(self.out_size(size) ** 2 * kernel * kernel * (self.in_ch + self.out_ch))

    def importance_order(self) -> torch.Tensor:
        # OFA's criterion: L1 norm of the weights that read each hidden channel.
        return torch.argsort(self.conv2.weight.detach().abs().sum(dim=(0, 2, 3)), descending=True)

    def permute_hidden(self, order: torch.Tensor) -> None:
        self.conv1.permute_out(order)
        self.bn1.permute(order)
        self.conv2.permute_in(order)

    def extract(self, kernel: int, width: int, gate: str, gate_start: int, gate_end: int,
                gate_group: int = 1) -> nn.Module:
        if gate == "width":
            return self.width_gated(kernel, width)
        hidden = self.hidden(width)
        with torch.no_grad():
            conv1 = static_conv(self.conv1.kernel_weight(hidden, self.in_ch, kernel), self.stride, False)
            conv2 = static_conv(self.conv2.kernel_weight(self.out_ch, hidden, kernel), 1, False)
        emg = self.emg_gate.threshold[:hidden] if gate == "emg" and self.emg_gate is not None else None
        dfs_gate = int8 = None
        if gate == "dfs":
            dfs_gate, int8 = copy.deepcopy(self.dfs_gate), self.int8_branch(kernel, width)
        return StaticBasicBlock(conv1, self.bn1.sliced(hidden), conv2, copy.deepcopy(self.bn2),
                                copy.deepcopy(self.shortcut), gate, gate_start, gate_end, self._static_skip_gate(gate),
                                emg, dfs_gate, int8, gate_group)


class ElasticMBConvBlock(ElasticBlock):
    """Inverted residual (MobileNetV2/V3) with elastic depthwise kernel and expand ratio."""

    def __init__(self, spec: StageSpec, in_ch: int, stride: int, gates: tuple[str, ...]):
        super().__init__(spec, in_ch, stride, gates)
        hid = self.hidden_max
        self.expand = ElasticConv2d(in_ch, hid, (1,))
        self.bn1 = ElasticBatchNorm2d(hid)
        self.dw = ElasticConv2d(hid, hid, spec.kernels, stride, depthwise=True)
        self.bn2 = ElasticBatchNorm2d(hid)
        self.project = ElasticConv2d(hid, self.out_ch, (1,))
        self.bn3 = nn.BatchNorm2d(self.out_ch)
        self.act = ACTIVATIONS[spec.act]()
        self.residual = stride == 1 and in_ch == self.out_ch
        if self.residual:
            nn.init.zeros_(self.bn3.weight)

    def branch(self, x: torch.Tensor, kernel: int, width: int, gate: Optional[torch.Tensor],
               emg: bool = False) -> torch.Tensor:
        h = self.act(self.bn1(self.expand(x, self.hidden(width), 1)))
        h = _mask(self.act(self.bn2(self.dw(h, 0, kernel))), gate)
        return self.bn3(self.project(h, self.out_ch, 1))

    def combine(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        return branch + x if self.residual else branch

    def filter_macs(self, size: int, kernel: int) -> float:
        return float(size * size * self.in_ch + self.out_size(size) ** 2 * (kernel * kernel + self.out_ch))

    def importance_order(self) -> torch.Tensor:
        return torch.argsort(self.project.weight.detach().abs().sum(dim=(0, 2, 3)), descending=True)

    def permute_hidden(self, order: torch.Tensor) -> None:
        self.expand.permute_out(order)
        self.bn1.permute(order)
        self.dw.permute_out(order)
        self.bn2.permute(order)
        self.project.permute_in(order)

    def extract(self, kernel: int, width: int, gate: str, gate_start: int, gate_end: int,
                gate_group: int = 1) -> nn.Module:
        if gate == "width":
            return self.width_gated(kernel, width)
        hid = self.hidden(width)
        with torch.no_grad():
            expand = static_conv(self.expand.kernel_weight(hid, self.in_ch, 1), 1, False)
            dw = static_conv(self.dw.kernel_weight(hid, hid, kernel), self.stride, True)
            project = static_conv(self.project.kernel_weight(self.out_ch, hid, 1), 1, False)
        return StaticMBConvBlock(expand, self.bn1.sliced(hid), dw, self.bn2.sliced(hid), project,
                                 copy.deepcopy(self.bn3), copy.deepcopy(self.act), self.residual,
                                 gate, gate_start, gate_end, self._static_skip_gate(gate), gate_group)


BLOCK_TYPES: dict[str, type[ElasticBlock]] = {"basic": ElasticBasicBlock, "mbconv": ElasticMBConvBlock}
