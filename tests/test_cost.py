"""The cost model: MACs against torch's FlopCounterMode and hand computations, the latency table, the CLI."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import nas4dyn
from nas4dyn.cli.main import main
from nas4dyn.cost.latency import LatencyModel, LatencyTable, fit_correction
from nas4dyn.cost.macs import mac_parts
from nas4dyn.cost.paths import (
    SamplePaths,
    arch_layout,
    force_path,
    forced_block,
    gated_slots,
    path_contributions,
    random_path,
)
from search_spaces import Arch
from supernet.scripting import freeze_scripted
from tests.conftest import all_space, make_decisive



@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Batch-1 work on tiny modules: a second intra-op thread only adds synchronisation, and on a loaded
    machine its spin-waits make every traced conv many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def flop_counter_macs(fn, *args) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn(*args)
    return counter.get_total_flops() / 2


def batch(space, arch, n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, space.input_channels, arch.resolution, arch.resolution,
                       generator=torch.Generator().manual_seed(seed))


def space_and_net(nets, name):
    if name == "tiny":
        return nets["tiny"].space, nets["tiny"]
    space = all_space()
    torch.manual_seed(0)
    return space, make_decisive(nas4dyn.build_supernet(space))


@pytest.fixture(scope="module")
def nets():
    out = {}
    for name in ("tiny", "fmnist"):
        torch.manual_seed(0)
        out[name] = make_decisive(nas4dyn.build_supernet(name))
    return out


# ---- MACs ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny", "fmnist"])
def test_static_macs_equal_flop_counter(nets, name):
    net, space = nets[name], nets[name].space
    rng = random.Random(7)
    archs = [space.max_arch(), space.min_arch()] + [space.sample(rng, dynamic=False) for _ in range(12)]
    for arch in archs:
        rep = nas4dyn.count_macs(net, arch)
        sub = net.extract(arch).eval()
        reference = flop_counter_macs(sub, batch(space, arch, 1))
        assert rep.macs_max == pytest.approx(reference, rel=0.01)
        assert rep.macs_min == rep.macs_max == rep.macs_expected  # nothing dynamic to vary
        assert sum(rep.parts.values()) == rep.macs_max


@pytest.mark.parametrize("space_name", ["tiny", "tiny_all"])
@torch.no_grad()
def test_every_path_equals_flop_counter_of_the_forced_subnet(nets, space_name):
    """The realized MACs of any path (exit + gate states) equal what the extracted subnet computes on it."""
    space, net = space_and_net(nets, space_name)
    rng = random.Random(4)
    kinds, routed = set(), False
    for _ in range(15):
        arch = space.sample(rng)
        layout = arch_layout(space, arch)
        kinds |= {s.gate for s in layout}
        routed |= max(arch.paths) > 1
        sub = net.extract(arch).eval()
        parts = mac_parts(sub, arch, layout, space.input_channels)
        exit_index, masks = random_path(layout, len(arch.exits), rng)
        for slot, mask in zip(gated_slots(layout), masks):
            if slot.gate == "dfs" and mask.sum() == 1:  # FlopCounterMode does not see quantized convs
                mask[:] = True
        forced = force_path(sub, exit_index, masks)
        x = batch(space, arch, 1)
        reference = flop_counter_macs(forced, x)
        assert forced.forward_with_exits(x)[1].item() == exit_index
        paths = SamplePaths.single(layout, len(arch.exits), exit_index, [float(m.sum()) for m in masks])
        realized = path_contributions(parts, paths)
        # FlopCounterMode has no softmax counts: compare without the exits' confidence ops.
        assert sum(v[0] for k, v in realized.items() if not k.startswith("confidence")) == pytest.approx(reference)
    assert {"channel", "skip"} <= kinds
    assert space_name == "tiny" or ({"emg", "dfs", "width"} <= kinds and routed)


@torch.no_grad()
def test_forced_path_survives_scripting_and_freezing(nets):
    """The profiler times forced subnets frozen, as exported: freezing must not change the path or logits."""
    space, net = space_and_net(nets, "tiny_all")
    rng = random.Random(11)
    for _ in range(3):
        arch = space.sample(rng, dynamic=True)
        exit_index, masks = random_path(arch_layout(space, arch), len(arch.exits), rng)
        forced = force_path(net.extract(arch).eval(), exit_index, masks)
        frozen = freeze_scripted(forced, ["forward_with_exits"])
        x = batch(space, arch, 2)
        (eager_logits, eager_exit), (logits, exits) = forced.forward_with_exits(x), frozen.forward_with_exits(x)
        assert exits.tolist() == eager_exit.tolist() == [exit_index] * 2
        assert torch.allclose(logits, eager_logits, atol=1e-4)


def test_dfs_int8_state_counts_the_fp32_multiply_adds(nets):
    space, net = space_and_net(nets, "tiny_all")
    arch = Arch("tiny_all", 16, (2, 1, 1), ((5, 5), (3,), (3,)), ((8, 8), (2,), (8,)),
                (("none", "dfs"), ("none",), ("none",)))
    block = {p.name: p for p in mac_parts(net.extract(arch), arch, arch_layout(space, arch), 1)}["block.0.1"]
    skip, int8, fp32 = (float(block.cost(state)) for state in (0, 1, 2))
    assert skip < int8 == fp32


@pytest.mark.parametrize("space_name", ["tiny", "tiny_all"])
def test_expected_macs_equal_per_sample_execution(nets, space_name):
    """macs_expected = mean over samples of what the extracted subnet computes on each one alone."""
    space, net = space_and_net(nets, space_name)
    rng = random.Random(5)
    data = [(batch(space, space.max_arch(), 6, seed=i), None) for i in range(2)]
    checked = 0
    while checked < 2:
        arch = space.sample(rng)
        if not (arch.exits and any(g != "none" for s in arch.gates for g in s)):
            continue
        if space_name == "tiny_all" and ("emg" not in arch.gates[0] or "dfs" in arch.gates[0] + arch.gates[2]):
            continue  # FlopCounterMode does not see DFS's quantized convs
        rep = nas4dyn.count_macs(net, arch, data)
        sub = net.extract(arch).eval()
        per_sample = []
        for x, _ in data:
            for i in range(len(x)):
                one = x[i : i + 1]
                exit_index = sub.forward_with_exits(one)[1].item()
                confidence = sum(rep.parts[f"confidence.{e.stage}.{e.block}"] for e in arch.exits[: exit_index + 1])
                per_sample.append(flop_counter_macs(sub, one) + confidence)
        assert rep.samples == 12
        assert rep.macs_expected == pytest.approx(np.mean(per_sample))
        assert rep.macs_min <= rep.macs_expected <= rep.macs_max
        assert sum(rep.parts_expected.values()) == pytest.approx(rep.macs_expected)
        checked += 1


def test_expected_macs_with_forced_exit_probabilities(tiny_space):
    """Hand computation on a plain (not perturbed) tiny net: its exits are unconfident (max softmax < 0.5)."""
    torch.manual_seed(0)
    net = nas4dyn.build_supernet(tiny_space).eval()
    arch = Arch("tiny", 16, (2, 2, 1), ((3, 5), (3, 3), (3,)), ((8, 4), (2, 3), (16,)),
                (("none", "none"), ("none", "none"), ("none",)), ((0, 0, 0.5), (1, 1, 0.5)))
    data = [(batch(tiny_space, arch, 10, seed=i), None) for i in range(3)]
    rep = nas4dyn.count_macs(net, arch)
    p = rep.parts
    seg0 = p["stem"] + p["block.0.0"] + p["exit.0.0"] + p["confidence.0.0"]
    seg1 = p["block.0.1"] + p["block.1.0"] + p["block.1.1"] + p["exit.1.1"] + p["confidence.1.1"]
    seg2 = p["block.2.0"] + p["classifier"]
    assert rep.macs_max == seg0 + seg1 + seg2 == rep.macs_expected  # no data: the full path
    assert rep.macs_min == seg0

    everyone_leaves = nas4dyn.count_macs(net, arch.with_thresholds([0.05, 0.05]), data)  # max softmax >= 0.1
    assert everyone_leaves.exit_rates == [1.0, 0.0, 0.0]
    assert everyone_leaves.macs_expected == pytest.approx(seg0)

    nobody_leaves = nas4dyn.count_macs(net, arch.with_thresholds([1.0, 1.0]), data)
    assert nobody_leaves.exit_rates == [0.0, 0.0, 1.0]
    assert nobody_leaves.macs_expected == pytest.approx(seg0 + seg1 + seg2)

    # Mixed: thresholds between the samples' confidences; the hand computation uses the exit of each sample.
    net.set_active(arch)
    with torch.no_grad():
        logits = net.forward_all(torch.cat([x for x, _ in data]))
    conf0 = torch.softmax(logits[0], 1).max(1).values
    conf1 = torch.softmax(logits[1], 1).max(1).values
    t0, t1 = float(conf0.median()), float(conf1.quantile(0.3))
    exit_index = torch.where(conf0 >= t0, 0, torch.where(conf1 >= t1, 1, 2))
    hand = np.mean([{0: seg0, 1: seg0 + seg1, 2: seg0 + seg1 + seg2}[int(e)] for e in exit_index])
    mixed = nas4dyn.count_macs(net, arch.with_thresholds([t0, t1]), data)
    assert 0 < mixed.exit_rates[0] < 1 and mixed.exit_rates[1] > 0
    assert mixed.exit_rates == pytest.approx(np.bincount(exit_index.numpy(), minlength=3) / len(exit_index))
    assert mixed.macs_expected == pytest.approx(hand)


@pytest.mark.parametrize("kind", ["channel", "emg"])
def test_gated_block_macs_scale_with_active_filters(kind):
    space = all_space()
    torch.manual_seed(0)
    net = nas4dyn.build_supernet(space).eval()
    arch = Arch("tiny_all", 16, (1, 1, 1), ((5,), (3,), (3,)), ((8,), (2,), (8,)),
                ((kind,), ("none",), ("none",)))
    parts = {p.name: p for p in mac_parts(net.extract(arch), arch, arch_layout(space, arch), 1)}
    block = parts["block.0.0"]
    standalone = net.block(0, 0).extract(5, 8, kind, 0, 8 if kind == "channel" else 0).eval()
    h = torch.randn(1, space.stem_channels, 16, 16)
    counted = []
    for on in range(0, 9):
        module, logits = forced_block(standalone, torch.arange(8) < on)
        counted.append(flop_counter_macs(module, h, logits))
        assert float(block.cost(on)) == pytest.approx(counted[-1])
    steps = np.diff(counted[1:])
    assert np.all(steps > 0) and np.allclose(steps, steps[0])  # linear in the active filters
    assert block.full == pytest.approx(counted[-1])


def test_cost_report_to_dict_is_json(nets):
    space = nets["tiny"].space
    arch = space.sample(random.Random(2))
    data = [(batch(space, arch, 4), None)]
    d = nas4dyn.count_macs(nets["tiny"], arch, data).to_dict()
    again = json.loads(json.dumps(d))
    assert again["macs_max"] >= again["macs_expected"] >= again["macs_min"] > 0
    assert len(again["exit_rates"]) == len(arch.exits) + 1


def test_empty_loader_is_a_config_error(nets):
    space = nets["tiny"].space
    with pytest.raises(nas4dyn.ConfigError, match="no samples"):
        nas4dyn.count_macs(nets["tiny"], space.sample(random.Random(1)), [])


# ---- latency ------------------------------------------------------------------------------------------------
def test_table_covers_every_configuration_and_predicts(tiny_table):
    space = tiny_table.space
    model = LatencyModel(tiny_table)
    rng = random.Random(4)
    kinds, routed = set(), False
    for _ in range(40):
        arch = space.sample(rng)
        kinds |= {g for st in arch.gates for g in st}
        routed |= max(arch.paths) > 1
        full = model.predict(arch)
        assert full > 0
        layout = arch_layout(space, arch)
        exit_index, masks = random_path(layout, len(arch.exits), rng)
        units = [float(m.sum()) for m in masks]
        assert model.predict_path(arch, exit_index, units) > 0
        if exit_index == len(arch.exits) and all(u == s.units for u, s in zip(units, gated_slots(layout))):
            assert model.predict_path(arch, exit_index, units) == pytest.approx(full)
    assert kinds == {"none", "channel", "skip", "emg", "dfs", "width"} and routed
    assert tiny_table.validation["static"]["n"] == 2
    assert set(tiny_table.calibration) == {"static", "dynamic"}


def test_table_json_round_trip(tiny_table, tmp_path):
    path = tmp_path / "lut.json"
    tiny_table.save(path)
    again = LatencyTable.load(path)
    assert again.to_dict() == tiny_table.to_dict()
    arch = tiny_table.space.sample(random.Random(0))
    assert LatencyModel(again).predict(arch) == LatencyModel(tiny_table).predict(arch)


def test_fingerprint_mismatch_warns(tiny_table, tmp_path):
    path = tmp_path / "lut.json"
    tiny_table.save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LatencyModel.load(path)  # same machine: silent
    data = json.loads(path.read_text())
    data["fingerprint"]["device_name"] = "Some Phone SoC"
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="another device"):
        LatencyModel.load(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LatencyModel.load(path, check_device=False)


def test_expected_latency_follows_the_exits(tiny_table):
    space = tiny_table.space
    torch.manual_seed(0)
    net = nas4dyn.build_supernet(space).eval()  # unperturbed: max softmax stays below 0.5
    arch = Arch("tiny_all", 16, (1, 1, 1), ((3,), (3,), (3,)), ((4,), (2,), (8,)),
                (("none",), ("none",), ("none",)), ((0, 0, 0.05),))
    data = [(batch(space, arch, 6), None)]
    model = LatencyModel(tiny_table)
    leaves = model.predict_expected(net, arch, data)
    assert leaves == pytest.approx(model.predict_path(arch, 0, []))
    stays = model.predict_expected(net, arch.with_thresholds([1.0]), data)
    assert stays == pytest.approx(model.predict(arch))
    # The correction fitted on this quick table is noisy; the measured parts themselves add up.
    assert model.path_sum(arch, 0, []) < model.path_sum(arch)


def test_table_of_another_space_is_refused(tiny_table, tiny_space):
    fm = nas4dyn.load_space("fmnist")
    with pytest.raises(nas4dyn.InvalidArchError):
        LatencyModel(tiny_table).predict(fm.max_arch())
    with pytest.raises(nas4dyn.ConfigError, match="another version"):
        LatencyModel(tiny_table).check_space(tiny_space)


# ---- CLI ----------------------------------------------------------------------------------------------------
def test_profile_cli_end_to_end(tmp_path):
    out = tmp_path / "lut.json"
    proc = subprocess.run(
        [sys.executable, "-m", "nas4dyn", "profile", "--space", "tiny", "--out", str(out), "--repeats", "2",
         "--calibrate", "3", "--validate", "2", "--statistic", "min", "--clock", "cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "within ±10%" in proc.stdout and "validation" in proc.stdout
    table = LatencyTable.load(out)
    assert table.fingerprint["threads"] == 1 and table.fingerprint["batch_size"] == 1
    assert table.settings["statistic"] == "min" and table.validation["dynamic"]["n"] >= 1


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--space", "tiny", "--threads", "0"], "--threads"),
        (["--space", "tiny", "--batch-size", "-1"], "--batch-size"),
        (["--space", "no-such-space"], "no-such-space"),
        (["--space", "tiny", "--out", "."], "directory"),
        (["--space", "tiny", "--clock", "cpu", "--threads", "2"], "--clock cpu"),
    ],
)
def test_profile_bad_input_is_one_line_exit_2(args, needle, tmp_path, capsys):
    argv = ["profile", "--out", str(tmp_path / "lut.json"), *args]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0]


def test_loading_a_bad_table_is_a_config_error(tmp_path):
    path = tmp_path / "lut.json"
    path.write_text('{"format": "something-else"}')
    with pytest.raises(nas4dyn.ConfigError, match="not a nas4dyn latency table"):
        LatencyModel.load(path)
    with pytest.raises(nas4dyn.ConfigError, match="cannot read"):
        LatencyModel.load(tmp_path / "missing.json")


def test_fit_correction_recovers_an_exact_line():
    sums = np.array([1.0, 2.0, 4.0, 8.0])
    a, b, scale = fit_correction(sums, 1.5 * sums + 0.25)
    assert (a, b, scale) == (pytest.approx(1.5), pytest.approx(0.25), 1.0)


def test_fit_correction_scales_exit_tests_on_their_own(tiny_table):
    other = np.array([1.0, 2.0, 4.0, 8.0, 3.0, 5.0])
    exits = np.array([0.0, 0.1, 0.3, 0.0, 0.5, 0.2])  # exit tests within the sums
    measured = 1.2 * (other + 2.5 * exits) + 0.1
    a, b, scale = fit_correction(other + exits, measured, exits)
    assert (a, b, scale) == (pytest.approx(1.2), pytest.approx(0.1, abs=1e-9), pytest.approx(2.5))
    # A table predicts with its exit scale: only the exit tests on the path grow.
    data = tiny_table.to_dict()
    data["correction"] = {"a": 1.0, "b": 0.0, "exit_scale": 1.0}
    for entry in data["entries"]:  # an exit's entry is a timed difference, clamped at 0 when noise inverts it
        if entry["part"] == "exit":
            entry["ms"] = 0.05
    plain = LatencyModel(LatencyTable.from_dict(data))
    data["correction"]["exit_scale"] = 2.5
    scaled = LatencyModel(LatencyTable.from_dict(data))
    arch = Arch("tiny_all", 16, (1, 1, 1), ((3,), (3,), (3,)), ((4,), (2,), (8,)),
                (("none",), ("none",), ("none",)), ((0, 0, 0.05),))
    probe = plain.path_sum(arch, 0, [], only="exit.")
    assert probe > 0 and scaled.path_sum(arch, 0, [], only="exit.") == pytest.approx(2.5 * probe)
    assert scaled.predict_path(arch, 0, []) - plain.predict_path(arch, 0, []) == pytest.approx(1.5 * probe)
    assert scaled.predict(arch.without_dynamic()) == plain.predict(arch.without_dynamic())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0.05, 50.0), st.floats(0.05, 50.0)), min_size=2, max_size=8))
def test_fit_correction_never_predicts_a_negative_latency(points):
    sums, measured = zip(*points)
    a, b, _ = fit_correction(sums, measured)
    assert a >= 0 and b >= 0  # so a * sum + b >= 0 for every path, however short
