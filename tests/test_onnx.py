"""ONNX export beyond the basics of test_export: routed (CIGT) archs, width and EMG gates, refused gates, a
manifest that cannot point outside its folder, and the README's deployment examples run in a process that cannot
import nas4dyn."""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import nas4dyn
from nas4dyn.errors import CheckpointError, ConfigError
from nas4dyn.export.onnx import OnnxDynamicModel, check_onnx_exportable, export_onnx
from nas4dyn.export.pipeline import DEFAULT_FORMATS, _default_formats
from nas4dyn.export.torchscript import save_torchscript
from search_spaces.arch import Arch, ExitChoice
from supernet.dynamic.emg import EMGGate
from supernet.dynamic.heads import confidence
from supernet.dynamic.width import WidthGate
from tests.conftest import all_space, make_decisive
from tests.test_export import between, calibrated

REPO = Path(__file__).resolve().parents[1]
RES = 16
# Refuses every import of the project, so the code after it shows what a deployment without nas4dyn sees
# (the editable install would otherwise make nas4dyn importable from anywhere).
BLOCK_PROJECT = """
import sys
class _NoProject:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("nas4dyn", "supernet", "search_spaces"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, _NoProject())
try:
    import nas4dyn
    raise SystemExit("nas4dyn is importable")
except ImportError:
    pass
"""


@pytest.fixture(scope="module")
def routed():
    """A decisive supernet of the tiny space with CIGT routing (3 paths in the last stage), and a routed arch
    with exits, channel and skip gates."""
    space = all_space()
    torch.manual_seed(0)
    net = make_decisive(nas4dyn.build_supernet(space))
    arch = space.validate(dataclasses.replace(
        space.max_arch(), gates=(("channel", "skip"), ("none", "skip"), ("none", "none")), paths=(1, 1, 3),
        exits=(ExitChoice(0, 0, 0.35), ExitChoice(1, 1, 0.4))))
    images = torch.rand(48, 1, RES, RES, generator=torch.Generator().manual_seed(1))
    # Standardise each router's path logits over these images (what its BatchNorm learns in training), so
    # routes follow the input rather than the untrained biases.
    seen: dict[torch.nn.Module, torch.Tensor] = {}
    hooks = [r.balance.register_forward_hook(lambda m, i, o: seen.__setitem__(m, i[0])) for r in net.routers.values()]
    net.set_active(dataclasses.replace(arch, exits=()))
    with torch.no_grad():
        net.forward_all((images - 0.5) / 0.25)
        for bn, logits in seen.items():
            bn.running_mean[: logits.shape[1]] = logits.mean(0)
            bn.running_var[: logits.shape[1]] = logits.var(0) + 1e-6
    for h in hooks:
        h.remove()
    # Thresholds at each exit's median confidence, so samples leave at every exit whatever the random weights.
    net.set_active(arch)
    with torch.no_grad():
        exit_logits = net.forward_all((images - 0.5) / 0.25)[: len(arch.exits)]
    medians = [confidence(logits, space.exits.criterion).median().item() for logits in exit_logits]
    arch = space.validate(dataclasses.replace(
        arch, exits=tuple(ExitChoice(e.stage, e.block, round(m, 4)) for e, m in zip(arch.exits, medians))))
    return net, arch, images


@pytest.fixture(scope="module")
def exported(routed, tmp_path_factory):
    """The routed arch's ONNX export (model.onnx, onnx.json) and the eager exported model's outputs (equal to
    model.ts's: test_export)."""
    net, arch, images = routed
    folder = tmp_path_factory.mktemp("routed_export")
    model = nas4dyn.export_subnet(net, arch, {"mean": [0.5], "std": [0.25]})
    check_onnx_exportable(net.space, arch)
    export_onnx(model, folder, RES)
    with torch.no_grad():
        logits, exit_index = model.forward_with_exits(images)
        routes = model.gate_decisions(images)[:, -3:].float().argmax(1)  # the last routed block's paths
    return folder, logits, exit_index, routes


def test_routed_arch_exports_to_onnx_and_agrees_with_the_model(routed, exported):
    images = routed[2]
    folder, ref_logits, ref_exit, routes = exported
    onnx_model = OnnxDynamicModel(folder)
    logits, exit_index = onnx_model.forward_with_exits(images.numpy())
    assert np.array_equal(exit_index, ref_exit.numpy()) and np.abs(logits - ref_logits.numpy()).max() <= 1e-4
    # meaningful only if samples took different exits and different paths
    assert len(set(ref_exit.tolist())) >= 2 and len(set(routes.tolist())) >= 2
    for i in range(6):  # batch 1: the graph's branches for a single sample
        one_logits, one_exit = onnx_model.forward_with_exits(images[i : i + 1].numpy())
        assert one_exit[0] == ref_exit[i] and np.abs(one_logits[0] - ref_logits[i].numpy()).max() <= 1e-4


@pytest.fixture(scope="module")
def width_emg():
    """A decisive supernet of :func:`all_space` whose width gates (a basic and an MBConv stage) and EMG gates
    split the images, an arch with both and two exits, the images, and its exported model."""
    space = all_space()
    torch.manual_seed(0)
    net = make_decisive(nas4dyn.build_supernet(space))
    arch = space.validate(dataclasses.replace(
        space.max_arch(), gates=(("width", "emg"), ("width", "width"), ("none", "none")),
        exits=(ExitChoice(0, 0, 0.5), ExitChoice(1, 1, 0.5))))
    images = torch.rand(48, 1, RES, RES, generator=torch.Generator().manual_seed(1))
    x = (images - 0.5) / 0.25
    width_logits: dict[torch.nn.Module, torch.Tensor] = {}
    small_means: dict[torch.nn.Module, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda m, i, o: width_logits.__setitem__(m, o))
             for m in net.modules() if isinstance(m, WidthGate)]
    hooks += [m.register_forward_pre_hook(lambda m, i: small_means.__setitem__(m, m.small_response(*i).mean((2, 3))))
              for m in net.modules() if isinstance(m, EMGGate)]
    net.set_active(dataclasses.replace(arch, exits=()))
    with torch.no_grad():
        net.forward_all(x)
        for gate, logits in width_logits.items():  # sharper, and each width's mean logit equal: widths vary
            gate.fc2.weight.mul_(10.0)
            gate.fc2.bias.copy_(-(10.0 * (logits - gate.fc2.bias)).mean(0))
        for gate, means in small_means.items():  # each filter's large kernel for about half of the images
            gate.threshold[: means.shape[1]] = between(means)
    for h in hooks:
        h.remove()
    arch = calibrated(net, arch, x)
    return net, arch, images, nas4dyn.export_subnet(net, arch, {"mean": [0.5], "std": [0.25]})


def test_width_and_emg_gates_export_to_onnx_and_agree_with_model_ts(width_emg, tmp_path):
    """model.onnx of an arch with width gates (basic and MBConv blocks) and EMG gates gives model.ts's logits
    and exits at batch 48 (samples taking different widths, filters and exits) and at batch 1."""
    net, arch, images, model = width_emg
    check_onnx_exportable(net.space, arch)
    export_onnx(model, tmp_path, RES)
    scripted = save_torchscript(model, tmp_path / "model.ts")
    with torch.no_grad():
        ref_logits, ref_exit = scripted.forward_with_exits(images)
        decisions = model.gate_decisions(images)
        net.set_active(arch)
        sup_logits, sup_exit = net.forward_with_exits((images - 0.5) / 0.25)
    assert torch.equal(sup_exit, ref_exit) and (sup_logits - ref_logits).abs().max() <= 1e-4
    onnx_model = OnnxDynamicModel(tmp_path)
    logits, exit_index = onnx_model.forward_with_exits(images.numpy())
    assert np.array_equal(exit_index, ref_exit.numpy()) and np.abs(logits - ref_logits.numpy()).max() <= 1e-4
    # meaningful only if samples took different exits, and each width gate and EMG block decided differently
    assert len(set(ref_exit.tolist())) >= 2
    start = 0
    for kind, size in zip(model.gate_kinds, model.gate_sizes):
        block = decisions[:, start : start + size]
        start += size
        if kind == "width":  # the filter mask of the chosen width: its count of filters on
            assert len(set(block.sum(1).tolist())) >= 2
        else:
            rate = block.float().mean(0)
            assert ((rate > 0) & (rate < 1)).any()
    for i in range(8):  # batch 1: the graph's branches for a single sample
        one_logits, one_exit = onnx_model.forward_with_exits(images[i : i + 1].numpy())
        assert one_exit[0] == ref_exit[i] and np.abs(one_logits[0] - ref_logits[i].numpy()).max() <= 1e-4


def test_dfs_gates_are_refused_in_one_line():
    space = all_space()
    arch = dataclasses.replace(space.max_arch(), gates=(("none", "dfs"), ("none", "none"), ("none", "none")))
    with pytest.raises(ConfigError, match=r"block 0\.1: gate kind 'dfs' has no ONNX translation.*--format torchscript"):
        check_onnx_exportable(space, arch)


def test_mbconv_channel_gates_are_refused_in_one_line(tmp_path):
    space = nas4dyn.load_space("tiny")
    arch = dataclasses.replace(space.max_arch(), gates=(("none", "none"), ("channel", "none"), ("none", "none")))
    net = nas4dyn.build_supernet(space).eval()
    with pytest.raises(ConfigError, match=r"block 1\.0: MBConv channel gates cannot skip in ONNX.*--format torchscript"):
        check_onnx_exportable(space, arch)
    with pytest.raises(ConfigError, match="MBConv channel gates cannot skip in ONNX"):
        export_onnx(nas4dyn.export_subnet(net, arch, {"mean": [0.5], "std": [0.25]}), tmp_path, RES)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_default_formats_leave_onnx_out_for_an_arch_without_an_onnx_form(caplog):
    space = nas4dyn.load_space("tiny")
    arch = dataclasses.replace(space.max_arch(), gates=(("none", "none"), ("channel", "none"), ("none", "none")))
    assert _default_formats(space, space.max_arch()) == DEFAULT_FORMATS and "onnx" in DEFAULT_FORMATS
    with caplog.at_level("WARNING"):
        assert _default_formats(space, arch) == ("torchscript",)
    assert "no model.onnx" in caplog.text and "MBConv channel gates" in caplog.text


@pytest.mark.parametrize("name", ["../model.onnx", "/etc/passwd", "sub/model.onnx", "", None, "link.onnx"])
def test_manifest_model_path_stays_in_the_export_folder(exported, tmp_path, name):
    folder = tmp_path / "export"
    shutil.copytree(exported[0], folder)
    shutil.copy(folder / "model.onnx", tmp_path / "model.onnx")
    (folder / "sub").mkdir()
    shutil.copy(folder / "model.onnx", folder / "sub" / "model.onnx")
    (folder / "link.onnx").symlink_to(tmp_path / "model.onnx")  # a link leaving the folder
    manifest = json.loads((folder / "onnx.json").read_text())
    manifest["model"] = name
    (folder / "onnx.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="model path"):
        OnnxDynamicModel(folder)


def readme_examples() -> list[str]:
    """The python blocks of the README section "Deploying the exported model"."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Deploying the exported model", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_deployment_examples_run_without_nas4dyn(tiny_net, tmp_path):
    """Both README examples, as written, in `python -I` from a copy of an export folder outside the repository
    with every project import blocked: predictions and exits equal model.ts's in this process."""
    images = torch.rand(40, 1, RES, RES, generator=torch.Generator().manual_seed(2))
    arch = Arch("tiny", RES, (1, 2, 1), ((3,), (3, 3), (3,)), ((8,), (3, 3), (16,)),
                (("channel",), ("skip", "skip"), ("channel",)), (ExitChoice(0, 0, 0.5), ExitChoice(1, 1, 0.5)))
    arch = calibrated(tiny_net, arch, (images - 0.5) / 0.25)
    model = nas4dyn.export_subnet(tiny_net, arch, {"mean": [0.5], "std": [0.25]})
    folder = tmp_path / "deploy" / "exports" / "fm"
    scripted = save_torchscript(model, folder / "model.ts")
    export_onnx(model, folder, RES)
    work = tmp_path / "deploy"
    np.save(work / "images.npy", images.numpy())
    with torch.no_grad():
        ref_logits, ref_exit = scripted.forward_with_exits(images)
    examples = readme_examples()
    assert len(examples) == 2 and "import torch" in examples[0] and "onnxruntime" in examples[1]
    assert "nas4dyn" not in "".join(examples) and all(len(e.strip().splitlines()) <= 10 for e in examples)
    for i, code in enumerate(examples):
        save = f"\nnp.save('pred{i}.npy', np.asarray(predictions)); np.save('exit{i}.npy', np.asarray(exit_index))\n"
        run = subprocess.run([sys.executable, "-I", "-c", BLOCK_PROJECT + code + save], cwd=work,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        assert np.array_equal(np.load(work / f"pred{i}.npy"), ref_logits.argmax(1).numpy())
        assert np.array_equal(np.load(work / f"exit{i}.npy"), ref_exit.numpy())
    assert len(set(ref_exit.tolist())) >= 2
