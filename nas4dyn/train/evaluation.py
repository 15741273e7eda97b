"""Phase-end evaluation: BN recalibration, then validation accuracy, exit, gate and path rates per subnet."""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Iterable

import torch
from torch.utils.data import Dataset, Subset

from nas4dyn.data import make_loader
from search_spaces.arch import Arch
from search_spaces.space import SearchSpace
from supernet.network import Supernet
from nas4dyn.train.bn import recalibrate_bn
from nas4dyn.train.config import TrainConfig
from nas4dyn.train.distributed import DistEnv, all_sum
from nas4dyn.train.sampling import all_exits, extremes, gated

EVAL_BATCH = 500


@torch.no_grad()
def accuracy_and_rates(net: Supernet, loader: Iterable, env: DistEnv = DistEnv()) -> dict[str, Any]:
    """Dynamic-inference accuracy of ``net``'s active subnet (eval mode) on ``loader``, with its exit and gate
    rates and its routers' path shares; under torchrun each rank passes its shard and gets the totals over all
    ranks."""
    net.eval()
    net.reset_stats()
    correct = total = 0
    for x, y in loader:
        pred = net(x.to(env.device)).argmax(1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    exits, gates, routes = net.exit_stats(), net.gate_stats(), net.route_stats()
    names, routers = sorted(gates), sorted(routes)
    shares = [r for name in routers for r in routes[name]]
    # Rates are shares of this shard; weight them by the shard size before summing over ranks.
    sums = all_sum([correct, total] + [r * total for r in exits + [gates[n] for n in names] + shares], env)
    n = max(sums[1], 1.0)
    rates = iter(v / n for v in sums[2:])
    return {
        "val_acc": sums[0] / n,
        "exit_rates": [next(rates) for _ in exits],
        "gate_rates": {name: next(rates) for name in names},
        "path_rates": {name: [next(rates) for _ in routes[name]] for name in routers},
    }


def probe_archs(space: SearchSpace, elastic: list[str], threshold: float) -> dict[str, Arch]:
    """The subnets evaluated after a phase: its max and min static subnets and, once exits or gates are
    trained, both with every exit (at ``threshold``) and channel gates wherever allowed; then the max subnet
    with each other gate kind the space offers on every block (``max_skip``, ``max_emg``, ...) and, once paths
    are trained, with every stage at its most paths (``max_routed``), so each mechanism's rates are reported."""
    top, bottom = (a.without_dynamic() for a in extremes(space, set(elastic), threshold))
    archs = {"max": top, "min": bottom}
    if "exits" in elastic or "gates" in elastic:
        for name, arch in (("max_dynamic", top), ("min_dynamic", bottom)):
            if "exits" in elastic:
                arch = all_exits(space, arch, threshold)
            archs[name] = gated(space, arch) if "gates" in elastic else arch
    if "gates" in elastic:
        kinds = {k for blk in top.blocks() for k in space.allowed_gates(blk.stage, blk.block, blk.kernel, blk.width)}
        for kind in sorted(kinds - {"none", "channel"}):
            archs[f"max_{kind}"] = gated(space, top, kind)
    if "paths" in elastic and any(len(st.paths) > 1 for st in space.stages):
        archs["max_routed"] = dataclasses.replace(top, paths=tuple(max(st.paths) for st in space.stages))
    return archs


def evaluate_phase(net: Supernet, elastic: list[str], train_eval: Dataset, val: Dataset, config: TrainConfig,
                   seed: int, env: DistEnv) -> dict[str, dict[str, Any]]:
    """Each probe subnet's validation metrics after BN recalibration on training images.

    Works on a copy: recalibration replaces BN statistics, which training must not see.
    """
    probe = copy.deepcopy(net)
    # Every rank recalibrates on the same images (identical statistics) and evaluates its own val shard.
    recal = make_loader(train_eval, EVAL_BATCH, seed=seed, limit=config.bn_recal_images)
    n_val = min(len(val), config.val_images or len(val))  # the first n_val images, sharded over the ranks
    shard = make_loader(Subset(val, range(env.rank, n_val, env.world_size)), EVAL_BATCH)
    results: dict[str, dict[str, Any]] = {}
    done: dict[Arch, dict[str, Any]] = {}  # e.g. min == max while nothing is elastic: measure once
    for name, arch in probe_archs(net.space, elastic, config.eval_threshold).items():
        if arch not in done:
            recalibrate_bn(probe, arch, _on_device(recal, env), config.bn_recal_images)
            done[arch] = {"arch": arch.to_dict(), **accuracy_and_rates(probe, shard, env)}
        results[name] = done[arch]
    return results


def _on_device(loader: Iterable, env: DistEnv) -> Iterable:
    for x, y in loader:
        yield x.to(env.device), y
