"""`Arch`: one point of a search space — a subnet with its exits and gates."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping, NamedTuple

from nas4dyn.errors import InvalidArchError

FORMAT_VERSION = 1


class ExitChoice(NamedTuple):
    """An early exit after block ``block`` of stage ``stage``; samples leave when confidence >= threshold."""

    stage: int
    block: int
    threshold: float


class BlockChoice(NamedTuple):
    """The choices of one active block."""

    stage: int
    block: int
    kernel: int
    width: int
    gate: str


@dataclass(frozen=True)
class Arch:
    """A frozen, hashable subnet description.

    Per-block tuples hold only the active blocks (``len(kernels[s]) == depths[s]``), so equal subnets
    compare equal. ``exits`` are sorted by position. ``paths[s]`` > 1 makes stage ``s`` a CIGT trellis: each
    of its blocks has that many parallel copies and a router picks one per sample (``()`` means all 1).
    """

    space: str
    resolution: int
    depths: tuple[int, ...]
    kernels: tuple[tuple[int, ...], ...]
    widths: tuple[tuple[int, ...], ...]
    gates: tuple[tuple[str, ...], ...]
    exits: tuple[ExitChoice, ...] = ()
    paths: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # Normalise lists (e.g. from JSON) into tuples so the object is hashable.
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "paths", tuple(int(p) for p in self.paths) or (1,) * len(self.depths))
        if len(self.paths) != len(self.depths):
            raise InvalidArchError(f"arch.paths: needs one entry per stage ({len(self.depths)}), got {list(self.paths)}")
        for name in ("kernels", "widths", "gates"):
            object.__setattr__(self, name, tuple(tuple(v) for v in getattr(self, name)))
        exits = tuple(sorted(ExitChoice(int(e[0]), int(e[1]), float(e[2])) for e in self.exits))
        object.__setattr__(self, "exits", exits)
        for name in ("kernels", "widths", "gates"):
            value = getattr(self, name)
            if len(value) != len(self.depths) or any(len(v) != d for v, d in zip(value, self.depths)):
                raise InvalidArchError(
                    f"arch.{name}: needs one entry per active block (depths {list(self.depths)}), "
                    f"got {[list(v) for v in value]}"
                )

    def blocks(self) -> Iterator[BlockChoice]:
        """Active blocks in network order."""
        for s, depth in enumerate(self.depths):
            for b in range(depth):
                yield BlockChoice(s, b, self.kernels[s][b], self.widths[s][b], self.gates[s][b])

    @property
    def is_dynamic(self) -> bool:
        return bool(self.exits) or any(p > 1 for p in self.paths) or any(g != "none" for st in self.gates for g in st)

    def without_dynamic(self) -> "Arch":
        """The same backbone with every exit, gate and router removed (routed stages keep their first path)."""
        return Arch(
            self.space,
            self.resolution,
            self.depths,
            self.kernels,
            self.widths,
            tuple(("none",) * d for d in self.depths),
            (),
        )

    def with_thresholds(self, thresholds: list[float] | tuple[float, ...]) -> "Arch":
        """A copy whose exits carry ``thresholds`` (one per exit, in order)."""
        if len(thresholds) != len(self.exits):
            raise InvalidArchError(f"arch.exits: {len(self.exits)} exits but {len(thresholds)} thresholds given")
        exits = tuple(ExitChoice(e.stage, e.block, float(t)) for e, t in zip(self.exits, thresholds))
        return Arch(self.space, self.resolution, self.depths, self.kernels, self.widths, self.gates, exits, self.paths)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "space": self.space,
            "resolution": self.resolution,
            "stages": [
                {
                    "depth": d,
                    "paths": self.paths[s],
                    "blocks": [
                        {"kernel": k, "width": w, "gate": g}
                        for k, w, g in zip(self.kernels[s], self.widths[s], self.gates[s])
                    ],
                }
                for s, d in enumerate(self.depths)
            ],
            "exits": [{"stage": e.stage, "block": e.block, "threshold": e.threshold} for e in self.exits],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Arch":
        """Inverse of :meth:`to_dict`.

        Raises:
            InvalidArchError: on a missing field or another format version.
        """
        if not isinstance(data, Mapping):
            raise InvalidArchError(f"arch: expected a JSON object, got {type(data).__name__}")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise InvalidArchError(f"arch.format_version: {version!r} is not supported (expected {FORMAT_VERSION})")
        try:
            stages = data["stages"]
            blocks = [st["blocks"] for st in stages]
            return cls(
                space=str(data["space"]),
                resolution=int(data["resolution"]),
                depths=tuple(int(st["depth"]) for st in stages),
                kernels=tuple(tuple(int(b["kernel"]) for b in bl) for bl in blocks),
                widths=tuple(tuple(int(b["width"]) for b in bl) for bl in blocks),
                gates=tuple(tuple(str(b.get("gate", "none")) for b in bl) for bl in blocks),
                exits=tuple(
                    ExitChoice(int(e["stage"]), int(e["block"]), float(e["threshold"]))
                    for e in data.get("exits", [])
                ),
                paths=tuple(int(st.get("paths", 1)) for st in stages),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, InvalidArchError):
                raise
            raise InvalidArchError(f"arch: malformed JSON ({type(exc).__name__}: {exc})") from None
