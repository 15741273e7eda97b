"""Profiling bundles: bundle -> run.py on a "device" that cannot import nas4dyn (nor torch, for an onnxruntime
bundle, here of a space with width and EMG gates) -> import, against a direct profile."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import nas4dyn
from nas4dyn.cli.main import main
from nas4dyn.cost.bundle import import_timings
from nas4dyn.cost.latency import LatencyModel, LatencyTable
from tests.conftest import onnx_space

FLAGS = ["--repeats", "6", "--calibrate", "3", "--validate", "3"]
PROJECT = ("nas4dyn", "supernet", "search_spaces")
# run.py as a device runs it: isolated mode (no PYTHONPATH, no cwd on sys.path) and the blocked packages (the
# nas4dyn ones, which the venv's editable install would otherwise still resolve; torch for a device with only
# onnxruntime) made unimportable: a None in sys.modules fails every import of the name and its submodules.
DEVICE_PYTHON = ("import runpy, sys\n"
                 "blocked = sys.argv[1].split(',')\n"
                 "for name in blocked:\n"
                 "    sys.modules[name] = None\n"
                 "sys.argv = ['run.py'] + sys.argv[2:]\n"
                 "try:\n"
                 "    runpy.run_path('run.py', run_name='__main__')\n"
                 "finally:  # nothing of a blocked package got loaded by another way\n"
                 "    loaded = [m for m in sys.modules if m.split('.')[0] in blocked and sys.modules[m] is not None]\n"
                 "    assert not loaded, loaded\n")


def run_on_device(bundle: Path, device_dir: Path, *args: str, blocked: tuple[str, ...] = PROJECT
                  ) -> subprocess.CompletedProcess:
    """Copy ``bundle`` outside the repo and run its run.py there, unable to import the ``blocked`` packages."""
    copy = device_dir / "bundle"
    shutil.copytree(bundle, copy)
    return subprocess.run([sys.executable, "-I", "-c", DEVICE_PYTHON, ",".join(blocked), *args], cwd=copy,
                          capture_output=True, text=True, timeout=300)


def edited_copy(bundle: Path, dest: Path, edit: Callable[[dict], Any]) -> Path:
    """A copy of ``bundle`` at ``dest`` whose manifest ``edit`` changed in place."""
    shutil.copytree(bundle, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    edit(manifest)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


@pytest.fixture(scope="module")
def bundle_run(tmp_path_factory):
    """(bundle dir, timings.json) of the tiny space, made with the CLI and run as on a device."""
    root = tmp_path_factory.mktemp("bundle")
    bundle = root / "b"
    assert main(["profile", "--space", "tiny", "--bundle", str(bundle), *FLAGS]) == 0
    proc = run_on_device(bundle, tmp_path_factory.mktemp("device"), "--out", str(root / "timings.json"),
                         "--no-progress")
    assert proc.returncode == 0, proc.stderr
    return bundle, root / "timings.json"


@pytest.mark.parametrize("module", ["nas4dyn", "torch", "torch.nn"])
def test_the_device_cannot_import_nas4dyn_or_torch(tmp_path, module):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "run.py").write_text(f"import {module}\n")
    (tmp_path / "device").mkdir()
    proc = run_on_device(tmp_path / "b", tmp_path / "device", blocked=PROJECT + ("torch",))
    assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr


def direct_profile(tmp_path: Path, space: str, *args: str) -> LatencyTable:
    """A table profiled here by the CLI in a fresh process, as the device ran its bundle: a profile inside this
    test process, after the suite's earlier tests, timed every entry up to 1.6x slower than the fresh device
    process (entries' median ratio 0.62 in a full run, 1.0 alone)."""
    out = tmp_path / "direct.json"
    proc = subprocess.run([sys.executable, "-m", "nas4dyn", "profile", "--space", space, "--out", str(out),
                           "--threads", "1", *FLAGS, *args], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    return LatencyTable.load(out)


def test_imported_table_equals_a_direct_profile_within_noise(bundle_run, tmp_path):
    bundle, timings = bundle_run
    out = tmp_path / "lut.json"
    assert main(["profile", "--import", str(timings), "--out", str(out), "--space", "tiny",
                 "--bundle", str(bundle)]) == 0
    imported = LatencyTable.load(out)
    direct = direct_profile(tmp_path, "tiny")
    assert imported.levels.keys() == direct.levels.keys()
    assert imported.fingerprint == direct.fingerprint  # here the "device" is this machine
    # The same plan: the same calibration and validation subnets on the same paths.
    paths = [[(r["exit_index"], r["units"]) for r in t.validation["records"]] for t in (imported, direct)]
    assert paths[0] == paths[1]
    # Exit entries are differences of two subnets' times (timed in context), which noise can take to 0 here.
    ratios = np.array([lv_i[1] / lv_d[1] for key in direct.levels if key[0] != "exit"
                       for lv_i, lv_d in zip(imported.levels[key], direct.levels[key])])
    assert 0.67 < np.median(ratios) < 1.5, np.median(ratios)
    # The entries along the largest subnet, not its corrected prediction: the correction is fitted on 3 tiny
    # subnets of a few microseconds each, and one disturbed timing can double its slope on either side.
    arch = direct.space.max_arch()
    assert 0.67 < LatencyModel(imported).path_sum(arch) / LatencyModel(direct).path_sum(arch) < 1.5
    assert imported.validation["static"]["n"] == direct.validation["static"]["n"]


def _bad_import(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_truncated_or_edited_timings_are_refused(bundle_run, tmp_path, capsys):
    _, timings = bundle_run
    text = timings.read_text()
    cut = tmp_path / "cut.json"
    cut.write_text(text[: len(text) // 2])
    assert "truncated" in _bad_import(["profile", "--import", str(cut), "--out", str(tmp_path / "l.json")], capsys)
    data = json.loads(text)
    data["ms"] = data["ms"][:-1]
    short = tmp_path / "short.json"
    short.write_text(json.dumps(data))
    assert "incomplete" in _bad_import(["profile", "--import", str(short), "--out", str(tmp_path / "l.json")], capsys)
    assert not (tmp_path / "l.json").exists()


def test_timings_of_another_space_or_bundle_are_refused(bundle_run, tmp_path, capsys):
    bundle, timings = bundle_run
    out = str(tmp_path / "l.json")
    argv = ["profile", "--import", str(timings), "--out", out, "--space", "fmnist"]
    assert "not 'fmnist'" in _bad_import(argv, capsys)
    other = edited_copy(bundle, tmp_path / "other", lambda manifest: manifest.update(bundle_id="0" * 32))
    assert "another bundle" in _bad_import(["profile", "--import", str(timings), "--out", out, "--bundle", str(other)],
                                           capsys)
    with pytest.raises(nas4dyn.ConfigError, match="runtime 'torchscript', not 'onnxruntime'"):
        import_timings(timings, runtime="onnxruntime")
    assert not (tmp_path / "l.json").exists()


def run_py_refusal(bundle: Path, tmp_path: Path, *args: str) -> str:
    """The one line run.py fails with on ``bundle`` (checking that it wrote no timings)."""
    (tmp_path / "device").mkdir()
    proc = run_on_device(bundle, tmp_path / "device", "--out", str(tmp_path / "t.json"), *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert not (tmp_path / "t.json").exists()
    return lines[0]


def test_run_py_refuses_a_bundle_of_another_runtime(bundle_run, tmp_path):
    other = edited_copy(bundle_run[0], tmp_path / "other", lambda manifest: manifest.update(runtime="tensorrt"))
    assert "runtime 'tensorrt'" in run_py_refusal(other, tmp_path)


def test_run_py_refuses_threads_with_the_cpu_clock(bundle_run, tmp_path):
    # The CPU clock sees the calling thread only.
    other = edited_copy(bundle_run[0], tmp_path / "cpu_clock",
                        lambda manifest: manifest["settings"].update(clock="cpu"))
    line = run_py_refusal(other, tmp_path, "--threads", "2")
    assert "--threads 2" in line and "--threads 1" in line


def test_a_torchscript_bundle_on_a_device_without_torch_says_so(bundle_run, tmp_path):
    bundle, _ = bundle_run
    (tmp_path / "device").mkdir()
    proc = run_on_device(bundle, tmp_path / "device", "--out", str(tmp_path / "t.json"), blocked=PROJECT + ("torch",))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and "needs torch" in lines[0], proc.stderr
    assert not (tmp_path / "t.json").exists()


# ---- onnxruntime bundles: run.py needs only onnxruntime, numpy and the standard library ----------------------
@pytest.fixture(scope="module")
def ort_bundle_run(tmp_path_factory):
    """(bundle dir, timings.json, space file) of an onnxruntime bundle of :func:`~tests.conftest.onnx_space` (width,
    EMG, channel and skip gates, CIGT routing), run where torch cannot load."""
    root = tmp_path_factory.mktemp("ort_bundle")
    bundle, space_file = root / "b", root / "tiny_onnx.json"
    space_file.write_text(json.dumps(onnx_space().to_dict()))
    assert main(["profile", "--space", str(space_file), "--bundle", str(bundle), "--runtime", "onnxruntime",
                 *FLAGS]) == 0
    proc = run_on_device(bundle, tmp_path_factory.mktemp("device"), "--out", str(root / "timings.json"),
                         "--no-progress", blocked=PROJECT + ("torch",))
    assert proc.returncode == 0, proc.stderr
    return bundle, root / "timings.json", space_file


def test_onnxruntime_bundle_runs_without_torch_and_imports_like_a_direct_profile(ort_bundle_run, tmp_path):
    bundle, timings, space_file = ort_bundle_run
    assert (bundle / "inputs.npz").is_file() and not (bundle / "inputs.pt").exists()
    assert {p.suffix for p in (bundle / "pieces").iterdir()} == {".onnx"}
    out = tmp_path / "lut.json"
    assert main(["profile", "--import", str(timings), "--out", str(out), "--space", str(space_file), "--bundle",
                 str(bundle), "--runtime", "onnxruntime"]) == 0
    imported = LatencyTable.load(out)
    direct = direct_profile(tmp_path, str(space_file), "--runtime", "onnxruntime")
    assert imported.runtime == "onnxruntime" and imported.fingerprint == direct.fingerprint
    assert imported.levels.keys() == direct.levels.keys() and imported.missing_gates() == []
    assert {"width", "emg"} <= {key[6] for key in imported.levels if key[0] == "block"}
    paths = [[(r["exit_index"], r["units"]) for r in t.validation["records"]] for t in (imported, direct)]
    assert paths[0] == paths[1]
    arch = direct.space.max_arch()  # its entries, as above
    assert 0.5 < LatencyModel(imported).path_sum(arch) / LatencyModel(direct).path_sum(arch) < 2.0


def test_timings_of_another_runtime_are_refused(ort_bundle_run, bundle_run, tmp_path, capsys):
    ort_timings = ort_bundle_run[1]
    _, ts_timings = bundle_run
    out = str(tmp_path / "l.json")
    assert "not 'torchscript'" in _bad_import(["profile", "--import", str(ort_timings), "--out", out, "--runtime",
                                               "torchscript"], capsys)
    assert "not 'onnxruntime'" in _bad_import(["profile", "--import", str(ts_timings), "--out", out, "--runtime",
                                               "onnxruntime"], capsys)
    assert not (tmp_path / "l.json").exists()


def test_bundle_into_a_foreign_directory_is_refused(tmp_path, capsys):
    (tmp_path / "stuff.txt").write_text("mine")
    assert "not a profiling bundle" in _bad_import(["profile", "--space", "tiny", "--bundle", str(tmp_path)], capsys)
    assert (tmp_path / "stuff.txt").read_text() == "mine"
