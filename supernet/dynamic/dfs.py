"""DFS (dynamic fractional skipping): per input and block, skip the residual branch, run it in int8, or run
it in full precision.

Training uses fake quantization with the same quantization points as the exported int8 path (conv inputs,
per-channel weights, conv outputs), so the real int8 kernels compute what the supernet learned. Activation
ranges are running min/max estimates updated in training mode.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from supernet.dynamic.gates import SkipGate

DFS_OPTIONS = ("skip", "int8", "fp32")
# Cost of each option relative to the full-precision branch, in BitOPs (bits of the operands multiplied):
# the compute-budget loss and the cost model weigh the options with these.
DFS_RELATIVE_COST = (0.0, (8 * 8) / (32 * 32), 1.0)


class DFSGate(SkipGate):
    """Pooled block input -> MLP -> one logit per option (skip, int8, fp32)."""

    def __init__(self, in_ch: int, hidden: int = 16):
        super().__init__(in_ch, hidden, outputs=len(DFS_OPTIONS))
        with torch.no_grad():
            self.fc2.bias.copy_(torch.tensor([-2.0, 0.0, 2.0]))  # start at full precision

    def choose(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        """One-hot option per sample (N x 3); straight-through over a softmax in training."""
        logits = self(x)  # through __call__, so that forward hooks see the logits
        hard = F.one_hot(logits.argmax(dim=1), len(DFS_OPTIONS)).to(logits.dtype)
        if not training:
            return hard
        soft = torch.softmax(logits, dim=1)
        return hard + soft - soft.detach()


class ActRange(nn.Module):
    """Running min/max of an activation (EMA in training) and the quint8 parameters derived from it."""

    def __init__(self, momentum: float = 0.1):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("lo", torch.tensor(0.0))
        self.register_buffer("hi", torch.tensor(1.0))
        self.register_buffer("seen", torch.tensor(False))

    def qparams(self) -> tuple[float, int]:
        lo, hi = min(float(self.lo), 0.0), max(float(self.hi), 0.0)  # zero must be representable
        scale = max((hi - lo) / 255.0, 1e-8)
        return scale, int(round(-lo / scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantise ``x`` to quint8 (updating the range first in training)."""
        if self.training:
            with torch.no_grad():
                lo, hi = x.min(), x.max()
                if bool(self.seen):
                    self.lo.lerp_(lo, self.momentum)
                    self.hi.lerp_(hi, self.momentum)
                else:
                    self.lo.copy_(lo), self.hi.copy_(hi), self.seen.fill_(True)
        scale, zero_point = self.qparams()
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 255)


def weight_qparams(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric qint8 scales (and zero points) of a conv weight."""
    scale = weight.detach().abs().amax(dim=(1, 2, 3)).clamp_min(1e-8) / 127.0
    return scale, torch.zeros_like(scale, dtype=torch.int32)


def fake_quant_weight(weight: torch.Tensor) -> torch.Tensor:
    scale, zero_point = weight_qparams(weight)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero_point, 0, -128, 127)


class DFSQuantizer(nn.Module):
    """The four activation quantization points of a residual branch: conv1 input and output, conv2 input and
    output."""

    def __init__(self):
        super().__init__()
        self.in1, self.out1, self.in2, self.out2 = ActRange(), ActRange(), ActRange(), ActRange()


def quantized_conv(weight: torch.Tensor, stride: int, out_range: ActRange) -> nn.Module:
    """A real int8 conv (fbgemm/x86 kernels) with the per-channel weights that :func:`fake_quant_weight`
    emulates and the output quantization that ``out_range`` emulates."""
    out_ch, in_ch, k, _ = weight.shape
    conv = torch.ao.nn.quantized.Conv2d(in_ch, out_ch, k, stride=stride, padding=k // 2, bias=False)
    scale, zero_point = weight_qparams(weight)
    qweight = torch.quantize_per_channel(weight.detach(), scale.double(), zero_point.long(), 0, torch.qint8)
    conv.set_weight_bias(qweight, None)
    conv.scale, conv.zero_point = out_range.qparams()
    return conv
