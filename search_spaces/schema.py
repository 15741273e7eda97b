"""Typed description of a search space, parsed from a YAML/JSON mapping.

A space says what may vary: input resolutions, and per stage the block type, depths, kernel sizes, widths
and the gate kinds allowed on its blocks; where early exits may sit and the exit head's shape; the global
gater's shape. :func:`parse_space` checks a mapping against this schema and reports every problem at once.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from nas4dyn.errors import SpaceError

BLOCK_TYPES = ("basic", "mbconv")
GATE_KINDS = ("none", "channel", "skip", "emg", "dfs", "width")
MAX_WIDTH_OPTIONS = 4  # a width gate picks among at most this many widths (the largest up to the block's)
EMG_MIN_KERNEL = 5  # the small kernel is the (k-2) x (k-2) centre, so k >= 5
EXIT_CRITERIA = ("max_softmax", "entropy")
BINARIZERS = ("semhash", "gumbel")
ACTIVATIONS = ("relu", "hswish")


@dataclass(frozen=True)
class StageSpec:
    """One stage: ``depths`` blocks of ``block`` type; all blocks of a stage output ``out_channels``.

    ``widths`` are the hidden-channel choices of a block: channel counts for ``basic`` blocks, expand
    ratios (hidden = ratio x block input channels) for ``mbconv`` blocks.
    """

    block: str
    out_channels: int
    stride: int
    depths: tuple[int, ...]
    kernels: tuple[int, ...]
    widths: tuple[int, ...]
    gates: tuple[str, ...] = ("none",)
    act: str = "relu"
    paths: tuple[int, ...] = (1,)  # CIGT: parallel paths per block, one chosen per sample by a router

    @property
    def max_depth(self) -> int:
        return max(self.depths)

    def hidden_channels(self, width: int, in_channels: int) -> int:
        """Hidden channels of a block with width choice ``width`` and ``in_channels`` inputs."""
        return width * in_channels if self.block == "mbconv" else width

    def width_options(self, width: int) -> tuple[int, ...]:
        """The widths a ``width`` gate on a block of width ``width`` picks from: the stage's width choices up
        to ``width``, the largest :data:`MAX_WIDTH_OPTIONS` of them, narrowest first."""
        return tuple(w for w in self.widths if w <= width)[-MAX_WIDTH_OPTIONS:]


@dataclass(frozen=True)
class ExitSpec:
    """Where early exits may sit (``(stage, block)`` pairs) and the shape of their heads."""

    positions: tuple[tuple[int, int], ...] = ()
    hidden: int = 64
    criterion: str = "max_softmax"
    thresholds: tuple[float, ...] = (0.8, 0.9, 0.95, 0.99)


@dataclass(frozen=True)
class GaterSpec:
    """The GaterNet-style global gater: stride-2 convs of ``channels``, pooled, then an FC of ``hidden``.

    ``group``: filters gated together, in runs of ``group`` consecutive filters of a block (the last run of a
    block may be shorter) — one gate logit per run, so a narrowed conv keeps multiples of ``group`` filters
    (vector-friendly widths). 1 (the default) is GaterNet's one gate per filter."""

    channels: tuple[int, ...] = (8, 16)
    hidden: int = 32
    binarizer: str = "semhash"
    group: int = 1


@dataclass(frozen=True)
class SpaceSpec:
    """The data of a whole search space. :class:`search_spaces.space.SearchSpace` adds the methods that
    sample, check and encode :class:`~search_spaces.arch.Arch` objects."""

    name: str
    input_channels: int
    num_classes: int
    resolutions: tuple[int, ...]
    stem_channels: int
    stem_stride: int
    stages: tuple[StageSpec, ...]
    exits: ExitSpec = field(default_factory=ExitSpec)
    gater: GaterSpec = field(default_factory=GaterSpec)
    head_channels: int = 0
    description: str = ""

    def stage_in_channels(self, stage: int) -> int:
        return self.stem_channels if stage == 0 else self.stages[stage - 1].out_channels

    def block_in_channels(self, stage: int, block: int) -> int:
        return self.stage_in_channels(stage) if block == 0 else self.stages[stage].out_channels

    def has_identity_shortcut(self, stage: int, block: int) -> bool:
        """Whether the block adds its input unchanged (needed by skip gates)."""
        st = self.stages[stage]
        if block > 0:
            return True
        return st.stride == 1 and self.stage_in_channels(stage) == st.out_channels

    def allowed_gates(self, stage: int, block: int, kernel: int | None = None,
                      width: int | None = None) -> tuple[str, ...]:
        """Gate kinds allowed on a block: skip and DFS gates need an identity shortcut (skipping leaves the
        input); EMG and DFS gates need a basic block, EMG also a kernel of at least 5 (with ``kernel`` None:
        some kernel choice of the stage); width gates need two width options, i.e. a stage with more than one
        width choice and (with ``width``) a block wider than the narrowest (else the gate could pick nothing)."""
        st = self.stages[stage]
        banned = set()
        if not self.has_identity_shortcut(stage, block):
            banned |= {"skip", "dfs"}
        if st.block != "basic":
            banned |= {"emg", "dfs"}
        if (max(st.kernels) if kernel is None else kernel) < EMG_MIN_KERNEL:
            banned.add("emg")
        if len(st.widths) < 2 or (width is not None and len(st.width_options(width)) < 2):
            banned.add("width")
        kinds = tuple(k for k in st.gates if k not in banned)
        return kinds if "none" in kinds else ("none",) + kinds

    @property
    def uses_gater(self) -> bool:
        return any("channel" in st.gates for st in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_choice(problems: list[str], where: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        problems.append(f"{where}: {value!r} is not one of {list(allowed)}")


def _positive_ints(
    problems: list[str], where: str, value: Any, minimum: int = 1, choices: bool = True
) -> tuple[int, ...]:
    """A list of integers; ``choices`` lists are sorted and de-duplicated, others keep their order."""
    if not isinstance(value, (list, tuple)) or not value:
        problems.append(f"{where}: expected a non-empty list of integers >= {minimum}, got {value!r}")
        return ()
    bad = [v for v in value if not isinstance(v, int) or isinstance(v, bool) or v < minimum]
    if bad:
        problems.append(f"{where}: expected integers >= {minimum}, got {bad!r}")
        return ()
    return tuple(sorted(set(value))) if choices else tuple(value)


def _int(problems: list[str], where: str, value: Any, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        problems.append(f"{where}: expected an integer >= {minimum}, got {value!r}")
        return minimum
    return value


def _unknown_keys(problems: list[str], where: str, data: Mapping, cls: type) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            problems.append(f"{where}.{key}: unknown field (known: {sorted(known)})")


def _parse_stage(problems: list[str], i: int, raw: Any) -> StageSpec | None:
    where = f"stages[{i}]"
    if not isinstance(raw, Mapping):
        problems.append(f"{where}: expected a mapping, got {raw!r}")
        return None
    _unknown_keys(problems, where, raw, StageSpec)
    block = raw.get("block", "basic")
    _check_choice(problems, f"{where}.block", block, BLOCK_TYPES)
    kernels = _positive_ints(problems, f"{where}.kernels", raw.get("kernels"))
    if any(k % 2 == 0 for k in kernels):
        problems.append(f"{where}.kernels: kernel sizes must be odd, got {list(kernels)}")
    gates = tuple(raw.get("gates", ["none"]))
    for g in gates:
        _check_choice(problems, f"{where}.gates", g, GATE_KINDS)
    act = raw.get("act", "relu")
    _check_choice(problems, f"{where}.act", act, ACTIVATIONS)
    return StageSpec(
        block=block,
        out_channels=_int(problems, f"{where}.out_channels", raw.get("out_channels")),
        stride=_int(problems, f"{where}.stride", raw.get("stride", 1)),
        depths=_positive_ints(problems, f"{where}.depths", raw.get("depths")),
        kernels=kernels,
        widths=_positive_ints(problems, f"{where}.widths", raw.get("widths")),
        gates=gates,
        act=act,
        paths=_positive_ints(problems, f"{where}.paths", raw.get("paths", [1])),
    )


def _parse_exits(problems: list[str], raw: Any, stages: tuple[StageSpec, ...]) -> ExitSpec:
    raw = raw or {}
    _unknown_keys(problems, "exits", raw, ExitSpec)
    positions = []
    for j, pos in enumerate(raw.get("positions", [])):
        ok = isinstance(pos, (list, tuple)) and len(pos) == 2 and all(isinstance(v, int) for v in pos)
        if not ok or not (0 <= pos[0] < len(stages)) or not (0 <= pos[1] < stages[pos[0]].max_depth):
            problems.append(f"exits.positions[{j}]: {pos!r} is not a [stage, block] inside the stages")
            continue
        positions.append((pos[0], pos[1]))
    criterion = raw.get("criterion", "max_softmax")
    _check_choice(problems, "exits.criterion", criterion, EXIT_CRITERIA)
    thresholds = tuple(float(t) for t in raw.get("thresholds", ExitSpec.thresholds))
    if any(not 0.0 < t <= 1.0 for t in thresholds):
        problems.append(f"exits.thresholds: each must be in (0, 1], got {list(thresholds)}")
    return ExitSpec(
        positions=tuple(sorted(set(positions))),
        hidden=_int(problems, "exits.hidden", raw.get("hidden", 64)),
        criterion=criterion,
        thresholds=thresholds,
    )


def _parse_gater(problems: list[str], raw: Any) -> GaterSpec:
    raw = raw or {}
    _unknown_keys(problems, "gater", raw, GaterSpec)
    binarizer = raw.get("binarizer", "semhash")
    _check_choice(problems, "gater.binarizer", binarizer, BINARIZERS)
    return GaterSpec(
        channels=_positive_ints(problems, "gater.channels", raw.get("channels", [8, 16]), choices=False),
        hidden=_int(problems, "gater.hidden", raw.get("hidden", 32)),
        binarizer=binarizer,
        group=_int(problems, "gater.group", raw.get("group", 1)),
    )


def parse_space(data: Mapping[str, Any], source: str = "<space>", cls: type = SpaceSpec) -> Any:
    """Build a ``cls`` (a :class:`SpaceSpec` subclass) from a mapping.

    Raises:
        SpaceError: listing every schema violation found, each naming its field.
    """
    if not isinstance(data, Mapping):
        raise SpaceError(f"{source}: a space must be a mapping, got {type(data).__name__}")
    problems: list[str] = []
    _unknown_keys(problems, "space", data, SpaceSpec)
    raw_stages = data.get("stages")
    if not isinstance(raw_stages, (list, tuple)) or not raw_stages:
        problems.append("stages: expected a non-empty list of stages")
        raw_stages = []
    stages = tuple(s for i, r in enumerate(raw_stages) if (s := _parse_stage(problems, i, r)) is not None)
    name = data.get("name")
    if not isinstance(name, str) or not name:
        problems.append(f"name: expected a non-empty string, got {name!r}")
    space = cls(
        name=str(name),
        input_channels=_int(problems, "input_channels", data.get("input_channels", 3)),
        num_classes=_int(problems, "num_classes", data.get("num_classes"), minimum=2),
        resolutions=_positive_ints(problems, "resolutions", data.get("resolutions"), minimum=8),
        stem_channels=_int(problems, "stem_channels", data.get("stem_channels")),
        stem_stride=_int(problems, "stem_stride", data.get("stem_stride", 1)),
        stages=stages,
        exits=_parse_exits(problems, data.get("exits"), stages),
        gater=_parse_gater(problems, data.get("gater")),
        head_channels=_int(problems, "head_channels", data.get("head_channels", 0), minimum=0),
        description=str(data.get("description", "")),
    )
    if problems:
        raise SpaceError(f"{source}: " + "; ".join(problems))
    return space
