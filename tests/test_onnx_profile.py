"""ONNX Runtime latency tables: the pieces compute what the parts compute, the tiny space's table is sane, and a
table of a space whose every gate exports to ONNX (width and EMG gates too) covers it and drives a search."""
from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

import nas4dyn
from nas4dyn.api import save_supernet
from nas4dyn.cli.main import main
from nas4dyn.cost.latency import LatencyModel, LatencyTable
from nas4dyn.cost.onnx_parts import OnnxPieces
from nas4dyn.cost.profiler import profile_space, subnet_samples, table_items
from nas4dyn.cost.settings import ProfileSettings
from nas4dyn.cost.timing import OnnxPiece
from nas4dyn.data import load_data
from supernet.network import Supernet
from tests.conftest import make_decisive, onnx_space

SETTINGS = ProfileSettings(repeats=3, calibrate=3, validate=3, runtime="onnxruntime")


class RecordingPieces(OnnxPieces):
    """OnnxPieces that keep every torch module and its inputs beside the piece made of it."""

    def __init__(self, threads: int) -> None:
        super().__init__(threads)
        self.parts: list[tuple[str, bool, torch.nn.Module, tuple, object]] = []
        self.subnets: list[tuple[torch.nn.Module, torch.Tensor, object]] = []

    def part(self, kind, module, inputs, nested=False):
        item = super().part(kind, module, inputs, nested)
        self.parts.append((kind, nested, module, inputs, item))
        return item

    def subnet(self, sub, arch, x):
        item = super().subnet(sub, arch, x)
        self.subnets.append((sub, x, item))
        return item


@pytest.mark.parametrize("space", [nas4dyn.load_space("tiny"), onnx_space()], ids=["tiny", "width_emg_cigt"])
@torch.inference_mode()
def test_each_onnx_piece_computes_what_its_torch_part_computes(space):
    torch.manual_seed(0)
    net = Supernet(space).eval()
    x = torch.rand(1, space.input_channels, max(space.resolutions), max(space.resolutions))
    pieces = RecordingPieces(threads=1)
    table_items(net, x, ProfileSettings(), pieces)
    subnet_samples(net, x, 2, random.Random(0), pieces)
    reference = {  # what the torch part returns that the piece's first output holds
        "stem": lambda m, i: m(*i), "gater": lambda m, i: m(*i), "block": lambda m, i: m(*i),
        "exit": lambda m, i: m.head(*i), "classifier": lambda m, i: m(*i),
    }
    seen = set()
    for kind, nested, module, inputs, item in pieces.parts:
        if kind == "call":
            continue
        got = item()[0]
        want = reference[kind](module, inputs).numpy()
        assert got.shape == want.shape and np.allclose(got, want, atol=1e-4), (kind, nested, np.abs(got - want).max())
        seen.add((kind, nested))
    assert seen == {("stem", False), ("gater", False), ("block", False), ("exit", False), ("classifier", False),
                    ("block", True), ("exit", True), ("classifier", True)}
    assert len(pieces.subnets) >= 3  # static and forced dynamic paths
    for sub, xs, item in pieces.subnets:
        want = sub.forward_with_exits(xs)[0].numpy()
        assert np.allclose(item()[0], want, atol=1e-4)


@pytest.fixture(scope="module")
def ort_table():
    torch.set_num_threads(1)
    return profile_space(nas4dyn.load_space("tiny"), SETTINGS, progress=False)


def test_onnxruntime_table_of_the_tiny_space_is_sane(ort_table, tmp_path):
    import onnxruntime

    fp = ort_table.fingerprint
    assert fp["runtime"] == "onnxruntime" and fp["onnxruntime"] == onnxruntime.__version__ and "torch" not in fp
    kinds = {key[0] for key in ort_table.levels}
    assert kinds == {"stem", "gater", "block", "exit", "classifier", "block_nested", "exit_nested",
                     "classifier_nested"}
    gates = {(key[2], key[6]) for key in ort_table.levels if key[0] == "block"}
    assert (0, "channel") in gates and (1, "skip") in gates
    assert (1, "channel") not in gates  # MBConv channel gates do not export to ONNX: no entries
    assert ort_table.settings["call_ms"] > 0 and ort_table.missing_gates() == ["stage 1: gate 'channel'"]
    for kind in ("static", "dynamic"):
        assert ort_table.validation[kind]["n"] > 0
    for record in ort_table.validation["records"]:
        assert math.isfinite(record["predicted_ms"]) and record["predicted_ms"] > 0 and record["measured_ms"] > 0
    ort_table.save(tmp_path / "lut.json")
    loaded = LatencyModel(LatencyTable.load(tmp_path / "lut.json"))
    arch = ort_table.space.max_arch()
    assert loaded.predict(arch) == pytest.approx(LatencyModel(ort_table).predict(arch)) and loaded.predict(arch) > 0


def test_parts_after_an_exit_use_the_nested_entries(ort_table):
    model = LatencyModel(ort_table)
    arch = next(a for a in (ort_table.space.sample(random.Random(i)) for i in range(200))
                if a.exits and all(g != "channel" for g in a.gates[1]))
    parts = {p.name: p for p in ort_table.parts(arch)}
    r = arch.resolution
    assert parts["classifier"].levels == ort_table.levels[("classifier_nested", r)]
    first_exit = ort_table.levels[("exit", r, arch.exits[0].stage)]  # scaled by the fitted exit-test factor
    assert parts[f"exit.{arch.exits[0].stage}.{arch.exits[0].block}"].levels == tuple(
        (level, ort_table.exit_scale * ms) for level, ms in first_exit)
    assert model.predict(arch) > 0


def test_onnxruntime_tables_need_the_cpu(monkeypatch):
    with pytest.raises(nas4dyn.ConfigError, match="--device cpu"):
        ProfileSettings(runtime="onnxruntime", device="cuda").check()
    with pytest.raises(nas4dyn.ConfigError, match="--runtime 'tensorrt'"):
        ProfileSettings(runtime="tensorrt").check()


def test_an_onnx_piece_takes_turns_over_its_sessions():
    """A dynamic graph runs at one of two speeds per onnxruntime session: a piece's calls spread over
    OnnxPiece.SESSIONS sessions of its model, one call each in turn."""
    x = torch.rand(1, 1, 4, 4)
    item = OnnxPieces(threads=1).call_item(x)  # an Identity piece
    piece = item.module
    assert np.array_equal(item()[0], x.numpy())  # the first call makes the sessions
    runs = [0] * OnnxPiece.SESSIONS

    class Counting:
        def __init__(self, session, i):
            self.session, self.i = session, i

        def run(self, *args):
            runs[self.i] += 1
            return self.session.run(*args)

    assert len({id(s) for s in piece._sessions}) == OnnxPiece.SESSIONS > 1
    piece._sessions = [Counting(s, i) for i, s in enumerate(piece._sessions)]
    assert all(np.array_equal(item()[0], x.numpy()) for _ in range(2 * OnnxPiece.SESSIONS))
    assert runs == [2] * OnnxPiece.SESSIONS


def test_an_onnxruntime_table_of_a_space_with_width_and_emg_gates_covers_it_and_drives_a_search(tmp_path, capsys):
    space = onnx_space()
    torch.set_num_threads(1)
    table = profile_space(space, SETTINGS, progress=False)
    assert table.missing_gates() == []
    net = Supernet(space)
    blocks = {key: levels for key, levels in table.levels.items() if key[0] == "block"}
    for (_, _, s, first, k, w, gate, _), levels in blocks.items():
        if gate == "width":  # timed at each width the gate picks from
            width = net.block(s, 0 if first else 1).extract(k, w, "width", 0, 0)
            assert [level for level, _ in levels] == [float(h) for h in width.hiddens]
    gates = {(key[2], key[6]) for key in blocks}
    assert {(0, "width"), (1, "width"), (0, "emg")} <= gates
    table.save(tmp_path / "lut.json")
    run = tmp_path / "run"
    torch.manual_seed(0)
    save_supernet(run / "supernet.pt", make_decisive(nas4dyn.build_supernet(space)), load_data("synthetic").info.to_dict())
    out = tmp_path / "search"
    assert main(["search", "--run", str(run), "--out", str(out), "--trials", "3", "--latency-table",
                 str(tmp_path / "lut.json"), "--objectives", "accuracy:max,latency_ms:min", "--bn-images", "64",
                 "--threads", "1", "--no-progress"]) == 0, capsys.readouterr().err
    assert json.loads((out / "pareto.json").read_text())  # trials of the space completed, latency predicted


@pytest.mark.parametrize("name", ["fmnist", "cifar"])
def test_onnxruntime_pieces_carry_every_gate_of_the_default_spaces(name):
    """So an onnxruntime table of fmnist or cifar has entries for every gate kind they allow, and search takes it."""
    space = nas4dyn.load_space(name)
    pieces = OnnxPieces(threads=1)
    assert all(pieces.supports(g, st.block) for s, st in enumerate(space.stages) for b in range(st.max_depth)
               for g in space.allowed_gates(s, b))
