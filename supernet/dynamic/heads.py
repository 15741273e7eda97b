"""Exit heads and the confidence that decides whether a sample leaves at an exit."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "hswish": nn.Hardswish}


class ExitHead(nn.Module):
    """Classifier head: optional 1x1 conv + BN + activation to ``hidden`` channels, global pooling, linear.

    Used for early exits and (with the space's ``head_channels``) for the final classifier.
    """

    def __init__(self, in_ch: int, hidden: int, num_classes: int, act: str = "relu"):
        super().__init__()
        if hidden > 0:
            self.features = nn.Sequential(
                nn.Conv2d(in_ch, hidden, 1, bias=False), nn.BatchNorm2d(hidden), ACTIVATIONS[act]()
            )
        else:
            self.features = nn.Sequential()
        self.fc = nn.Linear(hidden if hidden > 0 else in_ch, num_classes)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """N x D: the features ``fc`` reads."""
        return torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pooled(x))


def confidence(logits: torch.Tensor, criterion: str) -> torch.Tensor:
    """Per-sample confidence in [0, 1]: max softmax, or 1 - normalised entropy."""
    p = torch.softmax(logits, dim=1)
    if criterion == "entropy":
        ent = -(p * torch.log(p.clamp_min(1e-12))).sum(dim=1)
        return 1.0 - ent / math.log(logits.shape[1])
    return p.max(dim=1).values



def one_sample_leaves(logits: torch.Tensor, criterion: str, threshold: float) -> bool:
    """Whether the one sample of ``logits`` (1 x classes) leaves at an exit of ``threshold``:
    ``confidence(logits, criterion)[0] >= threshold`` in fewer calls (max softmax: a softmax, a max over all
    elements, one host read), for exported models at batch 1. ``threshold`` must be float32-representable (the
    tensor comparison rounds it so; the host comparison here does not)."""
    if criterion == "entropy":
        return bool(confidence(logits, criterion)[0] >= threshold)
    return float(torch.softmax(logits, 1).max().detach()) >= threshold
