"""Typed training configuration: presets, YAML files and ``KEY=VALUE`` overrides, validated all at once.

A config is built in three layers: a preset (:data:`PRESETS`), then an optional YAML file, then overrides
from the command line. Every layer uses the same keys; phases are addressed by name (``phases.width.lr``).
:func:`build_config` reports every bad value in one :class:`~nas4dyn.errors.ConfigError`.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from nas4dyn.errors import ConfigError
from nas4dyn.train.precision import PRECISIONS

# Dimensions a phase can make elastic; the others stay at their maximum (exits, gates: off; paths: one).
DIMENSIONS = ("resolution", "kernel", "depth", "width", "exits", "gates", "paths")


@dataclass
class PhaseConfig:
    """One phase of progressive shrinking: how long, how fast, and which dimensions are sampled."""

    name: str
    epochs: float
    lr: float
    elastic: list[str] = field(default_factory=list)
    warmup_epochs: float = 0.0
    # At least this many optimizer steps, whatever the dataset size: a few thousand images make an epoch a
    # handful of steps, too few for a phase to do anything (the warmup keeps its share of the phase).
    min_steps: int = 0
    # Re-order hidden channels by importance before the phase (when width first becomes elastic).
    sort_channels: bool = False
    # This phase's own value of the global key of the same name (None: the global value).
    augment: Optional[bool] = None
    weight_decay: Optional[float] = None


@dataclass
class TrainConfig:
    """Everything that decides what training computes (threads and devices do not belong here)."""

    phases: list[PhaseConfig]
    batch_size: int = 256  # global batch: split evenly across distributed ranks
    num_random: int = 1  # random subnets per sandwich step, besides the max and min subnets
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-5
    label_smoothing: float = 0.0
    augment: bool = True  # random crop and flip; short runs converge faster without
    random_erasing: float = 0.0  # probability of erasing a random rectangle of an augmented image
    grad_clip: float = 0.0  # max global gradient norm; 0 = off
    final_lr_fraction: float = 0.0  # cosine decay within each phase ends at lr * this
    kd_ratio: float = 1.0  # in-place distillation weight (students: CE + kd_ratio * KD)
    kd_temperature: float = 1.0
    dynamic_lr_scale: float = 10.0  # learning-rate multiplier of exit heads, gates and routers
    exit_weight: float = 1.0  # weight of the mean exit loss
    exit_kd_alpha: float = 0.5  # exit loss = (1 - alpha) CE + alpha KD from the final classifier
    budget_target: float = 0.6  # target share of gated MACs that gates keep on
    budget_weight: float = 10.0
    block_budget_weight: float = 0.0  # per-gate pull toward budget_target (ConvNet-AIG): against collapsed gates
    # CIGT routing: information-gain loss weight, its path-balance coefficient (above 1, so that a router
    # collapsed onto one path loses to a balanced one), and the router's softmax temperature, annealed
    # geometrically from start to end over each phase that samples paths.
    ig_weight: float = 2.0
    ig_balance: float = 2.0
    router_temperature_start: float = 2.0
    router_temperature_end: float = 0.25
    eval_threshold: float = 0.9  # exit threshold of the dynamic probe subnets evaluated after each phase
    bn_recal_images: int = 2000
    val_images: int = 0  # validation images measured after each phase (0: the whole validation split)
    checkpoint_every: int = 200  # steps; a checkpoint is also written at every phase end
    # fp32, bf16 (autocast) or auto: bf16 where the device has native bf16 (AMX, AVX512-BF16, CUDA)
    precision: str = "fp32"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def augments(self, phase: PhaseConfig) -> bool:
        """Whether ``phase`` trains on augmented images."""
        return self.augment if phase.augment is None else phase.augment

    def weight_decay_of(self, phase: PhaseConfig) -> float:
        """The weight decay of ``phase``."""
        return self.weight_decay if phase.weight_decay is None else phase.weight_decay


def _phase(name: str, epochs: float, lr: float, elastic: list[str], min_steps: int, **kw: Any) -> dict[str, Any]:
    return {"name": name, "epochs": epochs, "lr": lr, "elastic": elastic, "min_steps": min_steps, **kw}


_ALL = list(DIMENSIONS)
_STATIC = ["resolution", "kernel", "depth", "width"]

# Presets, tuned on Fashion-MNIST with the fmnist space on 2 CPU cores (see docs/BENCHMARKS.md). Phases are in
# epochs with a floor in steps (min_steps) just below what Fashion-MNIST's 421 steps per epoch give, so its
# runs are unchanged and a small dataset trains each phase about as long as Fashion-MNIST does.
PRESETS: dict[str, dict[str, Any]] = {
    # One epoch of the max subnet, then short progressive-shrinking phases at a low rate (the dynamic parts
    # learn at dynamic_lr_scale x): the whole run fits about 5.5 minutes.
    "quick": {
        "batch_size": 128,
        "num_random": 1,
        "augment": False,
        # The dynamic phase is ~80 steps, in which each gate kind sits in a fraction of the random subnets:
        # gates, routers and exit heads learn 40x faster than the backbone, and each gate is pulled toward the
        # budget on its own (else they stay open, or one closes for every input while the others stay open).
        "dynamic_lr_scale": 40.0,
        "block_budget_weight": 10.0,
        "bn_recal_images": 1000,
        "val_images": 2000,  # per-phase probes on 2000 of the 5000 validation images: 35 s less in 6 minutes
        "checkpoint_every": 100,
        "precision": "auto",
        "phases": [
            _phase("full", 1.0, 0.1, [], 400, warmup_epochs=0.03),
            _phase("kernel", 0.04, 0.005, ["resolution", "kernel"], 16),
            _phase("depth", 0.04, 0.005, ["resolution", "kernel", "depth"], 16),
            _phase("width", 0.05, 0.005, _STATIC, 20, sort_channels=True),
            _phase("dynamic", 0.2, 0.01, _ALL, 80),
        ],
    },
    # About 40 minutes on 2 CPU cores for the fmnist space (bf16 autocast where the CPU has AMX or
    # AVX512-BF16). Most of the time goes to the max subnet alone, with augmentation (crop, flip, random
    # erasing) and weight decay 5e-4 (without them it plateaus near 92.2% val by 8 epochs, its train loss near
    # 0.03), then short shrinking phases at a low rate, without augmentation and with three random subnets per
    # step besides the max and min: with one, the min subnet (trained every step) ranked above every subnet up to
    # 19 MMACs and the supernet ranked subnets as training from scratch does at Kendall tau 0.50; with three,
    # 0.71, the min subnet +0.5 points test, the max unchanged, ~4 more minutes (docs/BENCHMARKS.md, "Ranking"
    # and "Training (default preset)").
    "default": {
        "batch_size": 128,
        "num_random": 3,
        "augment": False,
        "random_erasing": 0.5,
        "block_budget_weight": 10.0,
        "precision": "auto",
        "phases": [
            _phase("full", 16.0, 0.1, [], 2000, warmup_epochs=0.2, augment=True, weight_decay=5e-4),
            _phase("kernel", 0.4, 0.01, ["resolution", "kernel"], 160),
            _phase("depth", 0.4, 0.01, ["resolution", "kernel", "depth"], 160),
            _phase("width", 0.6, 0.01, _STATIC, 250, sort_channels=True),
            _phase("dynamic", 1.0, 0.01, _ALL, 400),
        ],
    },
}


# `--preset auto`: below this many training images the default preset's 16 epochs shrink to its 2,000-step
# floor, i.e. hundreds of passes over the same images for about a third of its Fashion-MNIST time; quick's
# floors give a small dataset Fashion-MNIST's quick schedule (about 2 minutes) instead.
AUTO_DEFAULT_MIN_IMAGES = 10_000
PRESET_CHOICES = ("auto", *PRESETS)


def resolve_preset(preset: str, train_images: int) -> str:
    """The preset ``auto`` stands for with ``train_images`` training images (other names are returned as given)."""
    if preset != "auto":
        return preset
    return "default" if train_images >= AUTO_DEFAULT_MIN_IMAGES else "quick"


# ---- building ----------------------------------------------------------------------------------------------
class FloatLoader(yaml.SafeLoader):
    """PyYAML's safe loader reading every float notation people write: YAML 1.1 (PyYAML) takes ``1e-3`` and
    ``5E-4`` — no dot — for strings; YAML 1.2 and Python read them as numbers, and so does this loader."""


FloatLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with :class:`FloatLoader`."""
    return yaml.load(text, Loader=FloatLoader)  # noqa: S506 - a SafeLoader subclass


def _parse_scalar(text: str) -> Any:
    """A command-line value: YAML scalar or flow list (``0.1``, ``1e-3``, ``true``, ``[kernel, depth]``)."""
    try:
        return load_yaml(text)
    except yaml.YAMLError:
        return text


def _merge_phases(base: list[dict], update: Any, problems: list[str]) -> list[dict]:
    """A list replaces the phases; a mapping ``{name: {key: value}}`` edits phases by name."""
    if isinstance(update, list):
        return copy.deepcopy(update)
    if not isinstance(update, Mapping):
        problems.append(f"phases: expected a list of phases or a mapping by phase name, got {update!r}")
        return base
    names = [p.get("name") for p in base if isinstance(p, Mapping)]
    for name, changes in update.items():
        if name not in names:
            problems.append(f"phases.{name}: no such phase (phases are {names})")
        elif not isinstance(changes, Mapping):
            problems.append(f"phases.{name}: expected a mapping of phase keys, got {changes!r}")
        else:
            base[names.index(name)].update(changes)
    return base


def _merge(base: dict[str, Any], update: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    for key, value in update.items():
        if key == "phases":
            base["phases"] = _merge_phases(base["phases"], value, problems)
        else:
            base[key] = value
    return base


def _overrides_to_mapping(overrides: list[str], problems: list[str]) -> dict[str, Any]:
    """``["batch_size=128", "phases.width.lr=0.01"]`` -> a nested mapping for :func:`_merge`."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            problems.append(f"--set {item!r}: expected KEY=VALUE, e.g. batch_size=128 or phases.width.lr=0.01")
            continue
        if parts[0] == "phases" and len(parts) != 3:
            problems.append(f"--set {item!r}: phase keys look like phases.NAME.KEY=VALUE")
            continue
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = _parse_scalar(text.strip())
    return out


def _check_number(problems: list[str], where: str, value: Any, kind: type, low: float, high: Optional[float],
                  low_open: bool = False) -> None:
    is_int = isinstance(value, int) and not isinstance(value, bool)
    ok_type = is_int if kind is int else (is_int or (isinstance(value, float) and math.isfinite(value)))
    too_low = ok_type and (value <= low if low_open else value < low)
    if not ok_type or too_low or (ok_type and high is not None and value > high):
        bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
        problems.append(f"{where}: {value!r} must be {'an integer' if kind is int else 'a number'} {bound}")


# (type, low, high, low_open) per scalar key of TrainConfig
_RULES: dict[str, tuple[type, float, Optional[float], bool]] = {
    "batch_size": (int, 1, None, False),
    "num_random": (int, 0, None, False),
    "momentum": (float, 0.0, 1.0, False),
    "weight_decay": (float, 0.0, None, False),
    "label_smoothing": (float, 0.0, 1.0, False),
    "random_erasing": (float, 0.0, 1.0, False),
    "grad_clip": (float, 0.0, None, False),
    "final_lr_fraction": (float, 0.0, 1.0, False),
    "kd_ratio": (float, 0.0, None, False),
    "kd_temperature": (float, 0.0, None, True),
    "dynamic_lr_scale": (float, 0.0, None, True),
    "exit_weight": (float, 0.0, None, False),
    "exit_kd_alpha": (float, 0.0, 1.0, False),
    "budget_target": (float, 0.0, 1.0, True),
    "budget_weight": (float, 0.0, None, False),
    "block_budget_weight": (float, 0.0, None, False),
    "ig_weight": (float, 0.0, None, False),
    "ig_balance": (float, 0.0, None, False),
    "router_temperature_start": (float, 0.0, None, True),
    "router_temperature_end": (float, 0.0, None, True),
    "eval_threshold": (float, 0.0, 1.0, True),
    "bn_recal_images": (int, 1, None, False),
    "val_images": (int, 0, None, False),
    "checkpoint_every": (int, 1, None, False),
}


def _parse_phase(problems: list[str], i: int, raw: Any) -> Optional[PhaseConfig]:
    if not isinstance(raw, Mapping):
        problems.append(f"phases[{i}]: expected a mapping with name, epochs, lr, elastic; got {raw!r}")
        return None
    where = f"phases.{raw.get('name', i)}"
    known = {f.name for f in dataclasses.fields(PhaseConfig)}
    for key in sorted(set(raw) - known):
        problems.append(f"{where}.{key}: unknown key (allowed: {sorted(known)})")
    missing = [k for k in ("name", "epochs", "lr") if k not in raw]
    if missing:
        problems.append(f"{where}: missing {missing}")
        return None
    _check_number(problems, f"{where}.epochs", raw["epochs"], float, 0.0, None, low_open=True)
    _check_number(problems, f"{where}.lr", raw["lr"], float, 0.0, None, low_open=True)
    _check_number(problems, f"{where}.warmup_epochs", raw.get("warmup_epochs", 0.0), float, 0.0, None)
    _check_number(problems, f"{where}.min_steps", raw.get("min_steps", 0), int, 0, None)
    elastic = raw.get("elastic", [])
    if not isinstance(elastic, list) or any(d not in DIMENSIONS for d in elastic):
        problems.append(f"{where}.elastic: {elastic!r} must be a list drawn from {list(DIMENSIONS)}")
    for key, default in (("sort_channels", False), ("augment", None)):
        if raw.get(key, default) is not default and not isinstance(raw[key], bool):
            problems.append(f"{where}.{key}: {raw[key]!r} must be true or false")
    if raw.get("weight_decay") is not None:
        _check_number(problems, f"{where}.weight_decay", raw["weight_decay"], float, 0.0, None)
    return PhaseConfig(**{k: v for k, v in raw.items() if k in known})


def config_from_mapping(data: Mapping[str, Any]) -> TrainConfig:
    """Validate a complete mapping into a :class:`TrainConfig`.

    Raises:
        ConfigError: listing every unknown key and bad value.
    """
    problems: list[str] = []
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in sorted(set(data) - known):
        problems.append(f"{key}: unknown key (allowed: {sorted(known)})")
    for key, (kind, low, high, low_open) in _RULES.items():
        if key in data:
            _check_number(problems, key, data[key], kind, low, high, low_open)
    for key in ("nesterov", "augment"):
        if key in data and not isinstance(data[key], bool):
            problems.append(f"{key}: {data[key]!r} must be true or false")
    if data.get("precision", "fp32") not in PRECISIONS:
        problems.append(f"precision: {data['precision']!r} must be one of {list(PRECISIONS)}")
    raw_phases = data.get("phases")
    phases: list[PhaseConfig] = []
    if not isinstance(raw_phases, list) or not raw_phases:
        problems.append("phases: needs a non-empty list of phases")
    else:
        phases = [p for i, raw in enumerate(raw_phases) if (p := _parse_phase(problems, i, raw)) is not None]
        names = [p.name for p in phases]
        if len(set(names)) != len(names):
            problems.append(f"phases: names must be unique, got {names}")
    if problems:
        raise ConfigError("invalid training config: " + "; ".join(problems))
    scalars = {k: v for k, v in data.items() if k in known and k != "phases"}
    return TrainConfig(phases=phases, **scalars)


def build_config(preset: str = "default", path: Optional[str | Path] = None,
                 overrides: Optional[list[str]] = None) -> TrainConfig:
    """The config of ``preset``, updated by the YAML file at ``path``, then by ``KEY=VALUE`` overrides.

    Raises:
        ConfigError: unknown preset, unreadable file, or any invalid key/value (all listed at once).
    """
    if preset not in PRESETS:
        hint = "; resolve 'auto' with resolve_preset(preset, train_images) first" if preset == "auto" else ""
        raise ConfigError(f"--preset {preset!r}: unknown preset; use one of {sorted(PRESETS)}{hint}")
    problems: list[str] = []
    data = copy.deepcopy(PRESETS[preset])
    if path is not None:
        try:
            loaded = load_yaml(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"--config {path}: cannot read YAML ({type(exc).__name__}: {exc})".splitlines()[0]) from None
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"--config {path}: expected a mapping of config keys at the top level")
        data = _merge(data, loaded, problems)
    data = _merge(data, _overrides_to_mapping(overrides or [], problems), problems)
    try:
        config = config_from_mapping(data)
    except ConfigError as exc:
        problems.append(str(exc).removeprefix("invalid training config: "))
    if problems:
        raise ConfigError("invalid training config: " + "; ".join(problems))
    return config
