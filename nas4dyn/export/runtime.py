"""The exported model: a self-normalising wrapper around an extracted :class:`SubNet` that really skips work.

The wrapper takes float images in [0, 1] (what ``ToTensor`` gives), normalises them with the training
mean/std and runs the extracted subnet, whose inference emits samples at the exits they pass (batch
compaction), narrows convs to the filters the channel gates leave on, and runs skipped branches on no sample.
It carries what a user of ``model.ts`` needs to read its outputs (thresholds, gate layout), and is
TorchScript-scriptable so the control flow survives ``torch.jit.script``.
"""
# No `from __future__ import annotations` here: TorchScript reads the class annotations below as types.

import logging
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from nas4dyn.errors import ConfigError
from search_spaces.arch import Arch
from supernet.network import Supernet
from supernet.subnet import SubNet

log = logging.getLogger(__name__)


class ExportedModel(nn.Module):
    """A standalone dynamic classifier: ``forward(images in [0, 1]) -> logits`` from each sample's exit.

    Attributes (kept by TorchScript): ``channels``, ``resolution`` (the arch's; any input size is resized),
    ``num_classes``, ``thresholds`` (one per early exit), ``exit_names`` ("stage.block", then "final"),
    ``gate_blocks`` ("stage.block" of every gated block in network order), ``gate_kinds`` and
    ``gate_sizes`` (columns of :meth:`gate_decisions` per gated block).
    """

    # Declared on the class so that TorchScript keeps them even when empty (a static arch): it cannot infer
    # the element type of an empty list from its value.
    thresholds: List[float]
    exit_names: List[str]
    gate_blocks: List[str]
    gate_kinds: List[str]
    gate_sizes: List[int]

    def __init__(self, subnet: SubNet, mean: Sequence[float], std: Sequence[float], arch: Arch, channels: int):
        super().__init__()
        if len(mean) != channels or len(std) != channels:
            raise ConfigError(f"input normalisation: mean {list(mean)} / std {list(std)} need {channels} values, "
                              "one per input channel")
        if min(std) <= 0:
            raise ConfigError(f"input normalisation: std {list(std)} must be positive")
        self.subnet = subnet.eval()
        self.register_buffer("mean", torch.tensor([float(m) for m in mean]).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor([float(s) for s in std]).view(1, -1, 1, 1))
        self.channels: int = channels
        self.resolution: int = arch.resolution
        self.num_classes: int = subnet.num_classes
        self.thresholds: List[float] = [float(e.threshold) for e in arch.exits]
        self.exit_names: List[str] = [f"{e.stage}.{e.block}" for e in arch.exits] + ["final"]
        choices = list(arch.blocks())
        blocks = [blk for seg in subnet.segments for blk in seg.blocks]
        if len(blocks) != len(choices):
            raise RuntimeError(f"block layout mismatch: the arch has {len(choices)} blocks, the subnet {len(blocks)}")
        layout = [(c, blk, n) for c, blk, n in zip(choices, blocks, _decision_widths(subnet, channels)) if n > 0]
        self.gate_blocks: List[str] = [f"{c.stage}.{c.block}" for c, _, _ in layout]
        # A routed block (CIGT) reports its path choice; any other block its gate's decisions.
        self.gate_kinds: List[str] = ["route" if hasattr(blk, "router") else c.gate for c, blk, _ in layout]
        self.gate_sizes: List[int] = [n for _, _, n in layout]

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"expected images N x {self.channels} x H x W with values in [0, 1], "
                             f"got shape {list(x.shape)}")
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.subnet(self.normalise(x))

    @torch.jit.export
    def forward_with_exits(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(logits, index of the exit each sample left at; ``len(thresholds)`` is the final classifier)."""
        return self.subnet.forward_with_exits(self.normalise(x))

    @torch.jit.export
    def forward_all(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Logits of every exit, then the final classifier, for every sample (nothing skipped: for analysis)."""
        return self.subnet.forward_all(self.normalise(x))

    @torch.jit.export
    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        """N x D: the final classifier's input features (for analysis, e.g. gate patterns vs features)."""
        return self.subnet.penultimate(self.normalise(x))

    @torch.jit.export
    def gate_decisions(self, x: torch.Tensor) -> torch.Tensor:
        """N x sum(gate_sizes) binary decisions of every gate along the full path, in ``gate_blocks`` order."""
        return self.subnet.gate_decisions(self.normalise(x))


@torch.no_grad()
def _decision_widths(subnet: SubNet, channels: int) -> list[int]:
    """Columns of each block's gate decisions (0 for ungated blocks), read off a dummy forward pass."""
    x, gates = subnet._prepare(torch.zeros(1, channels, subnet.resolution, subnet.resolution))
    h = subnet.stem(x)
    widths = []
    for seg in subnet.segments:
        for blk in seg.blocks:
            widths.append(int(blk.decisions(h, gates).shape[1]))
            h = blk(h, gates)
    return widths


def input_normalisation(data_info: Optional[Mapping[str, Any]], channels: int) -> tuple[list[float], list[float]]:
    """(mean, std) from a run's data description; identity (0, 1) when there is none, with a warning."""
    if data_info and "mean" in data_info and "std" in data_info:
        return [float(v) for v in data_info["mean"]], [float(v) for v in data_info["std"]]
    log.warning("no data description given: the exported model will not normalise its input (mean 0, std 1); "
                "pass data_info from nas4dyn.api.load_supernet_file to normalise as in training")
    return [0.0] * channels, [1.0] * channels


def export_subnet(net: Supernet, arch: Arch, data_info: Optional[Mapping[str, Any]] = None) -> ExportedModel:
    """The standalone dynamic model of ``arch``: weights copied out of ``net``, eval mode, self-normalising.

    ``data_info`` is the run's data description (``load_supernet_file(path)[1]``); without it the net's own
    ``data_info`` attribute is used if it has one, else the input is not normalised (a warning says so).

    Raises:
        InvalidArchError: ``arch`` does not fit the supernet's space.
        ConfigError: the data description does not fit the input channels.
    """
    space = net.space
    info = data_info if data_info is not None else getattr(net, "data_info", None)
    mean, std = input_normalisation(info, space.input_channels)
    subnet = net.extract(arch)
    return ExportedModel(subnet, mean, std, arch, space.input_channels).eval()
