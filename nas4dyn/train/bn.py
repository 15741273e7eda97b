"""BN recalibration: shared weights serve many subnets, so running statistics are re-estimated per subnet."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from search_spaces.arch import Arch
from supernet.network import Supernet


@torch.no_grad()
def recalibrate_bn(net: Supernet, arch: Arch, loader: Iterable, n_images: int = 2000) -> None:
    """Reset every BatchNorm's statistics and re-estimate them for ``arch`` on up to ``n_images`` images.

    Gates and exits behave as in eval (hard decisions) while BN layers see batch statistics; the estimate is a
    cumulative average over the images seen. The network is left in eval mode with ``arch`` active.
    """
    net.set_active(arch)
    net.eval()
    bns = [m for m in net.modules() if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d))]  # routers' BN too
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
        m.train()
    seen = 0
    try:
        for x, _ in loader:
            if seen >= n_images:
                break
            x = x[: n_images - seen]
            net.forward_all(x)
            seen += len(x)
    finally:
        for m, momentum in zip(bns, saved):
            m.momentum = momentum
            m.eval()
    net.reset_stats()
