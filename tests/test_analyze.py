"""`nas4dyn analyze gates`: planted gating semantics are recovered, random gates are not, and the CLI contract."""
from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import nas4dyn
from nas4dyn.analyze import GateGroup, analyze_gates, builtin_hierarchy, load_hierarchy, mantel, write_report
from nas4dyn.analyze.patterns import ExportedProbe, binarise, class_rates
from nas4dyn.analyze.report import FIGURES
from nas4dyn.analyze.semantics import FASHION_MNIST_HIERARCHY, Hierarchy, spearman_ceiling
from nas4dyn.api import load_supernet_file, save_supernet
from nas4dyn.cli.main import main
from nas4dyn.data import FASHION_MNIST_CLASSES, load_data
from nas4dyn.errors import ConfigError, DataError
from search_spaces import Arch
from search_spaces.arch import ExitChoice
from tests.conftest import make_decisive

CLASSES = list(FASHION_MNIST_CLASSES)
GATE_DISTANCES = ("gates_hamming", "gates_jaccard", "gates_cosine")
# Channel gates on a basic and an MBConv block, a skip gate, an early exit.
GATED_ARCH = Arch("tiny", 16, (1, 2, 1), ((3,), (3, 5), (3,)), ((8,), (3, 2), (16,)),
                  (("channel",), ("channel", "skip"), ("none",)), (ExitChoice(1, 1, 0.5),))
# Eight classes in a three-level tree, in the nested user format.
NESTED = {"groups": {"clothes": {"upper": ["a", "b"], "lower": ["c", "d"]},
                     "things": {"bags": ["e", "f"], "shoes": ["g", "h"]}}}


class PlantedGates:
    """Stand-in gated model whose input is the class id. Every hierarchy node (group or class) owns a block
    of gates that fire for the classes below it, so classes of a group share their group's gates; each
    decision is then flipped with probability ``flip`` (0.5 makes the gates pure noise)."""

    def __init__(self, hierarchy: Hierarchy, classes: list[str], block: int = 6, flip: float = 0.15, seed: int = 0):
        nodes = sorted({path[:i] for c in classes for path in [hierarchy.paths[c] + (c,)]
                        for i in range(1, len(path) + 1)})
        self.proto = torch.zeros(len(classes), len(nodes) * block, dtype=torch.bool)
        for ci, c in enumerate(classes):
            path = hierarchy.paths[c] + (c,)
            for i in range(1, len(path) + 1):
                n = nodes.index(path[:i])
                self.proto[ci, n * block : (n + 1) * block] = True
        self.flip = flip
        self.gen = torch.Generator().manual_seed(seed)
        self.centres = torch.randn(len(classes), 12, generator=self.gen)

    def gate_decisions(self, x: torch.Tensor) -> torch.Tensor:
        bits = self.proto[x[:, 0].long()]
        return bits ^ (torch.rand(bits.shape, generator=self.gen) < self.flip)

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        return self.centres[x[:, 0].long()] + 0.8 * torch.randn(len(x), 12, generator=self.gen)

    def gate_groups(self) -> list[GateGroup]:
        return [GateGroup("planted", "channel", 0, self.proto.shape[1])]


def batches(num_classes: int, per_class: int = 40, batch: int = 64, seed: int = 0):
    labels = torch.arange(num_classes).repeat(per_class)
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]
    return [(y.float().unsqueeze(1), y) for y in labels.split(batch)]


@pytest.fixture(scope="module")
def fmnist_hierarchy() -> Hierarchy:
    return builtin_hierarchy(CLASSES)


@pytest.fixture(scope="module")
def planted(fmnist_hierarchy):
    return analyze_gates(PlantedGates(fmnist_hierarchy, CLASSES), batches(10), CLASSES, fmnist_hierarchy, queries=200)


@pytest.fixture(scope="module")
def noise(fmnist_hierarchy):
    model = PlantedGates(fmnist_hierarchy, CLASSES, flip=0.5)
    return analyze_gates(model, batches(10), CLASSES, fmnist_hierarchy, queries=200)


def test_planted_fashion_mnist_hierarchy_is_recovered(planted):
    for name in ("gates_hamming", "gates_jaccard"):
        c = planted.correlations[name]
        assert c.rho >= 0.9 and c.p_value <= 0.01, (name, c)
    # rates are continuous: against the tied tree distances their rank correlation is capped near 0.79
    ceiling = spearman_ceiling(planted.hierarchy_distances)
    assert ceiling == pytest.approx(0.785, abs=0.001)
    assert planted.correlations["gates_cosine"].rho >= 0.95 * ceiling
    assert planted.correlations["gates_cosine"].p_value <= 0.01


def test_planted_nested_user_hierarchy_is_recovered(tmp_path):
    classes = list("abcdefgh")
    path = tmp_path / "h.json"
    path.write_text(json.dumps(NESTED))
    hierarchy = load_hierarchy(path, classes)
    assert hierarchy.distances(classes)[0].tolist() == [0, 2, 4, 4, 6, 6, 6, 6]
    a = analyze_gates(PlantedGates(hierarchy, classes), batches(8), classes, hierarchy, queries=100)
    ceiling = spearman_ceiling(hierarchy.distances(classes))
    for name in GATE_DISTANCES:
        # binary-pattern distances tie like the tree does; the continuous one can reach the ceiling at most
        target = 0.9 if name != "gates_cosine" else 0.95 * ceiling
        assert a.correlations[name].rho >= target and a.correlations[name].p_value <= 0.01, name


def test_random_gates_show_no_significant_correlation(noise):
    for name in GATE_DISTANCES:
        assert noise.correlations[name].p_value > 0.05, (name, noise.correlations[name])


def test_retrieval_planted_beats_random(planted, noise):
    def gates_map(a, k=10):
        return next(r for r in a.retrieval if r.descriptor == "gates").map_at_k[k]

    chance = next(r for r in noise.retrieval if r.descriptor == "random").map_at_k[10]
    assert gates_map(planted) > 0.7 > 0.1 > gates_map(noise)
    assert abs(gates_map(noise) - chance) < 0.03
    sizes = {r.descriptor: r.bytes_per_sample for r in planted.retrieval}
    assert sizes["gates"] == -(-planted.rates.shape[1] // 8) and sizes["cnn"] == 12 * 4


def test_gates_that_never_close_are_reported_not_correlated(fmnist_hierarchy, tmp_path):
    model = PlantedGates(fmnist_hierarchy, CLASSES, flip=0.0)
    model.proto[:] = True
    a = analyze_gates(model, batches(10, per_class=12), CLASSES, fmnist_hierarchy, queries=50)
    assert all(np.isnan(a.correlations[name].rho) for name in GATE_DISTANCES)
    assert np.isfinite(a.correlations["cnn_euclidean"].rho)  # the CNN baseline is still measured
    assert a.gate_summary()["always_on"] == a.rates.shape[1]
    text = write_report(a, tmp_path).read_text()
    assert "same binary gating pattern" in text and "n/a" in text
    assert json.loads((tmp_path / "report.json").read_text())["semantics"]["gates_hamming"]["spearman"] is None


def test_patterns_rates_and_summary(planted):
    assert planted.rates.shape == planted.patterns.shape == (10, planted.gate_on.shape[0])
    assert np.array_equal(planted.patterns, planted.rates >= 0.5)
    summary = planted.gate_summary()
    assert summary["total"] == planted.rates.shape[1] and summary["differ_between_classes"] > 0
    with pytest.raises(DataError, match="Bag"):
        class_rates(np.ones((3, 2), bool), np.array([0, 1, 2]), CLASSES)
    assert binarise(np.array([[0.49, 0.5]])).tolist() == [[False, True]]


def test_mantel_is_exact_for_few_classes_and_guards_permutations():
    ref = np.array([[0, 2, 4, 4], [2, 0, 4, 4], [4, 4, 0, 2], [4, 4, 2, 0]], float)
    c = mantel(ref, ref)
    assert c.rho == pytest.approx(1.0) and c.permutations == 24  # 4! relabellings, enumerated
    assert c.p_value == pytest.approx(8 / 24)  # relabellings that keep the two pairs together
    assert np.isnan(mantel(np.ones((4, 4)) - np.eye(4), ref).rho)
    with pytest.raises(ConfigError, match="999"):
        mantel(ref, ref, permutations=10)


@pytest.mark.parametrize("data, match", [
    ({"groups": {"tops": ["T-shirt/top", "Jacket"]}}, "'Jacket'"),
    ({"groups": {"a": CLASSES, "b": ["Bag"]}}, "placed twice"),
    ({"groups": {"a": CLASSES[:-1]}}, "Ankle boot"),
    ({"tops": CLASSES}, "groups"),
    ({"groups": {"a": "Bag"}}, "list of class names"),
])
def test_bad_hierarchies_name_the_problem(tmp_path, data, match):
    path = tmp_path / "h.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=match):
        load_hierarchy(path, CLASSES)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_hierarchy(path, CLASSES)


def test_builtin_hierarchy_groups():
    h = Hierarchy.from_dict(FASHION_MNIST_HIERARCHY, CLASSES, "built-in")
    d = h.distances(CLASSES)
    assert d[CLASSES.index("Shirt"), CLASSES.index("Coat")] == 2
    assert d[CLASSES.index("Sandal"), CLASSES.index("Bag")] == 4
    assert builtin_hierarchy(["x", "y"]) is None


def test_report_files(planted, tmp_path):
    write_report(planted, tmp_path)
    for name in FIGURES + ("report.md", "report.json"):
        assert (tmp_path / name).stat().st_size > 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["semantics"]["gates_hamming"]["spearman"] >= 0.9
    assert "Mantel" in (tmp_path / "report.md").read_text()


# ---- the exported model and the command line ----------------------------------------------------------------
@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A tiny model exported by the real pipeline (`nas4dyn export` minus ONNX, BN recalibration and timing)."""
    from nas4dyn.export.pipeline import ExportOptions, export_run

    torch.manual_seed(0)
    net = make_decisive(nas4dyn.build_supernet("tiny"))
    root = tmp_path_factory.mktemp("analyze")
    save_supernet(root / "run" / "supernet.pt", net, load_data("synthetic", augment=False).info.to_dict())
    (root / "arch.json").write_text(json.dumps(GATED_ARCH.to_dict()))
    export_run(root / "run", str(root / "arch.json"), root / "export",
               ExportOptions(formats=("torchscript",), bn_images=0, latency_samples=8, latency_repeats=1))
    return root / "export"


def test_exported_probe_features_feed_the_final_classifier(export_dir):
    from nas4dyn.export.torchscript import load_exported

    model = load_exported(export_dir)
    probe = ExportedProbe(model)
    x = torch.rand(5, 1, 16, 16)
    # model.ts is frozen (no submodules left): the final classifier's weights come from the same arch exported
    # eagerly out of the run's supernet.
    net, info = load_supernet_file(export_dir.parent / "run" / "supernet.pt")
    eager = nas4dyn.export_subnet(net, GATED_ARCH, info)
    with torch.no_grad():
        head = list(eager.subnet.segments.children())[-1].head
        assert torch.allclose(head.fc(probe.penultimate(x)), model.forward_all(x)[-1], atol=1e-5)
    groups = probe.gate_groups()
    assert groups[-1].end == probe.gate_decisions(x).shape[1]
    assert {g.kind for g in groups} == {"channel", "skip"}


def test_probe_covers_every_gate_kind():
    """EMG, DFS (three options), width, routed (CIGT) blocks: the layout covers every decision column, and the
    penultimate features still feed the final classifier (eager exports; TorchScript is tested above)."""
    from nas4dyn.export import export_subnet

    torch.manual_seed(0)
    net = make_decisive(nas4dyn.build_supernet("fmnist_dynamic_all"))
    x, kinds = torch.rand(3, 1, 28, 28), set()
    for seed in range(12):
        model = export_subnet(net, net.space.sample(random.Random(seed)), {"mean": [0.3], "std": [0.3]})
        probe = ExportedProbe(model)
        with torch.no_grad():
            head = list(model.subnet.segments.children())[-1].head
            assert torch.allclose(head.fc(probe.penultimate(x)), model.forward_all(x)[-1], atol=1e-4)
            groups = probe.gate_groups()
            assert (groups[-1].end if groups else 0) == probe.gate_decisions(x).shape[1]
        kinds |= {g.kind for g in groups}
    assert kinds == {"channel", "skip", "emg", "dfs", "width", "route"}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nas4dyn", *args], capture_output=True, text=True, timeout=300)


def test_cli_end_to_end(export_dir, tmp_path):
    hierarchy = tmp_path / "h.json"
    hierarchy.write_text(json.dumps({"groups": {"low": [f"class{i}" for i in range(5)],
                                                "high": [f"class{i}" for i in range(5, 10)]}}))
    out = run_cli("analyze", "gates", "--model", str(export_dir), "--data", "synthetic", "--hierarchy",
                  str(hierarchy), "--max-samples", "150", "--queries", "50", "--out", str(tmp_path / "rep"))
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert sum(report["samples_per_class"]) == 150 and set(report["semantics"]) >= set(GATE_DISTANCES)
    for name in FIGURES + ("report.md",):
        assert (tmp_path / "rep" / name).is_file()


@pytest.mark.parametrize("case", ["missing-model", "unknown-class", "bad-json"])
def test_cli_bad_input_is_one_line_exit_2(export_dir, tmp_path, case, capsys):
    hierarchy = tmp_path / "h.json"
    hierarchy.write_text("{oops" if case == "bad-json" else json.dumps({"groups": {"a": ["class0", "Sweater"]}}))
    model = tmp_path / "nowhere" if case == "missing-model" else export_dir
    code = main(["analyze", "gates", "--model", str(model), "--data", "synthetic", "--hierarchy", str(hierarchy),
                 "--out", str(tmp_path / "rep")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert {"missing-model": "nowhere", "unknown-class": "'Sweater'", "bad-json": "not valid JSON"}[case] in lines[0]
    assert not (tmp_path / "rep").exists()
