"""EMGNet's centre-shared multi-scale kernel gate.

A conv with a k x k kernel also holds a (k-2) x (k-2) kernel: its centre. Per sample and output channel a
gate picks the small or the large receptive field: the small kernel's response, globally averaged, is
compared with a learned per-channel threshold (straight-through in training). The small response is always
computed (the gate reads it); the large kernel runs only for channels whose gate is on.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from supernet.dynamic.binarizers import binarize


class EMGGate(nn.Module):
    """Per-channel thresholds on the pooled small-kernel response of one conv (``channels`` = its maximum)."""

    def __init__(self, channels: int):
        super().__init__()
        self.threshold = nn.Parameter(torch.zeros(channels))

    @staticmethod
    def small_response(x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
        """The response (N x C x H x W) of the centre (k-2) x (k-2) of the k x k ``weight``."""
        k = weight.shape[-1]
        return F.conv2d(x, weight[..., 1:-1, 1:-1], None, stride, (k - 2) // 2)

    def logits(self, small: torch.Tensor) -> torch.Tensor:
        """Gate logits (N x C) from the small kernel's response (N x C x H x W)."""
        return small.mean(dim=(2, 3)) - self.threshold[: small.shape[1]]

    def forward(self, x: torch.Tensor, weight: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, gates): each channel's response from the large ``weight`` where its gate is on, else from
        the centre of ``weight``. In training the mix is differentiable in the gates."""
        small = self.small_response(x, weight, stride)
        large = F.conv2d(x, weight, None, stride, weight.shape[-1] // 2)
        gates = binarize(self.logits(small), "sigmoid_ste", self.training)
        if self.training:
            return small + gates[:, :, None, None] * (large - small), gates
        # torch.where, not the blend: the exported model computes `large` directly for open channels.
        return torch.where(gates[:, :, None, None] > 0.5, large, small), gates
