"""Per-sample gate decisions, per-class activation rates and binarised class gating patterns.

The analysis reads a model through :class:`GateModel`: the binary decision of every gate along the full path
(no early exit, so every sample has a decision for every gate) and the penultimate CNN features (the final
classifier's input), which serve as the CNN-descriptor baseline. :class:`ExportedProbe` adapts an exported
model to it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence

import numpy as np
import torch
from tqdm import tqdm

from nas4dyn.errors import DataError

log = logging.getLogger(__name__)

PATTERN_THRESHOLD = 0.5  # a class pattern bit is on when the gate fires for at least half the class's samples


@dataclass(frozen=True)
class GateGroup:
    """The decision columns ``[start, end)`` of one gated block: ``kind`` is "channel" or "skip"."""

    name: str
    kind: str
    start: int
    end: int


class GateModel(Protocol):
    """What the analysis needs from a model (inputs as its data loader yields them)."""

    def gate_decisions(self, x: torch.Tensor) -> torch.Tensor:
        """N x G bool: every gate along the full path."""

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        """N x D float: the final classifier's input features."""

    def gate_groups(self) -> list[GateGroup]:
        """Which decision columns belong to which gated block, in column order."""


class ExportedProbe:
    """Adapts an exported model (:class:`nas4dyn.export.runtime.ExportedModel`, eager or TorchScript) to
    :class:`GateModel`; inputs are images in [0, 1], which the model normalises itself.

    The gate layout comes from the model's ``gate_blocks`` / ``gate_kinds`` / ``gate_sizes`` attributes.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()
        sizes = [int(n) for n in model.gate_sizes]
        ends = np.cumsum(sizes).tolist()
        self.groups = [GateGroup(str(name), str(kind), end - size, end)
                       for name, kind, size, end in zip(model.gate_blocks, model.gate_kinds, sizes, ends)]

    def gate_decisions(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.gate_decisions(x)

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.penultimate(x)

    def gate_groups(self) -> list[GateGroup]:
        return list(self.groups)


@dataclass
class Collected:
    """Per-sample decisions (N x G bool), penultimate features (N x D float32) and labels (N)."""

    decisions: np.ndarray
    features: np.ndarray
    labels: np.ndarray


@torch.inference_mode()
def collect(model: GateModel, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Collected:
    """Run ``model`` over ``batches`` of (inputs, labels) and stack decisions, features and labels.

    Raises:
        DataError: no samples, or the model has no gates to analyse.
    """
    decisions, features, labels = [], [], []
    for x, y in tqdm(batches, desc="gate decisions", unit="batch", leave=False, disable=None):
        decisions.append(model.gate_decisions(x).bool().cpu().numpy())
        features.append(model.penultimate(x).float().cpu().numpy())
        labels.append(np.asarray(y, dtype=np.int64))
    if not labels:
        raise DataError("no samples to analyse: the chosen split is empty")
    out = Collected(np.concatenate(decisions), np.concatenate(features), np.concatenate(labels))
    if out.decisions.shape[1] == 0:
        raise DataError("the model has no gates (every block's gate is 'none'): export a gated arch to analyse")
    log.info("collected %d samples: %d gate decisions and %d features each", len(out.labels),
             out.decisions.shape[1], out.features.shape[1])
    return out


def class_rates(decisions: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """C x G share of each class's samples on which each gate fires.

    Raises:
        DataError: a class has no samples (its rate is undefined).
    """
    counts = np.bincount(labels, minlength=len(classes))
    if len(counts) > len(classes):
        raise DataError(f"label {len(counts) - 1} is outside the {len(classes)} classes of the data")
    empty = [classes[c] for c in np.flatnonzero(counts == 0)]
    if empty:
        raise DataError(f"no samples of class(es) {empty} among the {len(labels)} analysed; raise --max-samples "
                        "or use a split that holds every class")
    return class_means(decisions, labels, len(classes))


def class_means(values: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """C x D mean of ``values`` (N x D) per class, e.g. the CNN class descriptor; every class needs samples."""
    sums = np.zeros((num_classes, values.shape[1]))
    np.add.at(sums, labels, values.astype(np.float64))
    return sums / np.bincount(labels, minlength=num_classes)[:, None]


def binarise(rates: np.ndarray, threshold: float = PATTERN_THRESHOLD) -> np.ndarray:
    """Binary class patterns: a gate is part of a class's pattern when its rate is ``>= threshold``."""
    return rates >= threshold
