"""The export and evaluate verbs: they work end to end, write the card and results, and reject bad input with one
line. The exported models themselves: tests/test_export.py."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import nas4dyn
from nas4dyn.api import save_supernet
from nas4dyn.cli.main import main
from nas4dyn.export.program import load_program
from search_spaces import Arch
from tests.test_export import ALL_MECHANISMS, ONNX_MECHANISMS, calibrated, data, net  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def run_dir(net, data, tmp_path_factory):
    root = tmp_path_factory.mktemp("export_cli")
    save_supernet(root / "run" / "supernet.pt", net, data["info"])
    arch = calibrated(net, ONNX_MECHANISMS, data["normalised"])
    other = nas4dyn.load_space("fmnist").max_arch()
    archs = (arch, arch.without_dynamic(), ALL_MECHANISMS)  # the last: MBConv channel gates, refused by ONNX
    (root / "pareto.json").write_text(json.dumps([{"arch": a.to_dict(), "metrics": {}} for a in archs]))
    (root / "other_space.json").write_text(json.dumps(other.to_dict()))
    assert main(["profile", "--space", "tiny", "--out", str(root / "lut.json"), "--repeats", "3", "--calibrate", "2"]) == 0
    return root


def test_cli_export_then_evaluate(run_dir, capsys):
    out = run_dir / "exp"
    code = main(["export", "--run", str(run_dir / "run"), "--arch", f"{run_dir / 'pareto.json'}#0", "--out", str(out),
                 "--bn-images", "64", "--latency-samples", "16", "--repeats", "2",
                 "--latency-table", str(run_dir / "lut.json")])
    assert code == 0
    for name in ("model.ts", "arch.json", "card.json", "onnx.json", "model.onnx"):
        assert (out / name).is_file(), name
    card = json.loads((out / "card.json").read_text())
    for key in ("accuracy", "macs_max", "macs_expected", "latency_ms", "exit_rates", "gate_rates", "thresholds",
                "input", "dataset", "versions"):
        assert key in card, key
    assert 0.0 <= card["accuracy"] <= 1.0 and sum(card["exit_rates"]) == pytest.approx(1.0)
    assert card["macs_expected"] < card["macs_max"] and card["latency_ms"] > 0
    assert card["input"]["channels"] == 1 and len(card["input"]["mean"]) == 1
    assert card["latency_ms_predicted"] > 0 and card["latency_predicted_table"]["settings"]
    # Predicted and measured: the same statistic, clock and thread count, stated in the card.
    table = card["latency_predicted_table"]
    measured = (card["latency"]["statistic"], card["latency"]["clock"])
    assert measured == (table["statistic"], table["clock"]) == ("median", "wall")
    assert card["latency"]["threads"] == table["threads"] == 1 and table["runtime"] == "torchscript"
    assert card["latency_relative_error"] == pytest.approx(card["latency_ms_predicted"] / card["latency_ms"] - 1)
    assert Arch.from_dict(json.loads((out / "arch.json").read_text())).exits
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".exp")]  # no temp dirs left behind

    code = main(["evaluate", str(out), "--data", "synthetic", "--latency-samples", "16", "--repeats", "2"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "ms per image at batch 1" in printed
    result = json.loads((out / "eval_synthetic_test.json").read_text())
    assert result["accuracy"] == pytest.approx(card["accuracy"])  # the same model on the same split
    assert result["exit_rates"] == pytest.approx(card["exit_rates"])
    assert result["macs_realized_batch1"] < card["macs_max"]
    assert result["latency_batch64"]["ms_per_sample"] < result["latency_batch1"]["ms_per_sample"] * 2


def test_evaluate_on_other_data_keeps_every_result_and_the_card(run_dir, tmp_path, capsys):
    """Results per dataset and split: another dataset (an ImageFolder of the model's shape) or a subset adds a file;
    card.json is never touched."""
    out = run_dir / "exp_eval"
    assert main(["export", "--run", str(run_dir / "run"), "--arch", f"{run_dir / 'pareto.json'}#1", "--out", str(out),
                 "--format", "torchscript", "--bn-images", "0", "--latency-samples", "4", "--repeats", "1"]) == 0
    card = (out / "card.json").read_bytes()
    folder = tmp_path / "folder"
    rng = np.random.default_rng(0)
    for c in range(10):
        (folder / "test" / f"c{c}").mkdir(parents=True)
        (folder / "train" / f"c{c}").mkdir(parents=True)
        for split in ("train", "test"):
            Image.fromarray(rng.integers(0, 256, (16, 16)).astype(np.uint8), "L").save(folder / split / f"c{c}" / "0.png")
    fast = ["--latency-samples", "4", "--repeats", "1"]
    for data, extra in (("synthetic", []), (str(folder), []), ("synthetic", ["--limit", "20"])):
        assert main(["evaluate", str(out), "--data", data, *fast, *extra]) == 0
    written = sorted(p.name for p in out.glob("eval_*.json"))
    assert len(written) == 3 and "eval_synthetic_test.json" in written and "eval_synthetic_test_limit20.json" in written
    assert json.loads((out / "eval_synthetic_test_limit20.json").read_text())["samples"] == 20
    assert [n for n in written if n.startswith("eval_folder-")], written
    assert (out / "card.json").read_bytes() == card
    capsys.readouterr()


@pytest.mark.parametrize("args, words", [
    (("--repeats", "0"), "--repeats: 0: must be 1 or more"),
    (("--batch-size", "0"), "--batch-size: 0: must be 1 or more"),
    (("--limit", "x"), "'x' is not an integer"),
])
def test_evaluate_numeric_flags_are_validated(run_dir, args, words, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", str(run_dir), "--data", "synthetic", *args])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exc.value.code == 2 and len(lines) == 1 and words in lines[0], lines


def test_export_out_under_a_file_fails_before_the_work(run_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["export", "--run", str(run_dir / "run"), "--arch", f"{run_dir / 'pareto.json'}#1",
                 "--out", str(tmp_path / "file" / "exp")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "is a file" in lines[0], lines


def test_export_warns_when_prediction_and_measurement_disagree(run_dir, caplog):
    lut = json.loads((run_dir / "lut.json").read_text())
    lut["correction"] = {"a": 50 * lut["correction"]["a"], "b": 50 * lut["correction"]["b"]}  # a much slower machine
    (run_dir / "slow_lut.json").write_text(json.dumps(lut))
    assert main(["export", "--run", str(run_dir / "run"), "--arch", f"{run_dir / 'pareto.json'}#1", "--out",
                 str(run_dir / "exp_slow"), "--format", "torchscript", "--bn-images", "0", "--latency-samples", "8",
                 "--repeats", "1", "--latency-table", str(run_dir / "slow_lut.json")]) == 0
    warned = [r.getMessage() for r in caplog.records
              if r.levelname == "WARNING" and "predicted latency" in r.getMessage()]
    assert len(warned) == 1 and "another machine" in warned[0] and "loaded" in warned[0]
    assert json.loads((run_dir / "exp_slow" / "card.json").read_text())["latency_relative_error"] > 0.15


@pytest.mark.parametrize("edit, extra, words", [
    (lambda lut: lut, ("--threads", "2"), "--threads 2"),
    (lambda lut: lut["fingerprint"].update(runtime="onnxruntime"), ("--format", "torchscript"), "times onnxruntime"),
    (lambda lut: lut, ("--format", "onnx"), "times torchscript"),  # the deployment is model.onnx
    (lambda lut: lut["fingerprint"].update(batch_size=8), (), "batch 8"),
])
def test_export_refuses_a_table_of_another_kind(run_dir, edit, extra, words, capsys):
    lut = json.loads((run_dir / "lut.json").read_text())
    edit(lut)
    (run_dir / "other_lut.json").write_text(json.dumps(lut))
    assert main(["export", "--run", str(run_dir / "run"), "--arch", f"{run_dir / 'pareto.json'}#1", "--out",
                 str(run_dir / "bad"), "--latency-table", str(run_dir / "other_lut.json"), *extra]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and words in lines[0]
    assert not (run_dir / "bad").exists()


def test_export_times_model_onnx_with_an_onnxruntime_table(run_dir):
    import onnxruntime

    # The torchscript table's figures under an onnxruntime fingerprint: what is tested is which file the card
    # times (profiling onnxruntime tables: tests/test_onnx_profile.py).
    data = json.loads((run_dir / "lut.json").read_text())
    data["fingerprint"] = {**{k: v for k, v in data["fingerprint"].items() if k != "torch"}, "runtime": "onnxruntime",
                           "onnxruntime": onnxruntime.__version__}
    lut = run_dir / "ort_lut.json"
    lut.write_text(json.dumps(data))
    out = run_dir / "exp_ort"
    assert main(["export", "--run", str(run_dir / "run"), "--arch", f"{run_dir / 'pareto.json'}#0", "--out", str(out),
                 "--format", "onnx", "--bn-images", "0", "--latency-samples", "8", "--repeats", "1",
                 "--latency-table", str(lut)]) == 0
    card = json.loads((out / "card.json").read_text())
    assert card["latency"]["runtime"] == card["latency_predicted_table"]["runtime"] == "onnxruntime"
    assert card["latency_ms"] > 0 and card["latency_ms_predicted"] > 0 and "model.onnx" in card["files"]


def test_cli_exports_a_static_arch_with_torch_export_too(run_dir):
    out = run_dir / "exp_static"
    assert main(["export", "--run", str(run_dir / "run"), "--arch", f"{run_dir / 'pareto.json'}#1", "--out", str(out),
                 "--format", "torchscript,export", "--bn-images", "0", "--latency-samples", "4", "--repeats", "1"]) == 0
    assert "model.pt2" in json.loads((out / "card.json").read_text())["files"]
    x = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    program, scripted = load_program(out), nas4dyn.load_exported(out)
    with torch.no_grad():
        assert (program(x) - scripted(x)).abs().max() <= 1e-5
        assert (program(x[:1]) - scripted(x[:1])).abs().max() <= 1e-5  # the batch dimension is dynamic


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nas4dyn", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("arch, extra, words", [
    ("missing.json", (), "no such file"),
    ("pareto.json#7", (), "out of range"),
    ("pareto.json#2", ("--format", "torchscript,onnx"), "MBConv channel gates cannot skip in ONNX"),
    ("pareto.json#x", (), "not an integer"),
    ("pareto.json", (), "pick one"),
    ("other_space.json", (), "arch.space"),
    ("pareto.json#0", ("--latency-table", "no-such-lut.json"), "--latency-table"),
    ("pareto.json#0", ("--format", "torchscript,export"), "torch.export cannot carry"),
])
def test_cli_export_rejects_bad_input(run_dir, arch, extra, words):
    out = _cli("export", "--run", str(run_dir / "run"), "--arch", str(run_dir / arch), "--out", str(run_dir / "bad"),
               *extra)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert words in lines[0] and "Traceback" not in out.stderr
    assert not (run_dir / "bad").exists()
