"""Measuring a latency table on the machine this runs on (what ``nas4dyn profile`` does).

Every distinct part of the space is timed as the standalone module users run (``Supernet.extract``'s
blocks, heads and gater): each block configuration (stage, first or later position in the stage, kernel,
width, input resolution, CIGT paths) in each gate state — a per-filter gate (channel, EMG) at a few
active-filter levels, interpolated in between; a skip gate on and off; each DFS option — plus stem, gater,
exit heads and classifier. Then random subnets are timed end to end, static ones and forced dynamic paths:
some fit the linear correction of the table sum, held-out ones validate the predictor. Everything is timed in
the form ``nas4dyn export`` ships, so predictions are of the exported model: TorchScript, frozen
(:class:`TorchScriptPieces`; freezing folds BatchNorms into ungated convs and saves calls, which speeds the
parts unevenly), or with ``runtime="onnxruntime"`` the ONNX pieces of model.onnx run by onnxruntime
(:mod:`nas4dyn.cost.onnx_parts`).

Timing (:mod:`nas4dyn.cost.timing`): inputs at the largest resolution of the space (the data's), the thread
count pinned, items in shuffled interleaved rounds. Every item is a deployable piece and its inputs
(:class:`Item`), so a plan can also be written as a profiling bundle for another device
(:mod:`nas4dyn.cost.bundle`) and its timings imported into the same table.
"""
from __future__ import annotations

import dataclasses
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch

from nas4dyn.cost.latency import (KEY_FIELDS, LatencyModel, LatencyTable, accuracy, device_fingerprint,
                                   fit_correction)
from nas4dyn.cost.paths import arch_layout, force_path, forced_block, gate_kind, random_path
from nas4dyn.cost.settings import ProfileSettings
from nas4dyn.cost.timing import measure
from nas4dyn.errors import ConfigError
from search_spaces.arch import Arch, ExitChoice
from search_spaces.space import SearchSpace
from supernet.dynamic.cigt import RoutedBlock
from supernet.dynamic.heads import confidence
from supernet.network import Supernet
from supernet.scripting import freeze_scripted
from supernet.subnet import SubNet, resize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    """One timed call: a deployable piece (a frozen TorchScript module, or an ONNX model run by onnxruntime)
    and the inputs it is called with (tensors, or numpy arrays)."""

    module: Any
    inputs: tuple[Any, ...]

    def __call__(self) -> Any:
        return self.module(*self.inputs)


@dataclass
class Subnet:
    """One end-to-end measurement: a subnet and the path all its inputs take (exit None: a static subnet);
    ``item`` is None for a subnet read back from a bundle's timings."""

    arch: Arch
    exit_index: Optional[int]
    units: list[float]
    item: Optional[Item] = None


@dataclass
class ProfilePlan:
    """Everything a profile times: table entries (key, level, item), calibration and validation subnets."""

    space: SearchSpace
    settings: ProfileSettings
    input_size: int
    entries: list[tuple[tuple, float, Item]]
    calibration: list[Subnet]
    validation: list[Subnet]

    def items(self) -> list[Item]:
        return [item for _, _, item in self.entries] + [s.item for s in self.calibration + self.validation]


class TorchScriptPieces:
    """Items in the form of model.ts: every module scripted and frozen (once: the input shape only changes
    the inputs)."""

    runtime = "torchscript"
    nested = False  # model.ts runs every part alike, after an exit or not
    exits_in_context = True  # an exit's entry: a subnet with it minus the subnet without (see exit_contexts)

    def __init__(self) -> None:
        self._frozen: dict[int, tuple[torch.nn.Module, torch.jit.ScriptModule]] = {}

    def supports(self, gate: str, block_type: str) -> bool:
        return True  # model.ts carries every gate kind

    def part(self, kind: str, module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> Item:
        """The item of a table entry of ``kind`` (stem, gater, block, exit, classifier)."""
        if id(module) not in self._frozen:  # the module is kept with its frozen form, so its id stays its own
            self._frozen[id(module)] = (module, freeze_scripted(module))
        return Item(self._frozen[id(module)][1], inputs)

    def subnet(self, sub: SubNet, arch: Arch, x: torch.Tensor) -> Item:
        return Item(freeze_scripted(sub), (x,))

    def call_item(self, x: torch.Tensor) -> Optional[Item]:
        return None  # the call's own time stays in the entries (the correction has held it so far)


def _sample(space: SearchSpace, rng: random.Random, dynamic: bool, pieces: Any) -> Arch:
    """A random arch whose every block the runtime's pieces can carry (any arch for TorchScript).

    Raises:
        ConfigError: no such arch turns up (the space's gates have no translation for this runtime).
    """
    for _ in range(1000):
        arch = space.sample(rng, dynamic=dynamic)
        if all(pieces.supports(b.gate, space.stages[b.stage].block) for b in arch.blocks()):
            return arch
    raise ConfigError(f"--runtime {pieces.runtime}: no random subnet of space {space.name!r} exports to it in 1000 "
                      "draws; remove the gate kinds it lacks from the space")


class ResizedStem(torch.nn.Module):
    """The stem with the input resize in front of it, as a subnet of ``resolution`` runs it."""

    def __init__(self, stem: torch.nn.Module, resolution: int):
        super().__init__()
        self.stem, self.resolution = stem, resolution

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(resize(x, self.resolution))


def _stage_sizes(space: SearchSpace, resolution: int) -> list[int]:
    """Spatial size at the input of each stage, then at the output of the last."""
    size = (resolution - 1) // space.stem_stride + 1
    sizes = [size]
    for st in space.stages:
        size = (size - 1) // st.stride + 1
        sizes.append(size)
    return sizes


def _unit_levels(units: int, count: int) -> list[int]:
    """Gate states to measure: every state of a few-state gate, else ``count`` evenly spaced ones."""
    if units < count:
        return list(range(units + 1))
    return sorted({round(units * i / (count - 1)) for i in range(count)})


class ExitProbe(torch.nn.Module):
    """An exit that a sample does not take, as SubNet runs it: head, confidence test, and the any() that
    syncs — one module, so it is timed scripted and frozen like the rest."""

    def __init__(self, head: torch.nn.Module, criterion: str):
        super().__init__()
        self.head, self.criterion = head, criterion

    def forward(self, h: torch.Tensor) -> bool:
        return bool((confidence(self.head(h), self.criterion) >= 0.5).any())


def exit_contexts(net: Supernet, resolution: int) -> dict[int, tuple[SubNet, SubNet]]:
    """Per exit stage: the smallest static subnet at ``resolution`` (deep enough for the stage's first exit
    position) without, and with that exit, which no sample takes. Their time difference is what the exit adds
    to a model: inside a scripted subnet an exit costs about twice its head and test timed alone (AMD EPYC,
    fmnist: five exits 0.21 ms in a frozen subnet, 0.10 ms as five standalone probes) — the control flow
    around it and the blocks after it run slower — and a fitted scale over whole subnets cannot tell, since
    exits are a few percent of a subnet's time."""
    space = net.space
    out = {}
    for s in sorted({stage for stage, _ in space.exits.positions}):
        block = min(b for stage, b in space.exits.positions if stage == s)
        base = space.min_arch()
        depths = list(base.depths)
        depths[s] = min(d for d in space.stages[s].depths if d > block)
        arch = dataclasses.replace(
            base, resolution=resolution, depths=tuple(depths),
            kernels=tuple((min(st.kernels),) * d for st, d in zip(space.stages, depths)),
            widths=tuple((min(st.widths),) * d for st, d in zip(space.stages, depths)),
            gates=tuple(("none",) * d for d in depths))
        with_exit = dataclasses.replace(arch, exits=(ExitChoice(s, block, 0.5),))
        out[s] = (net.extract(arch).eval(), force_path(net.extract(with_exit).eval(), 1, []))
    return out


def _block_variants(net: Supernet, s: int, b: int, k: int, w: int, settings: ProfileSettings, batch: int,
                    dev: torch.device, pieces: Any) -> dict[tuple[str, int], dict[int, tuple[torch.nn.Module, torch.Tensor]]]:
    """Every way to run block (s, b) with kernel ``k`` and width ``w`` that ``pieces`` carry: (gate kind, CIGT
    paths) -> gate state -> (extracted module forced into that state, gate logits to call it with)."""
    space, st = net.space, net.space.stages[s]
    hidden = st.hidden_channels(w, space.block_in_channels(s, b))
    out = {}
    for gate in (g for g in space.allowed_gates(s, b, k, w) if pieces.supports(g, st.block)):
        group = space.gater.group if gate == "channel" else 1
        columns = -(-hidden // group) if gate == "channel" else 0
        blk = net.block(s, b).extract(k, w, gate, 0, columns, group).eval()
        units = gate_kind(gate).units(hidden) if gate != "none" else 0
        levels = _unit_levels(units, settings.channel_levels) if units else [0]
        if group > 1:  # grouped channel gates open whole groups: measure the filter counts they can run
            levels = sorted({min(units, -(-on // group) * group) for on in levels})
        if gate == "width":  # a width gate takes only its options' filter counts
            levels = gate_kind(gate).levels(blk, units)
        out[(gate, 1)] = {on: forced_block(blk, torch.arange(units, device=dev) < on, batch) for on in levels}
    for paths in (p for p in st.paths if p > 1):  # routed stages are ungated
        copies = [net.block(s, b, i).extract(k, w, "none", 0, 0) for i in range(paths)]
        routed = RoutedBlock(net.routers[f"{s}_{b}"].sliced(paths), copies, paths).eval()  # as extracted
        out[("none", paths)] = {0: forced_block(routed, torch.zeros(0, dtype=torch.bool, device=dev), batch)}
    return out


def table_items(net: Supernet, x: torch.Tensor, settings: ProfileSettings,
                pieces: Any = None) -> list[tuple[tuple, float, Item]]:
    """The items to time for every table entry: (entry key, level, item), each part in the deployable form
    ``pieces`` make of it (:class:`TorchScriptPieces`, the default, or
    :class:`~nas4dyn.cost.onnx_parts.OnnxPieces`)."""
    pieces = pieces or TorchScriptPieces()
    space, batch, dev = net.space, x.shape[0], x.device
    blocks = {}  # extracted once per configuration; the input resolution only changes the input
    for s, st in enumerate(space.stages):
        for b in range(min(2, st.max_depth)):  # later positions of a stage share one configuration
            for k in st.kernels:
                for w in st.widths:
                    for (gate, paths), states in _block_variants(net, s, b, k, w, settings, batch, dev,
                                                                 pieces).items():
                        blocks[(s, b == 0, k, w, gate, paths)] = (states, space.block_in_channels(s, b))
    gaters = {}
    if net.gater is not None:
        hidden = [st.hidden_channels(w, space.block_in_channels(s, b)) for s, st in enumerate(space.stages)
                  for b in range(st.max_depth) for w in st.widths if "channel" in space.allowed_gates(s, b)]
        gaters = {float(rows): net.gater.extract(torch.arange(rows)).to(dev).eval()
                  for rows in sorted({min(hidden), net.gater.fc2.out_features})}
    in_context = getattr(pieces, "exits_in_context", False)
    probes = {}
    for s in sorted({p[0] for p in space.exits.positions} if not in_context else ()):
        stage_pos = next(p for p in space.exits.positions if p[0] == s)
        head = net.exit_heads[f"{stage_pos[0]}_{stage_pos[1]}"]
        probes[s] = ExitProbe(head, space.exits.criterion).eval()
    def entries(key: tuple, level: float, module: torch.nn.Module, inputs: tuple) -> list[tuple[tuple, float, Item]]:
        out = [(key, level, pieces.part(key[0], module, inputs))]
        if pieces.nested and f"{key[0]}_nested" in KEY_FIELDS:  # as run after an exit (see OnnxPieces)
            out.append(((f"{key[0]}_nested", *key[1:]), level, pieces.part(key[0], module, inputs, nested=True)))
        return out

    call = pieces.call_item(x)
    items = [(("call",), 0.0, call)] if call is not None else []
    for r in space.resolutions:
        xr = resize(x, r)
        sizes = _stage_sizes(space, r)
        items += entries(("stem", r), 0.0, ResizedStem(net.stem, r).eval(), (x,))
        for rows, gater in gaters.items():
            items += entries(("gater", r), rows, gater, (xr,))
        for (s, first, k, w, gate, paths), (states, in_ch) in blocks.items():
            size = sizes[s] if first else sizes[s + 1]
            h = torch.randn(batch, in_ch, size, size, device=dev)
            for on, (module, logits) in states.items():
                items += entries(("block", r, s, first, k, w, gate, paths), float(on), module, (h, logits))
        if in_context:
            for s, (without, with_exit) in exit_contexts(net, r).items():
                items += [(("exit_context", r, s), 0.0, pieces.subnet(without, None, x)),
                          (("exit_context", r, s), 1.0, pieces.subnet(with_exit, None, x))]
        else:
            for s, probe in probes.items():
                h = torch.randn(batch, space.stages[s].out_channels, sizes[s + 1], sizes[s + 1], device=dev)
                items += entries(("exit", r, s), 0.0, probe, (h,))
        h = torch.randn(batch, space.stages[-1].out_channels, sizes[-1], sizes[-1], device=dev)
        items += entries(("classifier", r), 0.0, net.classifier, (h,))
    return items


def subnet_samples(net: Supernet, x: torch.Tensor, count: int, rng: random.Random,
                   pieces: Any = None) -> list[Subnet]:
    """``count`` random static subnets and ``count`` random dynamic paths (each of a fresh random dynamic
    subnet, half of them with every exit position its depths allow, forced with
    :func:`~nas4dyn.cost.paths.force_path`), in the deployable form ``pieces`` make (default: frozen TorchScript)."""
    pieces = pieces or TorchScriptPieces()
    space = net.space
    out = []
    for _ in range(count):
        arch = _sample(space, rng, False, pieces)
        out.append(Subnet(arch, None, [], pieces.subnet(net.extract(arch), arch, x)))
        arch = _sample(space, rng, True, pieces)
        if rng.random() < 0.5:  # every exit its depths allow: searched subnets often pass several exits
            exits = tuple(ExitChoice(st, b, 0.5) for st, b in space.exits.positions if b < arch.depths[st])
            arch = dataclasses.replace(arch, exits=exits)
        if not arch.is_dynamic:
            continue  # a dynamic sample without exits or gates is a static subnet again
        layout = arch_layout(space, arch)
        exit_index, masks = random_path(layout, len(arch.exits), rng)
        forced = force_path(net.extract(arch).eval(), exit_index, masks)
        out.append(Subnet(arch, exit_index, [float(m.sum()) for m in masks], pieces.subnet(forced, arch, x)))
    return out


def _score(model: LatencyModel, samples: list[Subnet], measured: list[float]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind, want_static in (("static", True), ("dynamic", False)):
        pairs = [(s, m) for s, m in zip(samples, measured) if (s.exit_index is None) == want_static]
        if pairs:
            predicted = [_predict(model, s) for s, _ in pairs]
            out[kind] = accuracy(predicted, [m for _, m in pairs])
    return out


def _record(model: LatencyModel, sample: Subnet, measured: float) -> dict[str, Any]:
    """One validation measurement as stored in the table (the path: exit index and units on per gate)."""
    return {"exit_index": sample.exit_index, "units": sample.units, "measured_ms": measured,
            "predicted_ms": _predict(model, sample)}


def _predict(model: LatencyModel, sample: Subnet) -> float:
    if sample.exit_index is None:
        return model.predict(sample.arch)
    return model.predict_path(sample.arch, sample.exit_index, sample.units)


@torch.no_grad()
def trained_like_batchnorms(net: Supernet) -> Supernet:
    """``net`` with every BatchNorm's scale, shift and running statistics drawn at random, as training leaves
    them. Why: a fresh supernet zero-initialises its residual BatchNorms' scales, so their frozen convolutions
    (BatchNorm folded in) hold only zeros, and all-zero operands can run faster than trained weights (AMD EPYC,
    frozen at batch 1: the largest fmnist subnet 6% faster than with the default run's weights, 3% with these
    statistics; smaller subnets within 1%)."""
    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.affine:
            module.weight.uniform_(0.5, 1.5)
            module.bias.normal_(0.0, 0.1)
            module.running_mean.normal_(0.0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return net


@torch.inference_mode()
def plan_profile(space: SearchSpace, settings: ProfileSettings) -> ProfilePlan:
    """Build everything a profile of ``space`` times, in the form of ``settings.runtime``, with random weights
    shaped like trained ones (:func:`trained_like_batchnorms`). The same settings give the same plan (subnets,
    paths, input shapes).

    Raises:
        ConfigError: a bad setting (named).
    """
    settings.check()
    torch.manual_seed(settings.seed)
    net = trained_like_batchnorms(Supernet(space)).eval().to(settings.device)
    input_size = max(space.resolutions)
    x = torch.randn(settings.batch_size, space.input_channels, input_size, input_size, device=settings.device)
    if settings.runtime == "onnxruntime":
        from nas4dyn.cost.onnx_parts import OnnxPieces

        pieces: Any = OnnxPieces(settings.threads)
    else:
        pieces = TorchScriptPieces()
    return ProfilePlan(
        space=space, settings=settings, input_size=input_size, entries=table_items(net, x, settings, pieces),
        calibration=subnet_samples(net, x, settings.calibrate, random.Random(settings.seed), pieces),
        validation=subnet_samples(net, x, settings.validate, random.Random(settings.seed + 1), pieces),
    )


def build_table(space: SearchSpace, input_size: int, entries: list[tuple[tuple, float]], calibration: list[Subnet],
                validation: list[Subnet], ms: list[float], fingerprint: dict[str, Any],
                settings: dict[str, Any]) -> LatencyTable:
    """The table from measured ``ms`` (entries, then calibration, then validation subnets, in order): entries
    grouped by key, the correction fitted on the calibration subnets, the held-out validation scored."""
    levels: dict[tuple, list[tuple[float, float]]] = {}
    for (key, level), value in zip(entries, ms):
        levels.setdefault(key, []).append((level, value))
    settings = dict(settings)
    if ("call",) in levels:  # the session call's own time, once per whole model: off every part
        settings["call_ms"] = call = levels.pop(("call",))[0][1]
        levels = {k: [(level, max(value - call, 0.0)) for level, value in v] for k, v in levels.items()}
    in_context = [k for k in levels if k[0] == "exit_context"]
    for key in in_context:  # (level 0: the subnet without the exit, level 1: with it) -> the exit's cost
        without, with_exit = (ms for _, ms in sorted(levels.pop(key)))
        levels[("exit", *key[1:])] = [(0.0, max(with_exit - without, 0.0))]
    table = LatencyTable(space=space, fingerprint=fingerprint, input_size=input_size,
                         levels={k: tuple(sorted(v)) for k, v in levels.items()}, settings=settings)
    model = LatencyModel(table)
    measured = ms[len(entries):]
    calib_ms, valid_ms = measured[: len(calibration)], measured[len(calibration):]
    sums = [model.path_sum(s.arch, s.exit_index, s.units) for s in calibration]  # exit tests as measured
    # Exits timed standalone (onnxruntime pieces) get a scale fitted of their own; timed in context they need none.
    exit_sums = None if in_context else [model.path_sum(s.arch, s.exit_index, s.units, only="exit.")
                                         for s in calibration]
    a, b, table.exit_scale = fit_correction(sums, calib_ms, exit_sums)
    table.correction = (a, b)
    table.calibration = _score(model, calibration, calib_ms)
    if validation:
        table.validation = _score(model, validation, valid_ms)
        records = [_record(model, s, value) for s, value in zip(validation, valid_ms)]
        worst = max(range(len(records)),
                    key=lambda i: abs(records[i]["predicted_ms"] / records[i]["measured_ms"] - 1))
        table.validation["worst_case"] = {**records[worst], "arch": validation[worst].arch.to_dict()}
        table.validation["records"] = records
    return table


def table_settings(settings: ProfileSettings) -> dict[str, Any]:
    """The settings a table records (device, threads, batch size and runtime are in its fingerprint)."""
    return {k: v for k, v in vars(settings).items() if k not in ("device", "threads", "batch_size", "runtime")}


@torch.inference_mode()
def profile_space(space: SearchSpace, settings: ProfileSettings, progress: bool = True) -> LatencyTable:
    """Measure ``space``'s latency table on this machine, fit the correction, and validate it on
    ``settings.validate`` held-out subnets (static and dynamic paths).

    Raises:
        ConfigError: a bad setting (named).
    """
    started = time.perf_counter()
    threads_before = torch.get_num_threads()
    plan = plan_profile(space, settings)
    torch.set_num_threads(settings.threads)
    try:
        log.info("profiling %s on %s: %d table entries, %d calibration and %d validation measurements",
                 space.name, settings.device, len(plan.entries), len(plan.calibration), len(plan.validation))
        ms = measure(plan.items(), settings.repeats, settings.burst, settings.statistic, settings.clock,
                     settings.seed, settings.device, progress)
    finally:
        torch.set_num_threads(threads_before)
    table = build_table(space, plan.input_size, [(key, level) for key, level, _ in plan.entries], plan.calibration,
                        plan.validation, ms, device_fingerprint(settings.device, settings.threads, settings.batch_size,
                                                                runtime=settings.runtime),
                        table_settings(settings))
    table.settings["seconds"] = round(time.perf_counter() - started, 1)
    return table
