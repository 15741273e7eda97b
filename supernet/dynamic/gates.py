"""Gating modules: GaterNet's global gater (per-filter gates) and a per-block skip gate."""
from __future__ import annotations

import copy
import torch
import torch.nn.functional as F
from torch import nn


class GlobalGater(nn.Module):
    """GaterNet's gater: a small CNN reads the input and emits one gate logit per filter of every gated block.

    ``fc2`` has one row per gateable filter of the supernet (at maximum widths); a subnet uses the rows of its
    channel-gated blocks only, and :meth:`extract` keeps just those rows. Filters gated in groups (the space's
    ``gater.group``) share one logit: the mean of their rows' logits, computed as one row holding the mean of
    their weights (so the supernet and the extracted gater compute the same linear layer).
    """

    def __init__(self, in_ch: int, channels: tuple[int, ...], hidden: int, num_gates: int):
        super().__init__()
        layers: list[nn.Module] = []
        for c in channels:
            layers += [nn.Conv2d(in_ch, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            in_ch = c
        self.features = nn.Sequential(*layers)
        self.fc1 = nn.Linear(in_ch, hidden)
        self.fc2 = nn.Linear(hidden, num_gates)
        # Open at the start (the backbone is trained first), near enough to zero for the budget loss to close some
        # within a short dynamic phase.
        nn.init.constant_(self.fc2.bias, 1.0)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        # mean over H, W: what adaptive_avg_pool2d(., 1) computes (the same kernel, the same values) without that
        # wrapper's call and a flatten; the gater runs once per image in exported models, where calls count.
        return F.relu(self.fc1(self.features(x).mean([-1, -2])))

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None = None,
                groups: torch.Tensor | None = None) -> torch.Tensor:
        """Per-filter gate logits; ``rows`` selects which filters' gates to compute (all when None), ``groups``
        (one group index per row, groups numbered 0.. in order) makes the filters of a group share its logit."""
        h = self.embed(x)
        if rows is None:
            return self.fc2(h)
        if groups is None:
            return F.linear(h, self.fc2.weight[rows], self.fc2.bias[rows])
        weight, bias = self.grouped_rows(rows, groups)
        return F.linear(h, weight, bias).index_select(1, groups)

    def grouped_rows(self, rows: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) with one row per group: the mean of its filters' rows."""
        n = int(groups.max()) + 1
        count = torch.bincount(groups, minlength=n).to(self.fc2.weight.dtype)
        weight = self.fc2.weight.new_zeros(n, self.fc2.in_features).index_add(0, groups, self.fc2.weight[rows])
        bias = self.fc2.bias.new_zeros(n).index_add(0, groups, self.fc2.bias[rows])
        return weight / count[:, None], bias / count

    def extract(self, rows: torch.Tensor, groups: torch.Tensor | None = None) -> "GlobalGater":
        """A copy whose output holds only ``rows`` (in that order); with ``groups``, one output per group."""
        weight, bias = (self.fc2.weight[rows], self.fc2.bias[rows]) if groups is None else self.grouped_rows(rows, groups)
        gater = copy.deepcopy(self)
        gater.fc2 = nn.Linear(self.fc2.in_features, len(bias))
        with torch.no_grad():
            gater.fc2.weight.copy_(weight)
            gater.fc2.bias.copy_(bias)
        return gater

    def permute_rows(self, start: int, order: torch.Tensor) -> None:
        """Re-order the gates of one block (rows ``start ...``) together with its filters."""
        idx = order + start
        n = len(order)
        self.fc2.weight.data[start : start + n] = self.fc2.weight.data[idx]
        self.fc2.bias.data[start : start + n] = self.fc2.bias.data[idx]


class SkipGate(nn.Module):
    """SkipNet / ConvNet-AIG style gate: pooled block input -> MLP -> one logit; > 0 runs the branch."""

    def __init__(self, in_ch: int, hidden: int = 16, outputs: int = 1):
        super().__init__()
        self.fc1 = nn.Linear(in_ch, hidden)
        self.fc2 = nn.Linear(hidden, outputs)
        nn.init.constant_(self.fc2.bias, 1.0)  # open at the start, as the global gater

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """N x outputs logits from the globally pooled input."""
        return self.fc2(F.relu(self.fc1(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).squeeze(1)

    @torch.jit.export
    def one_sample_logits(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`logits` of the one sample ``x`` (1 x C x H x W) in fewer calls, for exported models at batch 1,
        where each call's fixed cost outweighs this MLP's arithmetic (the pooling's division rides in the first
        matmul's ``alpha``). Detached: it only decides."""
        pixels = x.shape[2] * x.shape[3]
        h = torch.relu(torch.addmm(self.fc1.bias, x.sum([2, 3]), self.fc1.weight.t(), alpha=1.0 / pixels))
        return torch.addmm(self.fc2.bias, h, self.fc2.weight.t()).detach()

    @torch.jit.export
    def opens(self, x: torch.Tensor) -> bool:
        """Whether the branch runs for the one sample ``x``: ``forward(x) > 0`` (one host read)."""
        return float(self.one_sample_logits(x)) > 0.0
