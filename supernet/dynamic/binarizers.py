"""Binarizers: hard 0/1 decisions in eval, differentiable relaxations in training.

In eval every binarizer is the same threshold, ``logits > 0``, so supernet, extracted subnet and exported
model agree exactly. In training:

- ``semhash`` — Improved Semantic Hashing (Kaiser & Bengio 2018, used by GaterNet): Gaussian noise is added,
  and each call uses either the saturating sigmoid or the hard step with a straight-through gradient, half
  the time each.
- ``gumbel`` — Gumbel-sigmoid straight-through: hard sample forward, relaxed gradient backward.
- ``sigmoid_ste`` — no noise: the hard step forward, the sigmoid's gradient backward (EMGNet's thresholds).
"""
from __future__ import annotations

from typing import Callable

import torch

Binarizer = Callable[[torch.Tensor], torch.Tensor]


def hard(logits: torch.Tensor) -> torch.Tensor:
    return (logits > 0).to(logits.dtype)


def _straight_through(hard_value: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    return hard_value + soft - soft.detach()


def semhash(logits: torch.Tensor, noise_std: float = 1.0) -> torch.Tensor:
    noisy = logits + noise_std * torch.randn_like(logits)
    soft = torch.clamp(1.2 * torch.sigmoid(noisy) - 0.1, 0.0, 1.0)  # saturating sigmoid
    if torch.rand(()) < 0.5:
        return soft
    return _straight_through(hard(noisy), soft)


def gumbel(logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    u = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / tau)
    return _straight_through(hard(soft - 0.5), soft)


def sigmoid_ste(logits: torch.Tensor) -> torch.Tensor:
    return _straight_through(hard(logits), torch.sigmoid(logits))


BINARIZERS: dict[str, Binarizer] = {"semhash": semhash, "gumbel": gumbel, "sigmoid_ste": sigmoid_ste}


def binarize(logits: torch.Tensor, kind: str, training: bool) -> torch.Tensor:
    """0/1 gates from ``logits``: hard in eval, the ``kind`` relaxation in training."""
    return BINARIZERS[kind](logits) if training else hard(logits)
