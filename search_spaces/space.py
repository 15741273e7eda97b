"""`SearchSpace`: sampling, validation and encoding of :class:`Arch` objects, and loading of space files."""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

import yaml

from nas4dyn.errors import InvalidArchError, SpaceError
from search_spaces.arch import Arch, ExitChoice
from search_spaces.schema import GATE_KINDS, SpaceSpec, parse_space

BUILTIN_DIR = Path(__file__).parent / "builtin"


@dataclasses.dataclass(frozen=True)
class SearchSpace(SpaceSpec):
    """A search space with the four verbs of a subnet: sample, validate, encode, and the extremes."""

    # ---- sampling -------------------------------------------------------------------------------------
    def sample(self, rng: random.Random, dynamic: bool = True) -> Arch:
        """A uniformly random subnet; with ``dynamic`` also random exits (with thresholds) and gates."""
        depths = tuple(rng.choice(st.depths) for st in self.stages)
        kernels = tuple(tuple(rng.choice(st.kernels) for _ in range(d)) for st, d in zip(self.stages, depths))
        widths = tuple(tuple(rng.choice(st.widths) for _ in range(d)) for st, d in zip(self.stages, depths))
        if not dynamic:
            return Arch(self.name, rng.choice(self.resolutions), depths, kernels, widths,
                        tuple(("none",) * d for d in depths))
        gates = tuple(
            tuple(rng.choice(self.allowed_gates(s, b, kernels[s][b], widths[s][b])) for b in range(d))
            for s, d in enumerate(depths)
        )
        exits = tuple(
            ExitChoice(s, b, rng.choice(self.exits.thresholds))
            for s, b in self.exits.positions
            if b < depths[s] and rng.random() < 0.5
        )
        resolution = rng.choice(self.resolutions)
        # Drawn last, and only where a stage offers a choice, so spaces without routing sample as before.
        paths = tuple(rng.choice(st.paths) if len(st.paths) > 1 else st.paths[0] for st in self.stages)
        gates = tuple(g if p == 1 else ("none",) * len(g) for g, p in zip(gates, paths))
        return Arch(self.name, resolution, depths, kernels, widths, gates, exits, paths)

    def _extreme(self, pick: Any) -> Arch:
        depths = tuple(pick(st.depths) for st in self.stages)
        return Arch(
            self.name,
            pick(self.resolutions),
            depths,
            tuple((pick(st.kernels),) * d for st, d in zip(self.stages, depths)),
            tuple((pick(st.widths),) * d for st, d in zip(self.stages, depths)),
            tuple(("none",) * d for d in depths),
            (),
            tuple(pick(st.paths) if 1 not in st.paths else 1 for st in self.stages),
        )

    def max_arch(self) -> Arch:
        """The largest static subnet: every choice at its maximum, no exits, no gates."""
        return self._extreme(max)

    def min_arch(self) -> Arch:
        """The smallest static subnet."""
        return self._extreme(min)

    # ---- checking -------------------------------------------------------------------------------------
    def arch_problems(self, arch: Arch) -> list[str]:
        """Every way ``arch`` does not fit this space (empty when it fits)."""
        problems: list[str] = []
        if arch.space != self.name:
            problems.append(f"arch.space: {arch.space!r} is not this space ({self.name!r})")
        if arch.resolution not in self.resolutions:
            problems.append(f"arch.resolution: {arch.resolution} is not one of {list(self.resolutions)}")
        if len(arch.depths) != len(self.stages):
            problems.append(f"arch.depths: needs {len(self.stages)} stages, got {len(arch.depths)}")
            return problems
        for s, (st, d) in enumerate(zip(self.stages, arch.depths)):
            if d not in st.depths:
                problems.append(f"arch.depths[{s}]: {d} is not one of {list(st.depths)}")
            if arch.paths[s] not in st.paths:
                problems.append(f"arch.paths[{s}]: {arch.paths[s]} is not one of {list(st.paths)}")
            elif arch.paths[s] > 1 and any(g != "none" for g in arch.gates[s]):
                problems.append(f"arch.gates[{s}]: a routed stage (paths {arch.paths[s]}) takes no gates, only 'none'")
        for blk in arch.blocks():
            st, where = self.stages[blk.stage], f"stage {blk.stage} block {blk.block}"
            if blk.block >= st.max_depth:
                continue
            if blk.kernel not in st.kernels:
                problems.append(f"arch.kernels ({where}): {blk.kernel} is not one of {list(st.kernels)}")
            if blk.width not in st.widths:
                problems.append(f"arch.widths ({where}): {blk.width} is not one of {list(st.widths)}")
            allowed = self.allowed_gates(blk.stage, blk.block, blk.kernel, blk.width)
            if blk.gate not in allowed:
                problems.append(
                    f"arch.gates ({where}, kernel {blk.kernel}): {blk.gate!r} is not one of {list(allowed)}"
                )
        for e in arch.exits:
            if (e.stage, e.block) not in self.exits.positions:
                allowed_pos = [list(p) for p in self.exits.positions]
                problems.append(f"arch.exits: [{e.stage}, {e.block}] is not a candidate position {allowed_pos}")
            elif e.block >= arch.depths[e.stage]:
                problems.append(
                    f"arch.exits: [{e.stage}, {e.block}] sits after an inactive block "
                    f"(stage {e.stage} has depth {arch.depths[e.stage]})"
                )
            if not 0.0 < e.threshold <= 1.0:
                problems.append(f"arch.exits: threshold {e.threshold} at [{e.stage}, {e.block}] is not in (0, 1]")
        return problems

    def validate(self, arch: Arch) -> Arch:
        """Return ``arch`` if it fits this space.

        Raises:
            InvalidArchError: (a ``ValueError``) naming every bad field and its allowed values.
        """
        problems = self.arch_problems(arch)
        if problems:
            raise InvalidArchError("; ".join(problems))
        return arch

    # ---- encoding -------------------------------------------------------------------------------------
    def encode(self, arch: Arch) -> list[float]:
        """A fixed-length vector in [0, 1] per entry: resolution, depths, per block slot (active, kernel,
        width, one-hot gate), per exit candidate (active, threshold). Inactive slots are zero."""

        def unit(value: float, choices: tuple) -> float:
            lo, hi = min(choices), max(choices)
            return 0.0 if hi == lo else (value - lo) / (hi - lo)

        vec = [unit(arch.resolution, self.resolutions)]
        for s, st in enumerate(self.stages):
            vec += [unit(arch.depths[s], st.depths), unit(arch.paths[s], st.paths)]
            for b in range(st.max_depth):
                if b < arch.depths[s]:
                    gate = arch.gates[s][b]
                    vec += [1.0, unit(arch.kernels[s][b], st.kernels), unit(arch.widths[s][b], st.widths)]
                    vec += [float(gate == k) for k in GATE_KINDS[1:]]
                else:
                    vec += [0.0] * (3 + len(GATE_KINDS) - 1)
        active = {(e.stage, e.block): e.threshold for e in arch.exits}
        for pos in self.exits.positions:
            vec += [float(pos in active), active.get(pos, 0.0)]
        return vec

    # ---- bookkeeping ----------------------------------------------------------------------------------
    def num_subnets(self, dynamic: bool = True) -> int:
        """Distinct subnet structures (exit thresholds are continuous and not counted)."""
        total = len(self.resolutions)
        for s, st in enumerate(self.stages):
            per_depth = 0
            for d in st.depths:
                ways = 1
                for b in range(d):
                    per_kernel = [len(self.allowed_gates(s, b, k)) if dynamic else 1 for k in st.kernels]
                    ways *= sum(per_kernel) * len(st.widths)
                routed = (len(st.paths) - 1) * (len(st.kernels) * len(st.widths)) ** d if dynamic else 0
                per_depth += ways + routed
            total *= per_depth
        if dynamic:
            total *= 2 ** len(self.exits.positions)  # an upper bound: some positions need a minimum depth
        return total

    def gate_offsets(self) -> dict[tuple[int, int], tuple[int, int]]:
        """Row range of each block's filter gates in the global gater's output (at maximum widths)."""
        offsets, start = {}, 0
        for s, st in enumerate(self.stages):
            for b in range(st.max_depth):
                n = st.hidden_channels(max(st.widths), self.block_in_channels(s, b))
                offsets[(s, b)] = (start, start + n)
                start += n
        return offsets

    def with_data(self, input_channels: int, num_classes: int) -> "SearchSpace":
        """The same space for a dataset with other channels or classes (they come from the data)."""
        return dataclasses.replace(self, input_channels=input_channels, num_classes=num_classes)


def builtin_spaces() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def space_from_dict(data: Any, source: str = "<space>") -> SearchSpace:
    return parse_space(data, source, cls=SearchSpace)


def load_space(name_or_path: str | Path) -> SearchSpace:
    """Load a built-in space by name, or a YAML/JSON space file by path.

    Raises:
        SpaceError: unknown name, unreadable file, or schema violations (all listed).
    """
    path = Path(name_or_path)
    if not path.suffix and str(name_or_path) in builtin_spaces():
        path = BUILTIN_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise SpaceError(
            f"unknown space {str(name_or_path)!r}: use a built-in name {builtin_spaces()} or a path to a space file"
        )
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise SpaceError(f"{path}: cannot read space file ({exc.__class__.__name__}: {exc})") from None
    if isinstance(data, dict) and "space" in data and "stages" not in data:
        data = data["space"]  # a run directory's space.json wraps the space
    return space_from_dict(data, str(path))

