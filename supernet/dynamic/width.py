"""Width gates: dynamic slimming in the spirit of DS-Net (Li et al. 2021).

Per sample, a small head on the block's input picks one of at most four contiguous widths of the block: the
first k hidden filters in the supernet's importance order (the order :meth:`Supernet.sort_channels` sets), k
from the stage's width choices up to the block's width. In the supernet the choice is a mask over the hidden
filters (straight-through over a softmax in training), so it trains under the compute-budget loss like a
channel gate; the exported block holds each width as its own frozen static branch (BatchNorms folded by
freezing, weights pre-packed) and runs only the chosen one per sample: "the static path plus a decision".
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from supernet.dynamic.choice import OneOfBlock
from supernet.dynamic.gates import SkipGate


class WidthGate(SkipGate):
    """Pooled block input -> MLP -> one logit per width choice of the stage (a block uses the logits of its
    own options, a contiguous run of them)."""

    def __init__(self, in_ch: int, num_widths: int, hidden: int = 16):
        super().__init__(in_ch, hidden, outputs=num_widths)
        with torch.no_grad():  # start at the widest choices; the budget loss then narrows where it can
            self.fc2.bias.copy_(torch.linspace(0.0, 2.0, num_widths))

    @staticmethod
    def masks(logits: torch.Tensor, hiddens: List[int], hidden_max: int, training: bool) -> torch.Tensor:
        """N x ``hidden_max`` filter masks from N x options logits: the first ``hiddens[choice]`` filters on
        (straight-through over the softmax in training)."""
        table = torch.arange(hidden_max, device=logits.device)[None, :] < torch.tensor(hiddens, device=logits.device)[:, None]
        hard = F.one_hot(logits.argmax(dim=1), len(hiddens)).to(logits.dtype)
        if training:
            soft = torch.softmax(logits, dim=1)
            hard = hard + soft - soft.detach()
        return hard @ table.to(logits.dtype)

    def choose(self, x: torch.Tensor, first: int, hiddens: List[int], hidden_max: int, training: bool) -> torch.Tensor:
        """Per-sample filter masks (N x ``hidden_max``; relaxed in training) over the options whose logits start
        at ``first``."""
        return self.masks(self(x)[:, first : first + len(hiddens)], hiddens, hidden_max, training)

    def sliced(self, first: int, count: int) -> "WidthGate":
        """A standalone copy whose logits are the options ``first .. first + count - 1`` only."""
        gate = WidthGate(self.fc1.in_features, count, self.fc1.out_features)
        with torch.no_grad():
            gate.fc1.load_state_dict(self.fc1.state_dict())
            gate.fc2.weight.copy_(self.fc2.weight[first : first + count])
            gate.fc2.bias.copy_(self.fc2.bias[first : first + count])
        return gate.train(self.training)


class WidthGatedBlock(OneOfBlock):
    """Standalone width-gated block: ``paths[i]`` is the block extracted at the i-th width (``hiddens[i]``
    hidden filters), and ``gate`` picks one per sample. Decisions are reported as the filter mask (the first
    k of the widest option's filters on), as a channel gate's. TorchScript-friendly."""

    def __init__(self, gate: WidthGate, branches: List[nn.Module], hiddens: List[int]):
        super().__init__(branches)
        self.gate = gate
        self.gate_kind = "width"
        self.hiddens = hiddens
        self.register_buffer("masks", torch.arange(max(hiddens))[None, :] < torch.tensor(hiddens)[:, None])

    def choose(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate.logits(x).argmax(dim=1)

    def choose_one(self, x: torch.Tensor) -> int:
        return int(self.gate.one_sample_logits(x).argmax())  # 1 x options: the flat argmax is the row's

    def decisions(self, x: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
        return self.masks.index_select(0, self.choose(x))
