"""On-device latency: the measured table of a space's parts, and the predictor built on it.

A :class:`LatencyTable` holds the median latency (ms) of every distinct part of a space on one device —
stem (with the input resize), gater, each block configuration per gate state, exit heads with their
confidence test, the classifier — together with the device fingerprint it was measured on and a linear
correction ``a * sum + b`` fitted to end-to-end measurements of random subnets. :class:`LatencyModel`
predicts a subnet's latency from it: the full path, any single path, or the expectation over a data split.
Tables are produced by ``nas4dyn profile`` (:func:`nas4dyn.cost.profiler.profile_space`).

Remote targets: run ``nas4dyn profile`` on the target device and copy the JSON to the machine that searches;
loading it there warns that the fingerprint differs, which is expected (pass ``check_device=False`` to
:meth:`LatencyModel.load` to silence it).
"""
from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from scipy.optimize import nnls

from nas4dyn.cost.paths import (Part, SamplePaths, arch_layout, gater_rows, interpolate, path_contributions,
                                trace_paths)
from nas4dyn.cost.timing import device_fingerprint, device_name, runtime_version  # noqa: F401  (device_name: benchlib)
from nas4dyn.errors import ConfigError, SpaceError
from nas4dyn.io import atomic_write_json
from search_spaces.arch import Arch
from search_spaces.space import SearchSpace, space_from_dict
from supernet.network import Supernet

log = logging.getLogger(__name__)

TABLE_FORMAT = "nas4dyn-latency/1"
# What identifies the device and software a table describes (with the version of the runtime's package: torch,
# or onnxruntime); threads, batch size and dtype are settings the table was measured with and that predictions
# assume.
DEVICE_FIELDS = ("device", "device_name", "machine")
# The fields that identify each kind of table entry; every entry also has a level (gate units on for a
# block, gater rows for the gater, 0 otherwise) and the measured ms.
KEY_FIELDS = {
    "stem": ("resolution",),
    "gater": ("resolution",),
    "block": ("resolution", "stage", "first", "kernel", "width", "gate", "paths"),
    "exit": ("resolution", "stage"),
    "classifier": ("resolution",),
    # A TorchScript profile times an exit in context: a small subnet without it (level 0) and with it (level 1);
    # the table keeps their difference as the exit's entry.
    "exit_context": ("resolution", "stage"),
}
# onnxruntime tables: the parts after an early exit timed inside an If, as the exported graph runs them
# (used for parts of segments > 0 where present), and the session call's own time ("call", taken off every
# entry when the table is built).
KEY_FIELDS.update({f"{kind}_nested": KEY_FIELDS[kind] for kind in ("block", "exit", "classifier")}, call=())


def fit_correction(sums: Sequence[float], measured: Sequence[float],
                   exit_sums: Optional[Sequence[float]] = None) -> tuple[float, float, float]:
    """``(a, b, exit_scale)`` of ``measured ≈ a * (sums + (exit_scale - 1) * exit_sums) + b``, least squares on
    the relative error (what validation scores), all three >= 0: an unconstrained fit to a few noisy subnets can
    take a negative intercept and then predict a negative latency for a path shorter than those it was fitted
    on. ``exit_sums`` are the parts of ``sums`` that are exit tests timed alone (an onnxruntime table's; None:
    exit_scale stays 1, as for TorchScript tables, which time exits inside a subnet): inside a whole model an
    exit test need not cost what the same test costs alone, so the fit scales them on their own."""
    s, y = np.asarray(sums, dtype=float), np.asarray(measured, dtype=float)
    if len(s) < 2:
        raise ConfigError(f"fitting the latency correction needs at least 2 measured subnets, got {len(s)}")
    if exit_sums is None or not np.any(exit_sums):
        (a, b), _ = nnls(np.stack([s / y, 1.0 / y], 1), np.ones_like(y))
        return float(a), float(b), 1.0
    e = np.asarray(exit_sums, dtype=float)
    (a, c, b), _ = nnls(np.stack([(s - e) / y, e / y, 1.0 / y], 1), np.ones_like(y))
    return float(a), float(b), float(c / a) if a > 0 else 1.0


def accuracy(predicted: Sequence[float], measured: Sequence[float], tolerance: float = 0.10) -> dict[str, float]:
    """Share of predictions within ``tolerance`` of measured, mean absolute percentage error, worst error."""
    p, m = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
    err = np.abs(p - m) / m
    return {
        "n": int(len(m)),
        "within_10pct": float(np.mean(err <= tolerance)),
        "mape_pct": float(100 * err.mean()),
        "worst_pct": float(100 * err.max()),
    }


@dataclass
class LatencyTable:
    """Measured latencies (ms) of every distinct part of a space on one device.

    ``levels`` maps an entry key (``("block", resolution, stage, first, kernel, width, gate, paths)`` and the like,
    see ``KEY_FIELDS``) to ``(level, ms)`` pairs, sorted by level. ``correction`` is ``(a, b)`` of the fitted
    ``a * table_sum + b``, where the table sum counts every exit test ``exit_scale`` times its measured ms (inside
    a whole model an exit test need not cost what it costs timed alone); ``calibration`` and ``validation``
    describe its end-to-end accuracy.
    """

    space: SearchSpace
    fingerprint: dict[str, Any]
    input_size: int
    levels: dict[tuple, tuple[tuple[float, float], ...]]
    correction: tuple[float, float] = (1.0, 0.0)
    exit_scale: float = 1.0
    calibration: dict[str, Any] = field(default_factory=dict)
    validation: Optional[dict[str, Any]] = None
    settings: dict[str, Any] = field(default_factory=dict)
    source: str = "<table>"

    # ---- lookups --------------------------------------------------------------------------------------
    def _in_segment(self, key: tuple, segment: int) -> tuple[tuple[float, float], ...]:
        """The levels of ``key`` for a part of ``segment``: after an exit, its nested entry where the table has
        one (an onnxruntime table: the exported graph runs those parts inside an If)."""
        nested = (f"{key[0]}_nested", *key[1:])
        return self._levels(nested if segment > 0 and nested in self.levels else key)

    def _levels(self, key: tuple) -> tuple[tuple[float, float], ...]:
        try:
            return self.levels[key]
        except KeyError:
            desc = ", ".join(f"{f}={v}" for f, v in zip(KEY_FIELDS[key[0]], key[1:]))
            raise ConfigError(
                f"latency table {self.source} has no {key[0]} entry for {desc}: re-run "
                f"`nas4dyn profile --space {self.space.name}` for this space"
            ) from None

    def parts(self, arch: Arch) -> list[Part]:
        """The parts of ``arch`` with their measured ms per gate state (see :mod:`nas4dyn.cost.paths`)."""
        self.space.validate(arch)
        r = arch.resolution
        layout = arch_layout(self.space, arch)
        parts = []
        rows = gater_rows(self.space, layout)
        if rows:
            parts.append(Part("gater", 0, ((0.0, float(interpolate(self._levels(("gater", r)), rows))),)))
        parts.append(Part("stem", 0, self._levels(("stem", r))))
        gate = 0
        for slot, blk in zip(layout, arch.blocks()):
            key = ("block", r, slot.stage, slot.block == 0, blk.kernel, blk.width, blk.gate, slot.paths)
            index = gate if blk.gate != "none" else None
            parts.append(Part(f"block.{slot.name}", slot.segment, self._in_segment(key, slot.segment), index))
            gate += blk.gate != "none"
        for i, e in enumerate(arch.exits):
            measured = self._in_segment(("exit", r, e.stage), i)
            levels = tuple((level, self.exit_scale * ms) for level, ms in measured)
            parts.append(Part(f"exit.{e.stage}.{e.block}", i, levels))
        parts.append(Part("classifier", len(arch.exits), self._in_segment(("classifier", r), len(arch.exits))))
        return parts

    # ---- JSON -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        entries = [
            {"part": key[0], **dict(zip(KEY_FIELDS[key[0]], key[1:])), "level": level, "ms": ms}
            for key, levels in self.levels.items()
            for level, ms in levels
        ]
        return {
            "format": TABLE_FORMAT,
            "fingerprint": self.fingerprint,
            "settings": self.settings,
            "input_size": self.input_size,
            "correction": {"a": self.correction[0], "b": self.correction[1], "exit_scale": self.exit_scale},
            "calibration": self.calibration,
            "validation": self.validation,
            "space": self.space.to_dict(),
            "entries": entries,
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "<table>") -> "LatencyTable":
        """Inverse of :meth:`to_dict`.

        Raises:
            ConfigError: not a nas4dyn latency table, or a malformed one.
        """
        if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
            raise ConfigError(f"{source}: not a nas4dyn latency table (expected format {TABLE_FORMAT}); "
                              "create one with `nas4dyn profile`")
        try:
            space = space_from_dict(data["space"], source)
            grouped: dict[tuple, list[tuple[float, float]]] = {}
            for e in data["entries"]:
                key = (e["part"], *(e[f] for f in KEY_FIELDS[e["part"]]))
                grouped.setdefault(key, []).append((float(e["level"]), float(e["ms"])))
            corr = data["correction"]
            return cls(
                space=space,
                fingerprint=dict(data["fingerprint"]),
                input_size=int(data["input_size"]),
                levels={k: tuple(sorted(v)) for k, v in grouped.items()},
                correction=(float(corr["a"]), float(corr["b"])),
                exit_scale=float(corr.get("exit_scale", 1.0)),  # tables before it was fitted: as measured
                calibration=dict(data.get("calibration") or {}),
                validation=data.get("validation"),
                settings=dict(data.get("settings") or {}),
                source=source,
            )
        except (KeyError, TypeError, ValueError, SpaceError) as exc:
            raise ConfigError(f"{source}: malformed latency table ({type(exc).__name__}: {exc}); "
                              "re-create it with `nas4dyn profile`") from None

    def save(self, path: str | Path) -> None:
        """Write the table as JSON, atomically."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "LatencyTable":
        """Read a table written by :meth:`save`.

        Raises:
            ConfigError: missing, unreadable or malformed file.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: cannot read latency table ({type(exc).__name__}); "
                              "create one with `nas4dyn profile --out` this path") from None
        return cls.from_dict(data, str(path))

    @property
    def runtime(self) -> str:
        """The runtime the table times (tables from before runtimes were recorded are TorchScript)."""
        return self.fingerprint.get("runtime", "torchscript")

    def check_runtime(self, runtime: str, flag: str) -> None:
        """Raises ConfigError when the table times another runtime than the deployment's ``runtime``."""
        if self.runtime != runtime:
            raise ConfigError(f"{flag}: the latency table {self.source} times {self.runtime}, but this deploys with "
                              f"{runtime}; profile with `nas4dyn profile --runtime {runtime}`")

    def missing_gates(self) -> list[str]:
        """"stage S: gate G" for every gate kind the space allows that the table has no block entry for (an
        onnxruntime table has none for gate kinds without an ONNX translation)."""
        have = {(key[2], key[6]) for key in self.levels if key[0] == "block"}
        want = {(s, g) for s, st in enumerate(self.space.stages) for b in range(st.max_depth) for k in st.kernels
                for g in self.space.allowed_gates(s, b, k)}
        return [f"stage {s}: gate {g!r}" for s, g in sorted(want - have)]

    def device_mismatch(self) -> list[str]:
        """How this machine differs from the table's device (empty when it matches)."""
        try:
            here = device_fingerprint(self.fingerprint.get("device", "cpu"), 0, 0, runtime=self.runtime)
        except ImportError:
            return [f"{self.runtime} is not installed here"]
        fields = DEVICE_FIELDS + tuple(runtime_version(self.runtime))
        return [f"{f} {self.fingerprint.get(f)!r} vs here {here[f]!r}" for f in fields
                if self.fingerprint.get(f) != here[f]]


class LatencyModel:
    """Latency predictor for one device: the sum of a subnet's table entries along a path, corrected by the
    fitted ``a * sum + b``. Predictions are in ms at the table's batch size and thread count."""

    def __init__(self, table: LatencyTable):
        self.table = table

    @classmethod
    def load(cls, path: str | Path, check_device: bool = True) -> "LatencyModel":
        """The model of a table file; warns when the table was measured on another device or torch version
        (expected for remote targets — then pass ``check_device=False``).

        Raises:
            ConfigError: missing or malformed table.
        """
        table = LatencyTable.load(path)
        mismatch = table.device_mismatch() if check_device else []
        if mismatch:
            message = (f"latency table {path} was measured on another device ({'; '.join(mismatch)}): its "
                       "predictions describe that device; re-run `nas4dyn profile` here for local latency")
            log.warning(message)
            warnings.warn(message, stacklevel=2)
        return cls(table)

    def _correct(self, ms: np.ndarray | float) -> np.ndarray:
        a, b = self.table.correction
        return a * np.asarray(ms, dtype=float) + b

    def table_sum(self, arch: Arch, paths: Optional[SamplePaths] = None, only: str = "") -> np.ndarray:
        """Uncorrected sums of table entries, one per sample path (one value, the full path, when ``paths``
        is None); ``only``: just the parts whose name starts with it (``"exit."``: the exit tests)."""
        parts = [p for p in self.table.parts(arch) if p.name.startswith(only)]
        if paths is None:
            paths = SamplePaths.full_path(arch_layout(self.table.space, arch), len(arch.exits))
        return np.sum([np.zeros(len(paths)), *path_contributions(parts, paths).values()], axis=0)

    def path_sum(self, arch: Arch, exit_index: Optional[int] = None, units: Sequence[float] = (),
                 only: str = "") -> float:
        """Uncorrected table sum of one path: leaving at ``exit_index`` with ``units[g]`` units on in gated
        block ``g`` (None: the full path); ``only`` as in :meth:`table_sum`."""
        if exit_index is None:
            return float(self.table_sum(arch, only=only)[0])
        gated = [s for s in arch_layout(self.table.space, arch) if s.gate != "none"]
        if len(units) != len(gated) or not 0 <= exit_index <= len(arch.exits):
            raise ConfigError(f"path: expected an exit in 0..{len(arch.exits)} and {len(gated)} gate states, "
                              f"got exit {exit_index} and {len(units)} states")
        paths = SamplePaths(np.array([exit_index]), np.asarray(units, dtype=float).reshape(1, -1),
                            len(arch.exits), gated)
        return float(self.table_sum(arch, paths, only)[0])

    def predict(self, arch: Arch) -> float:
        """ms of the full path: no early exit, every gate open."""
        return float(self._correct(self.path_sum(arch)))

    def predict_path(self, arch: Arch, exit_index: int, units: Sequence[float]) -> float:
        """ms of one path: leaving at ``exit_index`` with ``units[g]`` units on in gated block ``g``."""
        return float(self._correct(self.path_sum(arch, exit_index, units)))

    def predict_expected(self, net: Supernet, arch: Arch, loader: Iterable) -> float:
        """Expected ms over ``loader``'s data: Σ P(path) · latency(path), each sample's path (exit and gate
        decisions) measured with the eval-mode ``net``."""
        self.check_space(net.space)
        paths = trace_paths(net, arch, loader)
        return float(self._correct(self.table_sum(arch, paths)).mean())

    def check_space(self, space: SearchSpace) -> None:
        """Raises ConfigError when ``space`` is not the space the table was measured for (say, an edited
        version of it): its blocks would have other shapes than the ones timed."""
        mine, theirs = self.table.space.to_dict(), space.to_dict()
        mine.pop("description"), theirs.pop("description")
        if mine != theirs:
            raise ConfigError(f"latency table {self.table.source} was measured for another version of space "
                              f"{self.table.space.name!r}: re-run `nas4dyn profile --space` with this space")
