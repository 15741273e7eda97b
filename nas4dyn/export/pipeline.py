"""The export verb as a library call: pick an arch, export it, verify it, measure it, and write a complete
export directory (or nothing). Evaluating an export on a data split: :mod:`nas4dyn.export.evaluation`."""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from nas4dyn.api import load_supernet_file
from nas4dyn.errors import CheckpointError, ConfigError, DataError, InvalidArchError
from nas4dyn.export.card import CARD_FILE, build_card
from nas4dyn.export.measure import collect, decision_stats, measure_latency, realized_macs, unnormalised
from nas4dyn.export.onnx import OnnxDynamicModel, check_onnx_exportable, export_onnx
from nas4dyn.export.program import PROGRAM_FILE, check_exportable, load_program, save_program
from nas4dyn.export.runtime import export_subnet
from nas4dyn.export.torchscript import MODEL_FILE, load_exported, save_torchscript
from nas4dyn.io import atomic_write_json, check_writable
from search_spaces.arch import Arch
from search_spaces.space import SearchSpace
from supernet.network import Supernet

log = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx", "export")  # export: torch.export's model.pt2, static archs only
DEFAULT_FORMATS = ("torchscript", "onnx")
VERIFY_IMAGES = 256
LOGITS_TOLERANCE = 1e-4
LATENCY_WARN = 0.15  # relative difference of predicted and measured latency that export warns about


# ---- inputs -------------------------------------------------------------------------------------------------
def resolve_arch(spec: str, space: SearchSpace) -> Arch:
    """The arch named by ``SEARCH_DIR/pareto.json#INDEX`` or an arch JSON file (``Arch.to_dict()`` or one
    ``{"arch": ..., "metrics": ...}`` entry), validated against ``space``.

    Raises:
        ConfigError: missing file, bad JSON, bad or missing index.
        InvalidArchError: the arch does not fit ``space`` (another space, bad choices).
    """
    path_text, _, index_text = spec.partition("#")
    path = Path(path_text)
    if not path.is_file():
        raise ConfigError(f"--arch {spec}: no such file {path}; pass SEARCH_DIR/pareto.json#INDEX or an arch JSON file")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--arch {spec}: {path} is not readable JSON ({type(exc).__name__}: {exc})") from None
    if isinstance(data, list):
        if not index_text:
            raise ConfigError(f"--arch {spec}: {path} lists {len(data)} archs; pick one with {path}#INDEX")
        try:
            index = int(index_text)
        except ValueError:
            raise ConfigError(f"--arch {spec}: index {index_text!r} is not an integer") from None
        if not 0 <= index < len(data):
            raise ConfigError(f"--arch {spec}: index {index} is out of range; {path} has {len(data)} entries "
                              f"(0..{len(data) - 1})")
        data = data[index]
    elif index_text:
        raise ConfigError(f"--arch {spec}: {path} holds one arch, not a list; drop #{index_text}")
    if isinstance(data, dict) and "arch" in data:
        data = data["arch"]
    try:
        return space.validate(Arch.from_dict(data))
    except InvalidArchError as exc:
        raise InvalidArchError(f"--arch {spec}: {exc}") from None


def _default_formats(space: SearchSpace, arch: Arch) -> tuple[str, ...]:
    """DEFAULT_FORMATS, without ONNX (and a warning saying why) when a gate of ``arch`` has no ONNX form: asked
    for nothing in particular, an export should not fail over the optional format."""
    try:
        check_onnx_exportable(space, arch)
    except ConfigError as exc:
        log.warning(f"no model.onnx for this arch, model.ts only ({exc})")
        return tuple(f for f in DEFAULT_FORMATS if f != "onnx")
    return DEFAULT_FORMATS


def parse_formats(text: str) -> tuple[str, ...]:
    """``"torchscript,onnx"`` -> ("torchscript", "onnx"); TorchScript is always written (``model.ts``)."""
    formats = tuple(f.strip().lower() for f in text.split(",") if f.strip())
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ConfigError(f"--format {text!r}: unknown format {bad or text!r}; choose from {','.join(FORMATS)}")
    if "torchscript" not in formats:
        log.info("model.ts is always written (load_exported and evaluate read it)")
        formats = ("torchscript",) + formats
    return formats


def load_split(source: str, split: str, data_info: Mapping[str, Any], data_root: Optional[str] = None,
               skip_unreadable: Optional[bool] = None) -> Any:
    """The ``split`` dataset of ``source`` (normalised as in training), and the data description it came with.

    ``synthetic`` data is regenerated with the channels, classes and resolution of ``data_info``. Unreadable
    images are skipped when ``skip_unreadable`` says so (None: when the run skipped some, per ``data_info``).

    Raises:
        DataError: unknown source, missing files.
        ConfigError: unknown split.
    """
    from nas4dyn.data import load_data

    if split not in ("train", "val", "test"):
        raise ConfigError(f"--split {split!r}: choose train, val or test")
    synthetic = None
    if source == "synthetic":
        synthetic = {k: int(data_info[v]) for k, v in (("num_classes", "num_classes"), ("channels", "channels"),
                                                       ("resolution", "resolution")) if v in data_info}
    if skip_unreadable is None:
        skip_unreadable = bool(data_info.get("unreadable_skipped"))
    bundle = load_data(source, data_root=data_root, augment=False, synthetic=synthetic, skip_unreadable=skip_unreadable)
    dataset = {"train": bundle.train_eval, "val": bundle.val, "test": bundle.test}[split]
    return dataset, bundle


def _check_data_fits(info: Any, channels: int, num_classes: int, source: str) -> None:
    if info.channels != channels or info.num_classes != num_classes:
        raise DataError(f"--data {source}: {info.channels} channels / {info.num_classes} classes, but the model "
                        f"takes {channels} channels and predicts {num_classes} classes")


# ---- export -------------------------------------------------------------------------------------------------
@dataclass
class ExportOptions:
    """Knobs of :func:`export_run` (the CLI flags of ``nas4dyn export``)."""

    formats: Optional[tuple[str, ...]] = None  # None: DEFAULT_FORMATS, without ONNX when the arch has no ONNX form
    data: Optional[str] = None  # default: the run's dataset
    data_root: Optional[str] = None
    bn_images: int = 2000
    batch_size: int = 64
    latency_samples: int = 200
    latency_repeats: int = 5
    latency_table: Optional[str] = None
    threads: Optional[int] = None
    # What the deployment runs: "torchscript" (model.ts) or "onnxruntime" (model.onnx); None: whichever the
    # latency table times (both files are written). The card's latency is measured in this runtime.
    runtime: Optional[str] = None


@torch.no_grad()
def verify_export(net: Supernet, arch: Arch, export_dir: Path, images01: torch.Tensor, mean: list[float],
                  std: list[float], formats: tuple[str, ...]) -> dict[str, Any]:
    """Compare the written model(s) with the supernet's dynamic eval forward on ``images01``: identical exit
    indices and predictions, logits within 1e-4.

    Raises:
        RuntimeError: they disagree (a bug: the export is not written).
    """
    x = (images01 - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    previous = net.active
    net.eval()
    net.set_active(arch)
    try:
        ref_logits, ref_exit = net.forward_with_exits(x)
    finally:
        net.set_active(previous)
    results: dict[str, Any] = {"images": len(images01)}
    candidates = {"torchscript": lambda: load_exported(export_dir).forward_with_exits(images01)}
    if "onnx" in formats:
        candidates["onnx"] = lambda: tuple(map(torch.from_numpy, OnnxDynamicModel(export_dir).forward_with_exits(images01.numpy())))
    if "export" in formats:  # a static arch: every sample leaves at the final classifier (index 0)
        candidates["export"] = lambda: (load_program(export_dir)(images01), torch.zeros(len(images01), dtype=torch.long))
    for name, run in candidates.items():
        logits, exit_index = run()
        diff = float((logits - ref_logits).abs().max()) if len(logits) else 0.0
        same = torch.equal(exit_index, ref_exit) and torch.equal(logits.argmax(1), ref_logits.argmax(1))
        if not same or diff > LOGITS_TOLERANCE:
            raise RuntimeError(f"{name} export disagrees with the supernet (exits equal: "
                               f"{torch.equal(exit_index, ref_exit)}, max logit difference {diff:.2e})")
        results[f"{name}_max_logit_diff"] = diff
    return results


def _latency_table(path: str, net: Supernet, threads: Optional[int], runtime: Optional[str]) -> tuple[Any, int, str]:
    """The latency model of ``--latency-table``, the thread count and the runtime to time the export with: the
    table's, so the card's predicted and measured latencies are of the same kind (checked before any work).
    ``runtime``: the one the deployment uses (None: the table's).

    Raises:
        ConfigError: missing table, another space, another runtime, thread count or batch size.
    """
    from nas4dyn.cost import LatencyModel

    if not Path(path).is_file():
        raise ConfigError(f"--latency-table {path}: no such file; create one with "
                          f"`nas4dyn profile --space {net.space.name} --out {path}`")
    model = LatencyModel.load(path)
    model.check_space(net.space)
    runtime = runtime or model.table.runtime
    model.table.check_runtime(runtime, "--latency-table")  # the card times model.ts or model.onnx in it
    fp = model.table.fingerprint
    if fp["batch_size"] != 1:
        raise ConfigError(f"--latency-table {path}: measured at batch {fp['batch_size']}, but the card times batch 1; "
                          "profile with --batch-size 1")
    if threads and threads != fp["threads"]:
        raise ConfigError(f"--threads {threads}: the latency table {path} was measured with {fp['threads']} "
                          f"thread(s); drop --threads (the table's count is used) or profile with --threads {threads}")
    return model, int(fp["threads"]), runtime


def _compare_latency(card: dict[str, Any], table: Any, path: str) -> None:
    """Record what the predicted latency is and how far it is from the measured one; warn past 15%."""
    settings, fp = table.settings, table.fingerprint
    card["latency_predicted_table"] = {
        "path": str(path), "runtime": table.runtime, "device_name": fp.get("device_name"), "threads": fp["threads"],
        "batch_size": fp["batch_size"], "statistic": settings.get("statistic", "median"),
        "clock": settings.get("clock", "wall"), "settings": dict(settings),
    }
    error = card["latency_ms_predicted"] / card["latency_ms"] - 1
    card["latency_relative_error"] = error
    if abs(error) > LATENCY_WARN:
        log.warning("predicted latency %.3f ms is %+.0f%% off the %.3f ms measured here (same statistic, %d "
                    "thread(s)): the table was measured on another machine, this CPU is loaded now — re-profile "
                    "here, or measure on an idle CPU — or an older nas4dyn made the table, timing exits alone, which "
                    "under-predicts models with early exits: re-profile",
                    card["latency_ms_predicted"], 100 * error, card["latency_ms"], fp["threads"])


def _cost(net: Supernet, arch: Arch, loader: Any) -> Optional[dict[str, Any]]:
    try:
        from nas4dyn.cost import count_macs
    except ImportError:
        log.warning("nas4dyn.cost is not available: the card has no MAC counts")
        return None
    return count_macs(net, arch, loader).to_dict()


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out``, replacing an earlier export there; permissions as the umask
    gives new files (temp files are created private)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in tmp.iterdir():
        path.chmod(0o666 & ~umask)
    tmp.chmod(0o777 & ~umask)
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        out.rename(old / out.name)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / CARD_FILE).exists()
                                              and not (out / MODEL_FILE).exists())):
        raise ConfigError(f"--out {out}: exists and is not an export directory; pick a new or empty directory")


def export_run(run_dir: str | Path, arch_spec: str, out_dir: str | Path, options: ExportOptions) -> dict[str, Any]:
    """Export ``arch_spec`` of the run in ``run_dir`` to ``out_dir``; returns the card.

    Steps: load the supernet, pick and validate the arch, recalibrate BatchNorm statistics for it on training
    images (``bn_images``; 0 keeps the stored ones), export, write ``model.ts`` (+ ONNX) and ``arch.json``,
    verify the files against the supernet, measure accuracy, exit and gate rates on the test split, count
    MACs, time it at batch 1, write ``card.json``. Everything is written into a temporary sibling directory
    that replaces ``out_dir`` only when complete.

    Raises:
        CheckpointError, ConfigError, InvalidArchError, DataError: bad inputs, each named in one line.
    """
    run_dir, out = Path(run_dir), Path(out_dir)
    ckpt = run_dir / "supernet.pt" if run_dir.is_dir() else run_dir
    if not ckpt.is_file():
        raise CheckpointError(f"--run {run_dir}: no supernet.pt here; train one with `nas4dyn train --out {run_dir}`")
    _check_out(out)
    check_writable(out)
    net, info = load_supernet_file(ckpt)
    arch = resolve_arch(arch_spec, net.space)
    if options.formats is None:
        options = replace(options, formats=_default_formats(net.space, arch))
    if "onnx" in options.formats:
        check_onnx_exportable(net.space, arch)
    if "export" in options.formats:
        check_exportable(arch)
    latency_model, threads, runtime = (_latency_table(options.latency_table, net, options.threads, options.runtime)
                                       if options.latency_table else (None, options.threads or 1, "torchscript"))
    if runtime == "onnxruntime" and "onnx" not in options.formats:
        raise ConfigError("--latency-table: the table times onnxruntime, which runs model.onnx; add --format onnx "
                          "(for an arch with an ONNX form) or use a torchscript table")
    torch.set_num_threads(threads)
    source = options.data or info.get("dataset")
    if not source:
        raise ConfigError(f"--run {run_dir}: the supernet records no dataset; pass --data fashion-mnist|synthetic|DIR")
    from nas4dyn.data import make_loader

    test_set, bundle = load_split(source, "test", info, options.data_root)
    _check_data_fits(bundle.info, net.space.input_channels, net.space.num_classes, source)
    if options.bn_images > 0:
        from nas4dyn.train.bn import recalibrate_bn

        log.info("recalibrating BatchNorm statistics for the arch on %d training images", options.bn_images)
        recalibrate_bn(net, arch, make_loader(bundle.train_eval, options.batch_size, shuffle=True,
                                              limit=options.bn_images), options.bn_images)
    model = export_subnet(net, arch, info)
    mean, std = [float(v) for v in model.mean.flatten()], [float(v) for v in model.std.flatten()]
    test_loader = make_loader(test_set, options.batch_size)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        atomic_write_json(tmp / "arch.json", arch.to_dict())
        scripted = save_torchscript(model, tmp / MODEL_FILE)
        files = ["arch.json", MODEL_FILE]
        if "onnx" in options.formats:
            written = export_onnx(model, tmp, int(bundle.info.resolution))
            files += [p.name for p in written]
        images, _ = collect(unnormalised(test_loader, bundle.info.mean, bundle.info.std), VERIFY_IMAGES)
        if "export" in options.formats:
            files.append(save_program(model, images[:2], tmp / PROGRAM_FILE).name)
        check = verify_export(net, arch, tmp, images, mean, std, options.formats)
        log.info("verified against the supernet on %d test images: %s", check["images"], check)
        stats = decision_stats(scripted, unnormalised(test_loader, bundle.info.mean, bundle.info.std),
                               desc="test accuracy", total=len(test_loader))
        timed, _ = collect(unnormalised(test_loader, bundle.info.mean, bundle.info.std), options.latency_samples)
        table = latency_model.table if latency_model else None
        deployed, inputs = ((OnnxDynamicModel(tmp, threads), timed.numpy()) if runtime == "onnxruntime"
                            else (scripted, timed))
        latency = measure_latency(deployed, inputs, 1, options.latency_repeats,
                                  statistic=table.settings.get("statistic", "median") if table else "median",
                                  clock=table.settings.get("clock", "wall") if table else "wall", runtime=runtime)
        cost = _cost(net, arch, test_loader)
        # Predicted over the very images timed: the same paths on both sides.
        normalised = [((timed - model.mean) / model.std, None)]
        predicted = latency_model.predict_expected(net, arch, normalised) if latency_model else None
        card = build_card(arch=arch.to_dict(), data_info=info, mean=mean, std=std, resolution=arch.resolution,
                          channels=model.channels, thresholds=list(model.thresholds), exit_names=list(model.exit_names),
                          stats=stats.to_dict(), latency=latency.to_dict(), cost=cost, latency_predicted=predicted,
                          files=files + [CARD_FILE], bn_images=options.bn_images)
        if table is not None:
            _compare_latency(card, table, options.latency_table)
        card["verification"] = check
        card["macs_realized_batch1"] = realized_macs(scripted, timed, 1)
        atomic_write_json(tmp / CARD_FILE, card)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return card
