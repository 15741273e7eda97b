"""Export: the TorchScript and ONNX models agree with the supernet, keep batch order, really skip work, and the
export / evaluate verbs work end to end and reject bad input with one line."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import nas4dyn
from nas4dyn.api import load_supernet_file, save_supernet
from nas4dyn.cli.main import main
from nas4dyn.data import load_data
from nas4dyn.export.measure import realized_macs
from nas4dyn.export.onnx import OnnxDynamicModel, export_onnx
from nas4dyn.export.program import load_program
from nas4dyn.export.torchscript import save_torchscript
from search_spaces import Arch
from search_spaces.arch import ExitChoice
from supernet.dynamic.gates import SkipGate
from tests.conftest import make_decisive

RES = 16
# Every mechanism of the tiny space: channel gates on basic and MBConv blocks, skip gates on both, three exits.
ALL_MECHANISMS = Arch("tiny", RES, (2, 2, 2), ((3, 5), (3, 5), (3, 3)), ((8, 4), (3, 2), (16, 8)),
                      (("channel", "skip"), ("channel", "skip"), ("channel", "skip")),
                      (ExitChoice(0, 0, 0.5), ExitChoice(1, 1, 0.5), ExitChoice(2, 0, 0.5)))


def onnx_able(arch: Arch) -> Arch:
    """``arch`` with the MBConv stage's channel gates (which ONNX refuses) turned into skip gates."""
    return dataclasses.replace(arch, gates=tuple(tuple("skip" if s == 1 and g == "channel" else g for g in st)
                                                 for s, st in enumerate(arch.gates)))


ONNX_MECHANISMS = onnx_able(ALL_MECHANISMS)


@pytest.fixture(scope="module")
def data():
    bundle = load_data("synthetic", synthetic={"resolution": RES}, augment=False)
    x = torch.stack([bundle.test[i][0] for i in range(96)])
    mean = torch.tensor(bundle.info.mean).view(1, -1, 1, 1)
    std = torch.tensor(bundle.info.std).view(1, -1, 1, 1)
    images = x * std + mean  # back in [0, 1]: what the exported model takes
    return {"info": bundle.info.to_dict(), "images": images, "normalised": (images - mean) / std}


def between(values: torch.Tensor, share: float = 0.5) -> torch.Tensor:
    """Per column, a value with ``share`` of the rows above it, halfway between two observed values (so no
    decision hinges on rounding)."""
    ordered = values.sort(0).values
    k = int(len(values) * (1 - share))
    return (ordered[k - 1] + ordered[k]) / 2


@pytest.fixture(scope="module")
def net(data):
    """An untrained tiny supernet whose gates split the data: gater and skip-gate biases are moved to the
    median logit over the data, so each gate is on for about half of the samples."""
    torch.manual_seed(0)
    net = make_decisive(nas4dyn.build_supernet("tiny"))
    x = data["normalised"]
    with torch.no_grad():
        net.gater.fc2.weight.mul_(10.0)
        net.gater.fc2.bias.sub_(between(net.gater(x)))
        logits: dict[SkipGate, torch.Tensor] = {}
        hooks = [m.register_forward_hook(lambda m, i, o: logits.__setitem__(m, o))
                 for m in net.modules() if isinstance(m, SkipGate)]
        net.set_active(dataclasses.replace(ALL_MECHANISMS, exits=()))
        net.forward_all(x)
        for h in hooks:
            h.remove()
        for gate, out in logits.items():  # weights x10, then the bias that puts the median logit at 0
            gate.fc2.weight.mul_(10.0)
            gate.fc2.bias.copy_(-between(10.0 * (out - gate.fc2.bias)))
    return net.eval()


def calibrated(net, arch: Arch, x: torch.Tensor, share: float = 0.35) -> Arch:
    """``arch`` with each exit's threshold between two observed confidences, so about ``share`` of the
    samples still running leave there (never exactly at a confidence: decisions must not hinge on rounding)."""
    net.set_active(arch.with_thresholds([0.5] * len(arch.exits)))
    with torch.no_grad():
        outs = net.forward_all(x)[:-1]
    return arch.with_thresholds([float(between(torch.softmax(z, 1).max(1).values, share)) for z in outs])


def reference(net, arch: Arch, x: torch.Tensor):
    net.set_active(arch)
    with torch.no_grad():
        return net.forward_with_exits(x)


def sampled_archs(space, n: int = 6) -> list[Arch]:
    import random

    archs, seed = [ALL_MECHANISMS], 0
    while len(archs) < n:
        arch = space.sample(random.Random(seed))
        seed += 1
        if arch.exits and any(g != "none" for s in arch.gates for g in s):
            archs.append(arch)
    return archs


def test_torchscript_and_onnx_agree_with_the_supernet(net, data, tmp_path):
    space = nas4dyn.load_space("tiny")
    exits_seen, partial_gates = set(), 0
    for i, arch in enumerate(sampled_archs(space)):
        arch = calibrated(net, onnx_able(arch), data["normalised"])
        ref_logits, ref_exit = reference(net, arch, data["normalised"])
        model = nas4dyn.export_subnet(net, arch, data["info"])
        save_torchscript(model, tmp_path / f"m{i}.ts")
        export_onnx(model, tmp_path / f"onnx{i}", RES)
        scripted = nas4dyn.load_exported(tmp_path / f"m{i}.ts")
        with torch.no_grad():
            ts_logits, ts_exit = scripted.forward_with_exits(data["images"])
            decisions = scripted.gate_decisions(data["images"]).float()
        onnx_logits, onnx_exit = OnnxDynamicModel(tmp_path / f"onnx{i}").forward_with_exits(data["images"].numpy())
        for logits, exit_index in ((ts_logits, ts_exit), (torch.from_numpy(onnx_logits), torch.from_numpy(onnx_exit))):
            assert torch.equal(exit_index, ref_exit), arch
            assert torch.equal(logits.argmax(1), ref_logits.argmax(1))
            assert (logits - ref_logits).abs().max() <= 1e-4
        exits_seen |= set(ref_exit.tolist())
        rate = decisions.mean(0)
        partial_gates += int(((rate > 0) & (rate < 1)).sum())
    # The comparison means something only if samples took different paths.
    assert len(exits_seen) >= 3 and partial_gates >= 5


def test_onnx_graph_passes_the_checker(net, data, tmp_path):
    files = export_onnx(nas4dyn.export_subnet(net, calibrated(net, ONNX_MECHANISMS, data["normalised"]), data["info"]),
                        tmp_path, RES)
    assert [f.name for f in files] == ["model.onnx", "onnx.json"]  # one graph carries every exit and gate
    graph = onnx.load(str(files[0]))
    onnx.checker.check_model(graph, full_check=True)

    def ops(g: onnx.GraphProto) -> set[str]:
        return {n.op_type for n in g.node} | {o for n in g.node for a in n.attribute if a.type == a.GRAPH
                                              for o in ops(a.g)}

    # exits and skip gates as If over gathered / scattered samples, narrowed channel-gated convs
    assert {"If", "NonZero", "Gather", "ScatterND"} <= ops(graph.graph)


def test_batch_order_is_preserved_under_compaction(net, data):
    arch = calibrated(net, ALL_MECHANISMS, data["normalised"])
    model = torch.jit.script(nas4dyn.export_subnet(net, arch, data["info"]))
    x = data["images"][:32]
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, exits = model.forward_with_exits(x)
        plogits, pexits = model.forward_with_exits(x[perm])
        assert len(set(exits.tolist())) >= 3  # samples left at different exits: the batch was compacted
        assert torch.equal(pexits, exits[perm]) and (plogits - logits[perm]).abs().max() <= 1e-5
        for i in range(len(x)):
            one, e = model.forward_with_exits(x[i : i + 1])
            assert e.item() == exits[i].item() and (one[0] - logits[i]).abs().max() <= 1e-5


def test_skip_gate_single_sample_decision_is_its_logits_sign():
    """SkipGate.opens (the exported models' batch-1 path) decides as forward(x) > 0, on scripted gates too."""
    torch.manual_seed(0)
    gate = SkipGate(8).eval()
    xs = 2 * torch.randn(200, 1, 8, 1, 1) + torch.randn(200, 1, 8, 5, 7)  # pooled inputs that differ per sample
    with torch.no_grad():
        gate.fc2.bias -= torch.stack([gate(x)[0] for x in xs]).median()  # decisions go both ways
        scripted = torch.jit.script(gate)
        logits = torch.stack([gate(x)[0] for x in xs])
        clear = logits.abs() > 1e-5  # a logit this close to 0 may round either way
        assert 40 < int((logits > 0).sum()) < 160 and int(clear.sum()) > 190
        for x, logit, decided in zip(xs, logits, clear):
            if decided:
                assert gate.opens(x) == scripted.opens(x) == bool(logit > 0)


def test_static_export_equals_the_static_extraction(net, data, tmp_path):
    static = ALL_MECHANISMS.without_dynamic()
    model = nas4dyn.export_subnet(net, static, data["info"])
    assert model.subnet.gater is None and len(model.subnet.segments) == 1 and model.gate_blocks == []
    scripted = save_torchscript(model, tmp_path / "static.ts")
    export_onnx(model, tmp_path, RES)
    extracted = net.extract(static).eval()
    with torch.no_grad():
        expected = extracted(data["normalised"])
        for out in (scripted(data["images"]), torch.from_numpy(OnnxDynamicModel(tmp_path)(data["images"].numpy()))):
            assert (out - expected).abs().max() <= 1e-5


def test_exported_model_really_skips_work(net, data):
    """Counted multiply-adds per sample at batch 1: samples that exit early or close gates cost less."""
    arch = calibrated(net, ALL_MECHANISMS, data["normalised"])
    dynamic = torch.jit.script(nas4dyn.export_subnet(net, arch, data["info"]))
    static = nas4dyn.export_subnet(net, arch.without_dynamic(), data["info"])
    images = data["images"][:24]
    with torch.no_grad():
        _, exits = dynamic.forward_with_exits(images)
    per_sample = torch.tensor([realized_macs(dynamic, images[i : i + 1]) for i in range(len(images))])
    full = realized_macs(static, images[:1])
    first = per_sample[exits == 0]
    assert len(first) and first.max() < full / 2  # the rest of the network did not run
    late = per_sample[exits == len(arch.exits)]
    assert len(late) and late.min() < late.max()  # different gate patterns, different work
    assert per_sample.mean() < full


def test_supernet_file_with_missing_weights_is_a_one_line_checkpoint_error(net, data, tmp_path):
    path = tmp_path / "supernet.pt"
    save_supernet(path, net, data["info"])
    blob = torch.load(path, weights_only=True)
    blob["state_dict"] = {k: v for k, v in blob["state_dict"].items() if not k.startswith("stem.")}
    torch.save(blob, path)
    with pytest.raises(nas4dyn.CheckpointError) as err:
        load_supernet_file(path)
    assert "Missing key" in str(err.value) and "\n" not in str(err.value)


def test_load_exported_reports_a_missing_model(tmp_path):
    with pytest.raises(nas4dyn.CheckpointError, match="model.ts"):
        nas4dyn.load_exported(tmp_path)


# ---- command line -------------------------------------------------------------------------------------------
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


def test_every_gate_kind_exports_through_torchscript():
    """Every gate kind exports exactly to model.ts (DFS too, which has no ONNX translation)."""
    import random

    space = nas4dyn.load_space("fmnist_dynamic_all")
    torch.manual_seed(0)
    net = make_decisive(nas4dyn.build_supernet(space))
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    kinds = set()
    for seed in range(4):
        arch = space.sample(random.Random(seed))
        model = torch.jit.script(nas4dyn.export_subnet(net, arch, {"mean": [0.3], "std": [0.4]}))
        ref_logits, ref_exit = reference(net, arch, (x - 0.3) / 0.4)
        with torch.no_grad():
            logits, exit_index = model.forward_with_exits(x)
            decisions = model.gate_decisions(x)
        assert torch.equal(exit_index, ref_exit) and (logits - ref_logits).abs().max() <= 1e-4
        assert decisions.shape == (len(x), sum(model.gate_sizes))
        kinds |= set(model.gate_kinds)
    assert {"channel", "emg", "dfs"} <= kinds


def test_realized_macs_count_int8_convolutions():
    """A DFS block's int8 branch runs the same conv shapes as its fp32 branch: the realized MACs of the
    scripted, frozen model are equal with every sample on int8 and on fp32 (FlopCounterMode alone sees no
    quantized conv, so int8 counted as free), and lower when the branch is skipped."""
    from nas4dyn.export.torchscript import script_model
    from tests.conftest import all_space

    space = all_space()
    torch.manual_seed(0)
    net = make_decisive(nas4dyn.build_supernet(space))
    arch = dataclasses.replace(space.max_arch(), gates=(("none", "dfs"), ("none", "none"), ("none", "none")))
    x = torch.rand(3, 1, RES, RES, generator=torch.Generator().manual_seed(0))
    macs = {}
    for option in (0, 1, 2):  # skip, int8, fp32
        model = nas4dyn.export_subnet(net, arch, {"mean": [0.5], "std": [0.25]})
        bias = torch.full((3,), -1e4)
        bias[option] = 1e4
        model.subnet.segments[0].blocks[1].dfs_gate.fc2.bias.data.copy_(bias)
        scripted = script_model(model)
        assert set(scripted.gate_decisions(x).float().argmax(1).flatten().tolist()) == {option}
        macs[option] = realized_macs(scripted, x, 1)
    assert macs[1] == pytest.approx(macs[2]) and macs[0] < macs[2]
