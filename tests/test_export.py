"""Export: the TorchScript and ONNX models agree with the supernet, keep batch order and really skip work, and
every gate kind exports. The export / evaluate verbs: tests/test_export_cli.py."""
from __future__ import annotations

import dataclasses

import onnx
import pytest
import torch

import nas4dyn
from nas4dyn.api import load_supernet_file, save_supernet
from nas4dyn.data import load_data
from nas4dyn.export.measure import realized_macs
from nas4dyn.export.onnx import OnnxDynamicModel, export_onnx
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
