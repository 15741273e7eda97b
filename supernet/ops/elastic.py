"""Elastic ops: each holds one full-size weight and computes with a slice of it — never a mask.

A smaller kernel is the centre crop of the next larger (transformed) kernel followed by a learned linear
transform of its k*k taps, initialised to identity (OFA's elastic kernel). A narrower layer uses the first
channels, which :meth:`ElasticConv2d.permute_out` / ``permute_in`` can re-order by importance.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ElasticConv2d(nn.Module):
    """A conv whose kernel size and channel counts are chosen per call.

    ``depthwise`` convs have one filter per channel (groups = channels), so their input and output widths
    are always equal.
    """

    def __init__(self, in_max: int, out_max: int, kernels: tuple[int, ...], stride: int = 1, depthwise: bool = False):
        super().__init__()
        self.kernels = tuple(sorted(kernels))
        self.stride = stride
        self.depthwise = depthwise
        kmax = self.kernels[-1]
        self.weight = nn.Parameter(torch.empty(out_max, 1 if depthwise else in_max, kmax, kmax))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        # One k*k -> k*k transform per smaller kernel, applied after cropping the next larger one.
        self.kernel_transforms = nn.ParameterDict(
            {str(k): nn.Parameter(torch.eye(k * k)) for k in self.kernels[:-1]}
        )

    def kernel_weight(self, out_ch: int, in_ch: int, kernel: int) -> torch.Tensor:
        """The static weight of the ``out_ch`` x ``in_ch`` x ``kernel`` x ``kernel`` sub-conv."""
        w = self.weight[:out_ch] if self.depthwise else self.weight[:out_ch, :in_ch]
        for k in reversed(self.kernels[:-1]):
            if k < kernel:
                break
            cut = (w.shape[-1] - k) // 2
            w = w[..., cut : cut + k, cut : cut + k]
            w = (w.reshape(-1, k * k) @ self.kernel_transforms[str(k)]).reshape(w.shape[0], w.shape[1], k, k)
        return w

    def forward(self, x: torch.Tensor, out_ch: int, kernel: int) -> torch.Tensor:
        in_ch = x.shape[1]
        if self.depthwise:
            out_ch = in_ch
        w = self.kernel_weight(out_ch, in_ch, kernel)
        return F.conv2d(x, w, None, self.stride, kernel // 2, 1, in_ch if self.depthwise else 1)

    def permute_out(self, order: torch.Tensor) -> None:
        self.weight.data[: len(order)] = self.weight.data[order]

    def permute_in(self, order: torch.Tensor) -> None:
        self.weight.data[:, : len(order)] = self.weight.data[:, order]


class _ElasticBatchNorm:
    """BatchNorm over the first ``C`` channels of its statistics, ``C`` taken from the input (a mixin put before
    the fixed-size BatchNorm class it slices, which ``sliced`` returns)."""

    plain: type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        training = self.training or self.running_mean is None
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm does
                momentum = 1.0 / float(self.num_batches_tracked)
        # Slices of the buffers are views, so F.batch_norm updates the full-size statistics in place.
        return F.batch_norm(
            x,
            self.running_mean[:c],
            self.running_var[:c],
            self.weight[:c],
            self.bias[:c],
            training,
            momentum,
            self.eps,
        )

    def sliced(self, c: int) -> nn.Module:
        """A plain BatchNorm holding a copy of the first ``c`` channels (statistics included)."""
        bn = self.plain(c, eps=self.eps, momentum=self.momentum)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(bn, name).copy_(getattr(self, name)[:c])
            bn.num_batches_tracked.copy_(self.num_batches_tracked)
        return bn

    def permute(self, order: torch.Tensor) -> None:
        n = len(order)
        for t in (self.weight, self.bias, self.running_mean, self.running_var):
            t.data[:n] = t.data[order]


class ElasticBatchNorm2d(_ElasticBatchNorm, nn.BatchNorm2d):
    """Elastic BatchNorm of conv channels."""

    plain = nn.BatchNorm2d


class ElasticBatchNorm1d(_ElasticBatchNorm, nn.BatchNorm1d):
    """Elastic BatchNorm of features (a router's path logits)."""

    plain = nn.BatchNorm1d


def static_conv(weight: torch.Tensor, stride: int, depthwise: bool) -> nn.Conv2d:
    """A plain ``nn.Conv2d`` carrying a copy of ``weight`` (out, in/groups, k, k)."""
    out_ch, in_per_group, k, _ = weight.shape
    in_ch = out_ch if depthwise else in_per_group
    conv = nn.Conv2d(in_ch, out_ch, k, stride, k // 2, groups=out_ch if depthwise else 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(weight)
    return conv
