"""Subnet sampling for sandwich steps: a pure function of (seed, phase, step).

Every distributed rank calls :func:`sandwich` with the same arguments and gets the same subnets, so no
communication is needed, and a resumed run samples exactly what the uninterrupted run would have.
"""
from __future__ import annotations

import random
from typing import NamedTuple

from search_spaces.arch import Arch, ExitChoice
from search_spaces.space import SearchSpace


class Sampled(NamedTuple):
    """One subnet of a sandwich step; ``role`` is ``max``, ``min`` or ``random``."""

    role: str
    arch: Arch


def step_rng(seed: int, phase: int, step: int) -> random.Random:
    # String seeds are hashed with SHA-512 by ``random.Random``: stable across processes and Python runs
    # (unlike ``hash()``), and distinct for every (seed, phase, step).
    return random.Random(f"nas4dyn-sandwich/{seed}/{phase}/{step}")


def _blocks(values: tuple, sampled_depth: int, depth: int, keep: bool, default: object) -> tuple:
    """Per-block choices for ``depth`` blocks: the sampled ones if ``keep``, ``default`` elsewhere."""
    return tuple(values[b] if keep and b < sampled_depth else default for b in range(depth))


def restrict(space: SearchSpace, arch: Arch, elastic: frozenset[str] | set[str]) -> Arch:
    """``arch`` with every dimension outside ``elastic`` set to its maximum (exits and gates: none; one
    path per stage)."""
    top = space.max_arch()
    depths = arch.depths if "depth" in elastic else top.depths
    kernels, widths, gates = [], [], []
    for s, (st, d) in enumerate(zip(space.stages, depths)):
        kernels.append(_blocks(arch.kernels[s], arch.depths[s], d, "kernel" in elastic, max(st.kernels)))
        widths.append(_blocks(arch.widths[s], arch.depths[s], d, "width" in elastic, max(st.widths)))
        gates.append(_blocks(arch.gates[s], arch.depths[s], d, "gates" in elastic, "none"))
    exits = tuple(e for e in arch.exits if e.block < depths[e.stage]) if "exits" in elastic else ()
    resolution = arch.resolution if "resolution" in elastic else top.resolution
    paths = arch.paths if "paths" in elastic else ()
    return space.validate(Arch(space.name, resolution, depths, tuple(kernels), tuple(widths), tuple(gates), exits,
                               paths))


def all_exits(space: SearchSpace, arch: Arch, threshold: float) -> Arch:
    """``arch`` with an exit at every candidate position its depths allow (so every head trains)."""
    exits = tuple(ExitChoice(s, b, threshold) for s, b in space.exits.positions if b < arch.depths[s])
    return Arch(space.name, arch.resolution, arch.depths, arch.kernels, arch.widths, arch.gates, exits)


def gated(space: SearchSpace, arch: Arch, kind: str = "channel") -> Arch:
    """``arch`` with a ``kind`` gate on every block that allows one (the others keep theirs)."""
    gates = tuple(
        tuple(kind if kind in space.allowed_gates(s, b, k, w) else g for b, (g, k, w) in enumerate(zip(gs, ks, ws)))
        for s, (gs, ks, ws) in enumerate(zip(arch.gates, arch.kernels, arch.widths))
    )
    return Arch(space.name, arch.resolution, arch.depths, arch.kernels, arch.widths, gates, arch.exits)


def extremes(space: SearchSpace, elastic: frozenset[str] | set[str], threshold: float) -> tuple[Arch, Arch]:
    """The (max, min) subnets of a phase. With elastic exits both carry every exit, so each step trains all
    heads; gates stay off in both (the max subnet is the distillation teacher's backbone)."""
    top, bottom = space.max_arch(), restrict(space, space.min_arch(), elastic)
    if "exits" in elastic:
        top, bottom = all_exits(space, top, threshold), all_exits(space, bottom, threshold)
    return top, bottom


def sandwich(space: SearchSpace, elastic: frozenset[str] | set[str], num_random: int, seed: int, phase: int,
             step: int, threshold: float) -> list[Sampled]:
    """The subnets of one step: the max subnet, then (if anything is elastic) the min subnet and
    ``num_random`` random subnets drawn with ``space.sample`` and restricted to the elastic dimensions."""
    top, bottom = extremes(space, elastic, threshold)
    if not elastic:
        return [Sampled("max", top)]
    rng = step_rng(seed, phase, step)
    dynamic = bool({"exits", "gates", "paths"} & set(elastic))
    randoms = [Sampled("random", restrict(space, space.sample(rng, dynamic=dynamic), elastic))
               for _ in range(num_random)]
    return [Sampled("max", top), Sampled("min", bottom), *randoms]
