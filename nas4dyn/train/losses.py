"""Losses of a sandwich step: in-place distillation, exit-head distillation, the compute-budget loss and
CIGT's information-gain loss on routed stages."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from supernet.dynamic.cigt import information_gain_loss
from supernet.network import GateTrace, RouteTrace
from nas4dyn.train.config import TrainConfig


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened distributions, scaled by T^2 (Hinton et al.)."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), reduction="batchmean",
                    log_target=True) * (t * t)


def gated_mac_rate(trace: Sequence[GateTrace]) -> Optional[torch.Tensor]:
    """Per-sample share of the gated parts' MACs that run: sum of gate values x unit MACs, divided by the same
    with every gate on. None when the subnet has no gates."""
    if not trace:
        return None
    used = full = None
    for t in trace:
        units = t.values.sum(dim=1) if t.values.ndim == 2 else t.values
        count = t.values.shape[1] if t.values.ndim == 2 else 1
        used = units * t.unit_macs if used is None else used + units * t.unit_macs
        full = count * t.unit_macs if full is None else full + count * t.unit_macs
    return used / full


def block_rates(trace: Sequence[GateTrace]) -> torch.Tensor:
    """Each gated block's batch-mean share of its own gated MACs that run (one value per gate)."""
    return torch.stack([(t.values.mean(dim=1) if t.values.ndim == 2 else t.values).mean() for t in trace])


def subnet_loss(outs: list[torch.Tensor], y: torch.Tensor, teacher: Optional[torch.Tensor],
                trace: Sequence[GateTrace], config: TrainConfig, routes: Sequence[RouteTrace] = ()
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one subnet's ``forward_all`` outputs (exits first, final classifier last).

    Final classifier: cross-entropy, plus ``kd_ratio`` x in-place distillation from the max subnet's logits
    (``teacher``; None for the max subnet itself). Exits: distillation from this subnet's final classifier
    mixed with cross-entropy. Gates: the compute-budget loss (and, with ``block_budget_weight``, each gated
    block's rate pulled toward the same target). Routers (``routes``): the information-gain loss,
    averaged over routed blocks. Returns the loss and its parts for logging.
    """
    final = outs[-1]
    loss = F.cross_entropy(final, y, label_smoothing=config.label_smoothing)
    parts = {"ce": float(loss.detach())}
    if teacher is not None and config.kd_ratio > 0:
        kd = kd_loss(final, teacher, config.kd_temperature)
        loss = loss + config.kd_ratio * kd
        parts["kd"] = float(kd.detach())
    if len(outs) > 1 and config.exit_weight > 0:
        target = final.detach()
        alpha = config.exit_kd_alpha
        exit_losses = [
            (1 - alpha) * F.cross_entropy(o, y, label_smoothing=config.label_smoothing)
            + alpha * kd_loss(o, target, config.kd_temperature)
            for o in outs[:-1]
        ]
        exits = torch.stack(exit_losses).mean()
        loss = loss + config.exit_weight * exits
        parts["exits"] = float(exits.detach())
    rate = gated_mac_rate(trace)
    if rate is not None:
        # Pull the batch's mean rate toward the target: samples may still differ (hard inputs use more).
        budget = (rate.mean() - config.budget_target) ** 2
        loss = loss + config.budget_weight * budget
        parts["budget"] = float(budget.detach())
        parts["gate_rate"] = float(rate.detach().mean())
    if trace and config.block_budget_weight > 0:
        # ConvNet-AIG's per-gate target rate: the global budget alone can be met by shutting some blocks for
        # every input and leaving the others open; pulling each gate toward the target keeps it input-dependent.
        per_block = ((block_rates(trace) - config.budget_target) ** 2).mean()
        loss = loss + config.block_budget_weight * per_block
        parts["block_budget"] = float(per_block.detach())
    if routes and config.ig_weight > 0:
        ig = torch.stack([information_gain_loss(r.probs, y, final.shape[1], config.ig_balance) for r in routes]).mean()
        loss = loss + config.ig_weight * ig
        parts["ig"] = float(ig.detach())
    return loss, parts
