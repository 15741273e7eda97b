"""Profiling bundles: a latency table for a device that cannot install nas4dyn.

``nas4dyn profile --space NAME --bundle DIR [--runtime R]`` writes everything a profile times — the frozen
TorchScript pieces (table entries, calibration and validation subnets) and their inputs (``inputs.pt``), or
with ``--runtime onnxruntime`` the ONNX pieces and their inputs as numpy arrays (``inputs.npz``) — a manifest,
and ``run.py`` (a copy of :mod:`nas4dyn.cost.timing`, needing only the standard library and ``torch``, or
``onnxruntime`` and ``numpy``). On the device,
``python run.py --out timings.json [--threads T]`` times them with the profiler's own loop; back home,
``nas4dyn profile --import timings.json --out lut.json`` builds the same table ``nas4dyn profile`` would have
measured there: the device's fingerprint, the correction fitted on its calibration subnets, its validation.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from nas4dyn.cost import timing
from nas4dyn.cost.latency import KEY_FIELDS, LatencyTable
from nas4dyn.cost.profiler import ProfilePlan, Subnet, build_table, plan_profile, table_settings
from nas4dyn.cost.settings import RUNTIMES, ProfileSettings
from nas4dyn.errors import ConfigError
from nas4dyn.io import atomic_write_json
from search_spaces.arch import Arch
from search_spaces.space import SearchSpace, space_from_dict
from supernet.scripting import quiet_jit_deprecation

RUN_FILE = "run.py"


def _manifest(plan: ProfilePlan, modules: list[str], items: list[dict[str, Any]], runtime: str) -> dict[str, Any]:
    settings = plan.settings

    def subnets(samples: list[Subnet], offset: int) -> list[dict[str, Any]]:
        return [{"arch": s.arch.to_dict(), "exit_index": s.exit_index, "units": s.units, "item": offset + i}
                for i, s in enumerate(samples)]

    entries = [{"part": key[0], **dict(zip(KEY_FIELDS[key[0]], key[1:])), "level": level, "item": i}
               for i, (key, level, _) in enumerate(plan.entries)]
    return {
        "format": timing.BUNDLE_FORMAT,
        "bundle_id": uuid.uuid4().hex,
        "runtime": runtime,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "space": plan.space.to_dict(),
        "input_size": plan.input_size,
        "settings": {"device": settings.device, "batch_size": settings.batch_size, **table_settings(settings)},
        "modules": modules,
        "items": items,
        "entries": entries,
        "calibration": subnets(plan.calibration, len(entries)),
        "validation": subnets(plan.validation, len(entries) + len(plan.calibration)),
    }


def _save_piece(piece: Any, path: Path) -> None:
    if isinstance(piece, timing.OnnxPiece):
        path.write_bytes(piece.model)
    else:
        with quiet_jit_deprecation():
            torch.jit.save(piece, str(path))


def _save_inputs(inputs: list[Any], directory: Path, runtime: str) -> None:
    if runtime == "onnxruntime":  # read back with allow_pickle=False on the device
        np.savez(directory / timing.ONNX_INPUTS_FILE, **{f"t{i:05d}": a for i, a in enumerate(inputs)})
    else:
        torch.save([t.detach().cpu() for t in inputs], directory / timing.INPUTS_FILE)


def write_bundle(space: SearchSpace, settings: ProfileSettings, out_dir: str | Path,
                 runtime: Optional[str] = None) -> dict[str, Any]:
    """Write the profiling bundle of ``space`` to ``out_dir`` (complete or not at all); returns its manifest.
    ``runtime`` (default: ``settings.runtime``) is what the pieces are for.

    Raises:
        ConfigError: a bad setting, an unknown runtime, or ``out_dir`` is a file or a non-empty directory
            that is not a bundle.
    """
    runtime = runtime or settings.runtime
    if runtime not in RUNTIMES:
        raise ConfigError(f"--runtime {runtime!r}: bundles support {', '.join(RUNTIMES)}")
    settings = dataclasses.replace(settings, runtime=runtime)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / timing.MANIFEST_FILE).exists())):
        raise ConfigError(f"--bundle {out}: exists and is not a profiling bundle; pick a new or empty directory")
    plan = plan_profile(space, settings)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        (tmp / "pieces").mkdir()
        module_index: dict[int, int] = {}
        tensor_index: dict[int, int] = {}
        modules, tensors, items = [], [], []
        suffix = ".onnx" if runtime == "onnxruntime" else ".pt"
        for item in plan.items():
            if id(item.module) not in module_index:
                module_index[id(item.module)] = len(modules)
                modules.append(f"pieces/{len(modules):05d}{suffix}")
                _save_piece(item.module, tmp / modules[-1])
            for t in item.inputs:
                if id(t) not in tensor_index:
                    tensor_index[id(t)] = len(tensors)
                    tensors.append(t)
            items.append({"module": module_index[id(item.module)],
                          "inputs": [tensor_index[id(t)] for t in item.inputs]})
        _save_inputs(tensors, tmp, runtime)
        manifest = _manifest(plan, modules, items, runtime)
        atomic_write_json(tmp / timing.MANIFEST_FILE, manifest)
        shutil.copyfile(timing.__file__, tmp / RUN_FILE)
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _subnets(records: list[dict[str, Any]]) -> list[Subnet]:
    return [Subnet(Arch.from_dict(r["arch"]), r["exit_index"], [float(u) for u in r["units"]]) for r in records]


def read_timings(path: str | Path, space: Optional[str] = None, runtime: Optional[str] = None,
                 bundle: Optional[str | Path] = None) -> dict[str, Any]:
    """The timings document that ``run.py`` wrote, checked whole: readable, of a bundle, one timing per item,
    the manifest unchanged since the device read it — and, when given, of this ``space`` name, ``runtime``
    and ``bundle`` directory.

    Raises:
        ConfigError: naming the problem (truncated or foreign file, another space, runtime or bundle).
    """
    path = Path(path)
    hint = "run `python run.py --out timings.json` in the bundle again and import its output"
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"--import {path}: cannot read it ({type(exc).__name__})") from None
    except ValueError:
        raise ConfigError(f"--import {path}: not valid JSON (truncated?); {hint}") from None
    if not isinstance(data, dict) or data.get("format") != timing.TIMINGS_FORMAT:
        raise ConfigError(f"--import {path}: not the output of a bundle's run.py ({timing.TIMINGS_FORMAT})")
    try:
        manifest, ms = data["manifest"], data["ms"]
        raw = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
        intact = (timing.digest(raw.encode()) == data["manifest_sha256"] and data["bundle_id"] == manifest["bundle_id"]
                  and len(ms) == len(manifest["items"]) and all(isinstance(v, (int, float)) and v > 0 for v in ms))
    except (KeyError, TypeError):
        intact = False
    if not intact:
        raise ConfigError(f"--import {path}: incomplete or edited (the timings do not match the bundle's items); "
                          f"{hint}")
    if space is not None and manifest["space"].get("name") != space:
        raise ConfigError(f"--import {path}: timings of space {manifest['space'].get('name')!r}, not {space!r}; "
                          f"import the timings of a `--space {space}` bundle")
    if runtime is not None and manifest["runtime"] != runtime:
        raise ConfigError(f"--import {path}: timings of runtime {manifest['runtime']!r}, not {runtime!r}; "
                          f"make a bundle with `--runtime {runtime}`")
    if bundle is not None:
        try:
            theirs = json.loads((Path(bundle) / timing.MANIFEST_FILE).read_text())["bundle_id"]
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigError(f"--bundle {bundle}: no readable {timing.MANIFEST_FILE}; "
                              "pass the bundle directory") from None
        if theirs != manifest["bundle_id"]:
            raise ConfigError(f"--import {path}: timings of another bundle (id {manifest['bundle_id'][:8]}, "
                              f"{bundle} is {theirs[:8]}); run this bundle's run.py and import its output")
    return data


def import_timings(path: str | Path, space: Optional[str] = None, runtime: Optional[str] = None,
                   bundle: Optional[str | Path] = None) -> LatencyTable:
    """The latency table of a bundle's timings (see :func:`read_timings` for the checks).

    Raises:
        ConfigError: bad timings (named in one line).
    """
    data = read_timings(path, space, runtime, bundle)
    manifest = data["manifest"]
    space_obj = space_from_dict(manifest["space"], str(path))
    entries = [((e["part"], *(e[f] for f in KEY_FIELDS[e["part"]])), float(e["level"])) for e in manifest["entries"]]
    settings = {k: v for k, v in manifest["settings"].items() if k not in ("device", "batch_size")}
    settings.update(bundle_id=manifest["bundle_id"], seconds=data.get("seconds"))
    return build_table(space_obj, int(manifest["input_size"]), entries, _subnets(manifest["calibration"]),
                       _subnets(manifest["validation"]), [float(v) for v in data["ms"]], data["fingerprint"], settings)

