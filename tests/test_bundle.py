"""Profiling bundles: bundle -> run.py on a "device" that cannot import nas4dyn -> import, against a direct profile."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import nas4dyn
from nas4dyn.cli.main import main
from nas4dyn.cost.bundle import import_timings
from nas4dyn.cost.latency import LatencyModel, LatencyTable
from nas4dyn.cost.profiler import profile_space
from nas4dyn.cost.settings import ProfileSettings

FLAGS = ["--repeats", "6", "--calibrate", "3", "--validate", "3"]
SETTINGS = ProfileSettings(repeats=6, calibrate=3, validate=3)
# run.py as a device runs it: isolated mode (no PYTHONPATH, no cwd on sys.path) and the nas4dyn packages
# blocked, since the venv's editable install would otherwise still resolve them.
DEVICE_PYTHON = ("import runpy, sys\n"
                 "for name in ('nas4dyn', 'supernet', 'search_spaces'):\n"
                 "    sys.modules[name] = None\n"
                 "sys.argv = ['run.py'] + sys.argv[1:]\n"
                 "runpy.run_path('run.py', run_name='__main__')\n")


def run_on_device(bundle: Path, device_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """Copy ``bundle`` outside the repo and run its run.py there, unable to import nas4dyn."""
    copy = device_dir / "bundle"
    shutil.copytree(bundle, copy)
    return subprocess.run([sys.executable, "-I", "-c", DEVICE_PYTHON, *args], cwd=copy, capture_output=True,
                          text=True, timeout=300)


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


def test_the_device_cannot_import_nas4dyn(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "run.py").write_text("import nas4dyn\n")
    (tmp_path / "device").mkdir()
    proc = run_on_device(tmp_path / "b", tmp_path / "device")
    assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr


def test_imported_table_equals_a_direct_profile_within_noise(bundle_run, tmp_path):
    bundle, timings = bundle_run
    out = tmp_path / "lut.json"
    assert main(["profile", "--import", str(timings), "--out", str(out), "--space", "tiny",
                 "--bundle", str(bundle)]) == 0
    imported = LatencyTable.load(out)
    torch.set_num_threads(1)
    direct = profile_space(nas4dyn.load_space("tiny"), SETTINGS, progress=False)
    assert imported.levels.keys() == direct.levels.keys()
    assert imported.fingerprint == direct.fingerprint  # here the "device" is this machine
    # The same plan: the same calibration and validation subnets on the same paths.
    paths = [[(r["exit_index"], r["units"]) for r in t.validation["records"]] for t in (imported, direct)]
    assert paths[0] == paths[1]
    ratios = np.array([lv_i[1] / lv_d[1] for key in direct.levels
                       for lv_i, lv_d in zip(imported.levels[key], direct.levels[key])])
    assert 0.67 < np.median(ratios) < 1.5, np.median(ratios)
    arch = direct.space.max_arch()
    assert 0.67 < LatencyModel(imported).predict(arch) / LatencyModel(direct).predict(arch) < 1.5
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
    other = tmp_path / "other"
    shutil.copytree(bundle, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["bundle_id"] = "0" * 32
    (other / "manifest.json").write_text(json.dumps(manifest))
    assert "another bundle" in _bad_import(["profile", "--import", str(timings), "--out", out, "--bundle", str(other)],
                                           capsys)
    with pytest.raises(nas4dyn.ConfigError, match="runtime 'torchscript', not 'onnxruntime'"):
        import_timings(timings, runtime="onnxruntime")
    assert not (tmp_path / "l.json").exists()


def test_run_py_refuses_a_bundle_of_another_runtime(bundle_run, tmp_path):
    bundle, _ = bundle_run
    other = tmp_path / "other"
    shutil.copytree(bundle, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["runtime"] = "onnxruntime"
    (other / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "device").mkdir()
    proc = run_on_device(other, tmp_path / "device", "--out", str(tmp_path / "t.json"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and "runtime 'onnxruntime'" in lines[0]
    assert not (tmp_path / "t.json").exists()


def test_bundle_into_a_foreign_directory_is_refused(tmp_path, capsys):
    (tmp_path / "stuff.txt").write_text("mine")
    assert "not a profiling bundle" in _bad_import(["profile", "--space", "tiny", "--bundle", str(tmp_path)], capsys)
    assert (tmp_path / "stuff.txt").read_text() == "mine"
