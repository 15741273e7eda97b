"""CIGT (conditional information-gain trellis): routed stages whose blocks come in parallel copies (paths).

Before each block of a routed stage a router reads the features and sends every sample to one path. Training
mixes the paths with the router's softmax at an annealed temperature and adds the information-gain loss,
which rewards routes that are balanced overall yet predictable from the class; inference takes the argmax and
runs only the chosen path per sample.
"""
from __future__ import annotations

import copy
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from supernet.dynamic.choice import OneOfBlock
from supernet.ops.elastic import ElasticBatchNorm1d


class Router(nn.Module):
    """Pooled features -> FC -> BN -> ReLU -> FC -> BN: one logit per path (the first ``paths`` are used).

    The last BN standardises each path's logit over the data. Without it the ReLU features' positive mean
    gives one path a lead for every sample, and the argmax sends them all there (a collapsed router) long
    before the information-gain loss can make routes input-dependent; standardised, a path wins where its
    logit is high relative to its own average, so every path starts in use.
    """

    def __init__(self, in_ch: int, max_paths: int, hidden: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(in_ch, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, max_paths)
        self.balance: nn.Module = ElasticBatchNorm1d(max_paths)

    def forward(self, x: torch.Tensor, paths: int) -> torch.Tensor:
        h = F.relu(self.bn(self.fc1(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))))
        return self.balance(F.linear(h, self.fc2.weight[:paths], self.fc2.bias[:paths]))

    def sliced(self, paths: int) -> "Router":
        """A copy for a standalone subnet with ``paths`` paths (a plain BatchNorm on its logits)."""
        router = copy.deepcopy(self)
        router.balance = self.balance.sliced(paths)
        return router


def information_gain_loss(probs: torch.Tensor, labels: torch.Tensor, num_classes: int, balance: float = 1.0) -> torch.Tensor:
    """Negative information gain of a routing: ``H(path | class) - balance * H(path)``.

    ``probs`` are the router's N x P path probabilities. Minimising it makes each class favour a path
    (low conditional entropy) while all paths stay in use (high marginal entropy; ``balance`` weighs it).
    With ``balance`` = 1 a router sending everything down one path scores 0, as well as a uniform uninformed
    one; above 1 the collapsed router is strictly worse.
    """
    joint = F.one_hot(labels, num_classes).to(probs.dtype).t() @ probs / len(labels)  # classes x paths
    p_class = joint.sum(dim=1, keepdim=True)
    p_path = joint.sum(dim=0)
    h_path = -(p_path * torch.log(p_path.clamp_min(1e-12))).sum()
    cond = joint / p_class.clamp_min(1e-12)
    h_path_given_class = -(p_class.squeeze(1) * (cond * torch.log(cond.clamp_min(1e-12))).sum(dim=1)).sum()
    return h_path_given_class - balance * h_path


class RoutedBlock(OneOfBlock):
    """Standalone routed block: the router picks a path per sample and only that path's block runs
    (:class:`OneOfBlock`; at batch 1 a single path runs). TorchScript-friendly."""

    def __init__(self, router: Router, paths: List[nn.Module], num_paths: int):
        super().__init__(paths)
        self.router = router
        self.num_paths = num_paths

    def choose(self, x: torch.Tensor) -> torch.Tensor:
        return self.router(x, self.num_paths).argmax(dim=1)

    def decisions(self, x: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
        return F.one_hot(self.choose(x), self.num_paths) > 0
