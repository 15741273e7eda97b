"""The phase schedule in steps, and the learning-rate curve within a phase.

Phases are given in epochs (with a floor in steps); here they become step counts for a known number of batches
per epoch. Each
phase gets a fresh optimizer (channel sorting re-orders weights, so old momentum would no longer match) and a
linear-warmup-then-cosine learning-rate curve.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nas4dyn.train.config import PhaseConfig, TrainConfig


@dataclass(frozen=True)
class PhasePlan:
    """A phase with its length in optimizer steps."""

    index: int
    config: PhaseConfig
    steps: int
    warmup_steps: int

    @property
    def name(self) -> str:
        return self.config.name


def plan_phases(config: TrainConfig, steps_per_epoch: int) -> list[PhasePlan]:
    """Each phase's step count for ``steps_per_epoch`` batches per epoch: its epochs, at least its
    ``min_steps`` and one step; a phase lengthened by its floor keeps its warmup's share of the phase."""
    plans = []
    for i, phase in enumerate(config.phases):
        by_epochs = max(1, round(phase.epochs * steps_per_epoch))
        steps = max(by_epochs, phase.min_steps)
        warmup = min(steps - 1, round(phase.warmup_epochs * steps_per_epoch * steps / by_epochs))
        plans.append(PhasePlan(i, phase, steps, warmup))
    return plans


class LRCurve:
    """Learning-rate factor of a step: linear warmup, then cosine from 1 down to ``final``.

    A callable object (not a closure) so ``LambdaLR`` can be rebuilt identically on resume.
    """

    def __init__(self, steps: int, warmup_steps: int, final: float):
        self.steps, self.warmup, self.final = steps, warmup_steps, final

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.final + (1.0 - self.final) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# Parameters of the dynamic parts (exit heads, gates, routers): they start untrained in the dynamic phase.
DYNAMIC_PARTS = ("exit_heads", "gater", "routers", "skip_gate", "emg_gate", "dfs_gate", "width_gate")


def make_optimizer(net: torch.nn.Module, plan: PhasePlan, config: TrainConfig
                   ) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    """SGD over every parameter with the phase's learning rate, and its scheduler.

    Weight decay skips BN and bias vectors and the elastic-kernel transforms, which start at identity and
    would otherwise be pulled toward zero. The dynamic parts learn at ``dynamic_lr_scale`` times the rate:
    they start from scratch in a phase whose rate is set low to keep the shared backbone in place.
    """
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in net.named_parameters():
        decays = not (p.ndim <= 1 or "kernel_transforms" in name)
        dynamic = any(part in name.split(".") for part in DYNAMIC_PARTS)
        groups.setdefault((decays, dynamic), []).append(p)
    opt = torch.optim.SGD(
        [{"params": params, "weight_decay": config.weight_decay_of(plan.config) if decays else 0.0,
          "lr": plan.config.lr * (config.dynamic_lr_scale if dynamic else 1.0)}
         for (decays, dynamic), params in sorted(groups.items())],
        lr=plan.config.lr, momentum=config.momentum, nesterov=config.nesterov and config.momentum > 0)
    curve = LRCurve(plan.steps, plan.warmup_steps, config.final_lr_fraction)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, curve)
