"""Blocks that run one of several prepared branches per sample: the shared runtime of CIGT routing and width
gates (TorchScript-friendly)."""
from __future__ import annotations

from typing import List

import torch
from torch import nn


class OneOfBlock(nn.Module):
    """Runs, per sample, only the branch of ``paths`` that :meth:`choose` picks for it. At batch 1: one host
    sync, then that branch alone (no index bookkeeping); at batch > 1 the samples are grouped by branch, each
    group runs as one batch, and the batch order is kept. Subclasses define ``choose``."""

    def __init__(self, paths: List[nn.Module]):
        super().__init__()
        self.paths = nn.ModuleList(paths)

    def choose(self, x: torch.Tensor) -> torch.Tensor:
        """The branch index of every sample (N, long)."""
        raise NotImplementedError

    def choose_one(self, x: torch.Tensor) -> int:
        """The branch of the one sample ``x`` (a host read)."""
        return int(self.choose(x)[0])

    def forward(self, x: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        out = x  # overwritten below; a placeholder that allocates nothing (this runs per block and image)
        if n == 1:
            chosen = self.choose_one(x)
            for i, path in enumerate(self.paths):
                if i == chosen:
                    out = path(x, gate_logits)
            return out
        choice = self.choose(x)
        started = False
        for i, path in enumerate(self.paths):
            idx = (choice == i).nonzero().squeeze(1)
            if idx.numel() == n:
                out, started = path(x, gate_logits), True
            elif idx.numel() > 0:
                part = path(x.index_select(0, idx), gate_logits.index_select(0, idx))
                if not started:
                    out = part.new_zeros([n, part.shape[1], part.shape[2], part.shape[3]])
                    started = True
                out.index_copy_(0, idx, part)
        return out
