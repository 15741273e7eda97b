"""Execution paths of a dynamic subnet, and the costs of the parts along them.

A sample's *path* is the exit it leaves at and, for every gated block, its gate state: how many of the block's
gate units are on — filters for a channel gate, filters running the large kernel for an EMG gate, 0/1 for a
skip gate, the option (0 skip, 1 int8, 2 fp32) for a DFS gate. The path a CIGT router picks in a routed stage
does not change the cost (the paths are copies of one block), so it is not part of a path.

The MAC counter and the latency model both describe an arch as a list of :class:`Part` objects (a cost per
part, per gate state for gated blocks) and share the combination rules here: the full path, the cheapest
path, and each sample's realized path. :data:`GATES` says, per gate kind, how to read a state from
the supernet's ``gate_trace`` and how to force a state onto an extracted block.
"""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple, Optional

import numpy as np
import torch
from torch import nn

from nas4dyn.errors import ConfigError
from search_spaces.arch import Arch
from search_spaces.space import SearchSpace
from supernet.dynamic.cigt import RoutedBlock
from supernet.dynamic.dfs import DFS_OPTIONS, DFS_RELATIVE_COST
from supernet.dynamic.gates import GlobalGater
from supernet.network import GateTrace, Supernet
from supernet.static_blocks import StaticBlock
from supernet.subnet import SubNet

# Large enough that no activation crosses it: a forced gate decides the same for every input.
_FORCE = 1e30


def _force_channel(blk: StaticBlock, mask: torch.Tensor, gater: Optional[GlobalGater]) -> None:
    if gater is None:
        raise ConfigError("a channel-gated block is forced through its subnet's gater; none was given")
    gater.fc2.weight[blk.gate_start : blk.gate_end] = 0.0
    gater.fc2.bias[blk.gate_start : blk.gate_end] = torch.where(blk.gate_columns(mask), 1.0, -1.0).to(gater.fc2.bias)


def _force_option(decider: nn.Module, option: int) -> None:
    """Make an argmax-over-logits decider (skip gate, DFS gate, CIGT router) pick ``option``."""
    decider.fc2.weight.zero_()
    decider.fc2.bias.fill_(-1.0)
    if decider.fc2.out_features == 1:  # a skip gate: one logit, > 0 runs the branch
        decider.fc2.bias.fill_(1.0 if option else -1.0)
    else:
        decider.fc2.bias[option] = 1.0


def _force_emg(blk: StaticBlock, mask: torch.Tensor, gater: Optional[GlobalGater]) -> None:
    # The exported gate is on where (folded mean - threshold) x sign > 0 (see StaticBlock.emg_gates).
    blk.emg_threshold.copy_(torch.where(mask, -_FORCE, _FORCE).to(blk.emg_threshold) * blk.emg_sign)


def _force_width(blk: nn.Module, mask: torch.Tensor, gater: Optional[GlobalGater]) -> None:
    # The width option with the most filters not above the units on (the narrowest when none is).
    on = int(mask.sum())
    option = max([i for i, hidden in enumerate(blk.hiddens) if hidden <= on] or [0])
    _force_option(blk.gate, option)


def _states_sum(values: torch.Tensor) -> torch.Tensor:
    return values.reshape(len(values), -1).sum(1)


def _dfs_states(values: torch.Tensor) -> torch.Tensor:
    # The supernet traces a DFS choice as its relative cost; the state is the option's index.
    costs = torch.tensor(DFS_RELATIVE_COST, dtype=values.dtype, device=values.device)
    return (values.reshape(-1, 1) - costs).abs().argmin(dim=1).to(values.dtype)


def _dfs_rate(states: np.ndarray, units: int) -> float:
    return float(np.mean(np.asarray(DFS_RELATIVE_COST)[states.astype(int)]))


class GateKind(NamedTuple):
    """What the cost model needs to know about one kind of gate. A block's gate *state* is a number of units
    on (``units(hidden)`` at most): filters for per-filter gates, the branch for a skip gate, the option index
    (skip, int8, fp32) for DFS."""

    units: Callable[[int], int]
    force: Callable[[StaticBlock, torch.Tensor, Optional[GlobalGater]], None]  # in place, see force_gate
    # The block's own decision module, whose output only steers control flow (a trace of the block drops it
    # as dead code, so it is costed on its own); None when the decision is computed elsewhere or in the data
    # path (the channel gater is a part of its own; EMG's small-kernel response is also the output).
    decider: Callable[[StaticBlock], Optional[nn.Module]] = lambda blk: None
    states: Callable[[torch.Tensor], torch.Tensor] = _states_sum  # per-sample states from gate_trace values
    rate: Callable[[np.ndarray, int], float] = lambda states, units: float(states.mean() / units)
    # The state whose multiply-adds a state has: DFS's int8 branch runs the fp32 branch's convolutions in
    # int8 (same MACs, 1/16 of the BitOPs), and fvcore cannot see inside quantized convs.
    macs_as: Callable[[int], int] = lambda state: state
    # The states the costs are measured at (cost is linear between them): per-filter gates are linear in the
    # filters on, so none, one and all fix the line; a width gate takes only its options' filter counts.
    levels: Callable[[nn.Module, int], list[int]] = lambda blk, units: sorted({0, 1, units})


GATES: dict[str, GateKind] = {
    # Grouped channel gates open whole groups: the line through 0, the first group and all filters.
    "channel": GateKind(lambda hidden: hidden, _force_channel,
                        levels=lambda blk, units: sorted({0, int((blk.filter_group == 0).sum()) or 1, units})),
    "emg": GateKind(lambda hidden: hidden, _force_emg),
    "skip": GateKind(lambda hidden: 1, lambda blk, mask, gater: _force_option(blk.skip_gate, int(mask.sum())),
                     lambda blk: blk.skip_gate),
    # Reported rate: the mean BitOPs cost relative to fp32, as Supernet.gate_stats reports it.
    "dfs": GateKind(lambda hidden: len(DFS_OPTIONS) - 1,
                    lambda blk, mask, gater: _force_option(blk.dfs_gate, int(mask.sum())),
                    lambda blk: blk.dfs_gate, _dfs_states, _dfs_rate, lambda state: 2 if state == 1 else state),
    # A width gate's state is the hidden filters of its chosen width (a mask keeping the first ones).
    "width": GateKind(lambda hidden: hidden, _force_width, lambda blk: blk.gate,
                      levels=lambda blk, units: list(blk.hiddens)),
}


def gate_kind(name: str) -> GateKind:
    try:
        return GATES[name]
    except KeyError:
        raise ConfigError(f"gate kind {name!r} has no cost model yet (known: {sorted(GATES)}); "
                          "remove it from the space or add it to nas4dyn.cost.paths.GATES") from None


class BlockSlot(NamedTuple):
    """One active block of an arch: where it sits, which segment runs it, its gate units and CIGT paths."""

    name: str  # "stage.block", the key of gate statistics
    stage: int
    block: int
    segment: int  # index of the exit whose segment holds the block (the final classifier is len(exits))
    gate: str
    units: int  # most gate units on (see GateKind); 0 without a gate
    paths: int  # parallel paths of a routed (CIGT) stage, one runs per sample; 1 otherwise
    options: tuple[int, ...] = ()  # the only states the gate takes (a width gate's filter counts); () = any


def arch_layout(space: SearchSpace, arch: Arch) -> list[BlockSlot]:
    """The blocks of ``arch`` in network order with their segments and gate units."""
    positions = [(e.stage, e.block) for e in arch.exits]
    slots = []
    for blk in arch.blocks():
        segment = sum(pos < (blk.stage, blk.block) for pos in positions)
        units, options = 0, ()
        st, in_ch = space.stages[blk.stage], space.block_in_channels(blk.stage, blk.block)
        if blk.gate != "none":
            units = gate_kind(blk.gate).units(st.hidden_channels(blk.width, in_ch))
        if blk.gate == "width":
            options = tuple(st.hidden_channels(w, in_ch) for w in st.width_options(blk.width))
        slots.append(BlockSlot(f"{blk.stage}.{blk.block}", blk.stage, blk.block, segment, blk.gate, units,
                               arch.paths[blk.stage], options))
    return slots


def gater_rows(space: SearchSpace, layout: list[BlockSlot]) -> int:
    """Outputs of the extracted gater of an arch with this layout: one per group of ``space.gater.group``
    filters of each channel-gated block (its cost grows with them)."""
    group = space.gater.group
    return sum(-(-slot.units // group) for slot in layout if slot.gate == "channel")


def gated_slots(layout: list[BlockSlot]) -> list[BlockSlot]:
    return [slot for slot in layout if slot.gate != "none"]


def interpolate(levels: tuple[tuple[float, float], ...], x: np.ndarray | float) -> np.ndarray:
    """Piecewise-linear interpolation through ``(level, value)`` pairs sorted by level (constant outside)."""
    xs, ys = zip(*levels)
    return np.interp(x, xs, ys)


@dataclass(frozen=True)
class Part:
    """A piece of a subnet that runs for every sample reaching ``segment`` (exit index >= segment).

    ``levels`` maps gate units that are on to the part's cost, interpolated linearly between levels; a part
    with one level costs the same in every state. ``gate`` indexes the sample's gate states (None: no gate).
    """

    name: str
    segment: int
    levels: tuple[tuple[float, float], ...]
    gate: Optional[int] = None

    def cost(self, units: np.ndarray | float) -> np.ndarray:
        return interpolate(self.levels, units)

    @property
    def full(self) -> float:
        """Cost with every unit on (the last level)."""
        return float(self.levels[-1][1])

    @property
    def cheapest(self) -> float:
        return float(min(c for _, c in self.levels))


@dataclass
class SamplePaths:
    """Per-sample paths: ``exits[i]`` is the exit sample ``i`` left at (``num_exits`` = the final classifier),
    ``units[i, g]`` the units of gated block ``g`` that were on for it (decisions along the full path)."""

    exits: np.ndarray
    units: np.ndarray
    num_exits: int
    gated: list[BlockSlot]

    @classmethod
    def full_path(cls, layout: list[BlockSlot], num_exits: int) -> "SamplePaths":
        """One sample that leaves at the final classifier with every gate open."""
        gated = gated_slots(layout)
        return cls(np.array([num_exits]), np.array([[s.units for s in gated]], dtype=float).reshape(1, -1),
                   num_exits, gated)

    @classmethod
    def single(cls, layout: list[BlockSlot], num_exits: int, exit_index: int, units: list[float]) -> "SamplePaths":
        """One sample leaving at ``exit_index`` with ``units[g]`` units on in gated block ``g``.

        Raises:
            ConfigError: the exit or the number of gate states does not fit the arch.
        """
        gated = gated_slots(layout)
        if len(units) != len(gated) or not 0 <= exit_index <= num_exits:
            raise ConfigError(f"path: expected an exit in 0..{num_exits} and {len(gated)} gate states, "
                              f"got exit {exit_index} and {len(units)} states")
        return cls(np.array([exit_index]), np.asarray(units, dtype=float).reshape(1, -1), num_exits, gated)

    def __len__(self) -> int:
        return len(self.exits)

    def exit_rates(self) -> list[float]:
        """Share of samples leaving at each exit, the final classifier last."""
        counts = np.bincount(self.exits, minlength=self.num_exits + 1)
        return (counts / max(1, len(self))).tolist()

    def gate_rates(self) -> dict[str, float]:
        """Per gated block ("stage.block"): mean share of its units on (DFS: mean cost relative to fp32)."""
        return {s.name: gate_kind(s.gate).rate(self.units[:, g], s.units) for g, s in enumerate(self.gated)}


def path_contributions(parts: list[Part], paths: SamplePaths) -> dict[str, np.ndarray]:
    """Each part's cost for each sample along that sample's own path (0 where the sample left earlier)."""
    out = {}
    for part in parts:
        reached = paths.exits >= part.segment
        cost = part.cost(paths.units[:, part.gate]) if part.gate is not None else np.full(len(paths), part.full)
        out[part.name] = np.where(reached, cost, 0.0)
    return out


def full_cost(parts: list[Part]) -> float:
    """Everything runs: every gate open, every exit head evaluated, the final classifier reached."""
    return float(sum(p.full for p in parts))


def min_cost(parts: list[Part]) -> float:
    """Every sample leaves at the first exit (the final classifier if none) with the cheapest gate states."""
    return float(sum(p.cheapest for p in parts if p.segment == 0))


def gate_states(gate_trace: list[GateTrace], n: int) -> torch.Tensor:
    """N x G gate states (units on, see :class:`GateKind`) from a Supernet's ``gate_trace`` after an eval
    forward pass of ``n`` samples; it lists the gated blocks in network order."""
    per_gate = [gate_kind(t.kind).states(t.values) for t in gate_trace]
    return torch.stack(per_gate, 1) if per_gate else torch.zeros(n, 0)


@torch.no_grad()
def trace_paths(net: Supernet, arch: Arch, loader: Iterable) -> SamplePaths:
    """Run ``loader`` ((x, y) batches, already normalised) through the eval-mode ``net`` with ``arch`` active
    and record every sample's path. The net's active arch and mode are restored afterwards.

    Raises:
        ConfigError: the loader yields no samples.
    """
    gated = gated_slots(arch_layout(net.space, arch))
    device = net.device
    previous, was_training = net.active, net.training
    net.eval()
    net.set_active(arch)
    exits, units = [], []
    try:
        for batch in loader:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            _, idx = net.forward_with_exits(x.to(device))
            exits.append(idx.cpu().numpy())
            units.append(gate_states(net.gate_trace, len(x)).cpu().numpy())
    finally:
        net.set_active(previous)
        net.train(was_training)
    if sum(len(e) for e in exits) == 0:
        raise ConfigError("the data loader yielded no samples: pass a loader over a non-empty data split")
    return SamplePaths(np.concatenate(exits), np.concatenate(units).astype(float), len(arch.exits), gated)


def random_path(layout: list[BlockSlot], num_exits: int, rng: random.Random) -> tuple[int, list[torch.Tensor]]:
    """A random path: an exit, and per gated block a random on/off mask over its units (a width gate: the
    first filters of a random option)."""
    exit_index = rng.randint(0, num_exits)
    masks = []
    for slot in gated_slots(layout):
        mask = torch.zeros(slot.units, dtype=torch.bool)
        if slot.options:
            mask[: rng.choice(slot.options)] = True
        else:
            mask[rng.sample(range(slot.units), rng.randint(0, slot.units))] = True
        masks.append(mask)
    return exit_index, masks


@torch.no_grad()
def force_gate(blk: StaticBlock, mask: torch.Tensor, gater: Optional[GlobalGater] = None) -> None:
    """Make ``blk``'s gate decide ``mask`` for every input, in place (per-filter gates: the units on; skip and
    DFS: the state is ``mask.sum()``; width: the widest option with at most ``mask.sum()`` filters). Only the decision layer changes (weights to 0, biases or thresholds to
    fixed signs), so the block runs exactly the operations of an input taking this state. A channel gate
    lives in the subnet's ``gater``."""
    gate_kind(blk.gate_kind).force(blk, mask, gater)


@torch.no_grad()
def force_route(blk: RoutedBlock, path: int = 0) -> None:
    """Send every input of a routed block down ``path``: the paths are copies of one block and cost the same,
    and one path for all keeps a batch together as at batch 1."""
    _force_option(blk.router, path)


def block_gate(blk: nn.Module) -> str:
    """The gate kind of an extracted block ("none" for a routed block: routed stages are ungated)."""
    return getattr(blk, "gate_kind", "none")


def forced_block(blk: nn.Module, mask: torch.Tensor, batch: int = 1) -> tuple[nn.Module, torch.Tensor]:
    """A standalone extracted block whose gate takes ``mask`` for every input (a routed block: path 0), and
    the gate logits to call it with (channel gates read theirs from the logits; others are forced in a copy)."""
    kind = block_gate(blk)
    if kind == "channel":
        logits = torch.zeros(batch, blk.gate_end, device=mask.device)
        logits[:, blk.gate_start : blk.gate_end] = torch.where(blk.gate_columns(mask), 1.0, -1.0)
        return blk, logits
    no_logits = torch.zeros(batch, 0, device=mask.device)
    if kind == "none" and not isinstance(blk, RoutedBlock):
        return blk, no_logits
    forced = copy.deepcopy(blk)
    if isinstance(forced, RoutedBlock):
        force_route(forced)
    else:
        force_gate(forced, mask)
    return forced, no_logits


@torch.no_grad()
def force_path(sub: SubNet, exit_index: int, masks: list[torch.Tensor]) -> SubNet:
    """A copy of ``sub`` in which every input takes one path: it leaves at ``exit_index``, gated block ``g``
    is in the state ``masks[g]`` and routed blocks take path 0 — what latency is measured on."""
    forced = copy.deepcopy(sub)
    for i, seg in enumerate(forced.segments):
        if not seg.final:
            # Confidence lies in [0, 1]: -1 always leaves, 2 never does.
            seg.set_threshold(-1.0 if i == exit_index else 2.0)
    blocks = [blk for seg in forced.segments for blk in seg.blocks]
    gated = [blk for blk in blocks if block_gate(blk) != "none"]
    if len(gated) != len(masks):
        raise ConfigError(f"path has {len(masks)} gate masks but the subnet has {len(gated)} gated blocks")
    for blk, mask in zip(gated, masks):
        force_gate(blk, mask, forced.gater)
    for blk in blocks:
        if isinstance(blk, RoutedBlock):
            force_route(blk)
    return forced
