"""Channel gates in groups (the space's ``gater.group``): filters of a group share one gate, the extracted gater
has one output per group, and the exported models (TorchScript and ONNX) equal the supernet's dynamic eval."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml

import nas4dyn
from nas4dyn.cost.paths import forced_block
from nas4dyn.errors import SpaceError
from nas4dyn.export.onnx import OnnxDynamicModel, export_onnx
from nas4dyn.export.torchscript import save_torchscript
from search_spaces.space import BUILTIN_DIR, space_from_dict
from tests.conftest import make_decisive
from supernet.network import Supernet
from tests.test_cost import flop_counter_macs
from tests.test_export import ALL_MECHANISMS, RES, between, calibrated, onnx_able, reference

GROUP = 3  # does not divide the tiny space's 8-filter blocks: their last group is shorter


def grouped_space(group: int = GROUP):
    data = yaml.safe_load((BUILTIN_DIR / "tiny.yaml").read_text())
    data["gater"]["group"] = group
    return space_from_dict(data)


def grouped_net(net: Supernet, group: int) -> Supernet:
    """``net``'s weights under the tiny space with gates in groups of ``group``."""
    out = Supernet(grouped_space(group))
    out.load_state_dict(net.state_dict())
    return out.eval()


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(1)
    images = torch.rand(64, 1, RES, RES)
    return {"info": {"mean": [0.5], "std": [0.25]}, "images": images, "normalised": (images - 0.5) / 0.25}


@pytest.fixture(scope="module")
def net(data):
    """A tiny supernet with grouped gates, each group's gate on for about half of the images."""
    torch.manual_seed(0)
    net = make_decisive(nas4dyn.build_supernet(grouped_space()))
    net.set_active(dataclasses.replace(ALL_MECHANISMS, exits=()))
    rows, _, groups, _ = net._gate_rows(net.active)
    with torch.no_grad():
        net.gater.fc2.weight.mul_(10.0)
        logits = net.gater(data["normalised"], rows, groups)
        net.gater.fc2.bias[rows] -= between(logits)  # shifts each group's mean logit by its median
    return net.eval()


def test_grouped_gater_has_one_output_per_group(net):
    sub = net.extract(ALL_MECHANISMS)
    rows, columns, groups, group_columns = net._gate_rows(ALL_MECHANISMS)
    filters = sum(e - s for s, e in columns.values())
    assert sub.gater.fc2.out_features == int(groups.max()) + 1 == max(e for _, e in group_columns.values())
    assert sub.gater.fc2.out_features < filters
    ungrouped = nas4dyn.build_supernet(grouped_space(1))
    assert ungrouped.extract(ALL_MECHANISMS).gater.fc2.out_features == filters


def test_grouped_exports_equal_the_supernet_and_gate_whole_groups(net, data, tmp_path):
    partial = 0
    for i, arch in enumerate((ALL_MECHANISMS, onnx_able(ALL_MECHANISMS))):
        arch = calibrated(net, arch, data["normalised"])
        ref_logits, ref_exit = reference(net, arch, data["normalised"])
        model = nas4dyn.export_subnet(net, arch, data["info"])
        if i == 0:  # TorchScript (scripting takes seconds: once, on the arch with MBConv channel gates too)
            scripted = save_torchscript(model, tmp_path / "m.ts")
            with torch.no_grad():
                logits, exit_index = scripted.forward_with_exits(data["images"])
                one_by_one = torch.cat([scripted(data["images"][j : j + 1]) for j in range(8)])
            assert torch.equal(exit_index, ref_exit)
            assert (logits - ref_logits).abs().max() <= 1e-4
            assert (one_by_one - ref_logits[:8]).abs().max() <= 1e-4
        else:  # basic-block channel gates only: ONNX
            export_onnx(model, tmp_path / "onnx", RES)
            onnx_logits, onnx_exit = OnnxDynamicModel(tmp_path / "onnx").forward_with_exits(data["images"].numpy())
            assert torch.equal(torch.from_numpy(onnx_exit), ref_exit)
            assert (torch.from_numpy(onnx_logits) - ref_logits).abs().max() <= 1e-4
        for seg in model.subnet.segments:
            for blk in seg.blocks:
                if blk.gate_kind != "channel":
                    continue
                with torch.no_grad():
                    mask = blk.channel_mask(model.subnet.gater(data["normalised"]))
                for g in range(int(blk.filter_group.max()) + 1):  # every filter of a group decides alike
                    members = mask[:, blk.filter_group == g]
                    assert torch.equal(members, members[:, :1].expand_as(members))
                rate = mask.float().mean(0)
                partial += int(((rate > 0) & (rate < 1)).sum())
    assert partial >= 6  # the comparison means something only if groups open and close per image


def test_forcing_a_grouped_block_opens_the_groups_of_the_filters(net):
    blk = net.block(0, 0).extract(3, 8, "channel", 0, 3, GROUP).eval()
    assert blk.filter_group.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    _, logits = forced_block(blk, torch.arange(8) < 4)
    assert (logits[0] > 0).tolist() == [True, True, False]
    assert blk.channel_mask(logits)[0].tolist() == [True] * 6 + [False] * 2


@pytest.mark.parametrize("value", [0, -2, 1.5, "8"])
def test_bad_gate_group_is_a_space_error_naming_the_field(value):
    data = yaml.safe_load((BUILTIN_DIR / "tiny.yaml").read_text())
    data["gater"]["group"] = value
    with pytest.raises(SpaceError, match="gater.group"):
        space_from_dict(data)


@pytest.mark.parametrize("stage, group", [(0, GROUP), (0, 1), (1, 8)])  # basic (ragged groups, per filter), MBConv
def test_pre_gathered_subsets_equal_the_gathered_convs(net, stage, group):
    """Every subset code of a block with few gate columns runs as the per-image gather of its filters would."""
    width = net.space.stages[stage].widths[0]
    hidden = net.block(stage, 0).hidden(width)
    columns = -(-hidden // group)
    blk = net.block(stage, 0).extract(3, width, "channel", 0, columns, group).eval()
    assert len(blk.subset_w1) == 2 ** columns and columns <= 4
    x = torch.randn(1, net.space.block_in_channels(stage, 0), 8, 8)
    column = blk.filter_group if group > 1 else torch.arange(hidden)
    with torch.no_grad():
        for code in range(2 ** columns):
            open_columns = torch.tensor([(code >> i) & 1 for i in range(columns)], dtype=torch.bool)
            assert blk.subset_code(torch.where(open_columns, 1.0, -1.0)[None]) == code
            expected = blk.run(x, open_columns[column][None])
            assert (blk.run_subset(x, code) - expected).abs().max() <= 1e-5, code


def test_count_macs_counts_the_grouped_gater_and_what_each_sample_runs(net, data):
    arch = calibrated(net, ALL_MECHANISMS, data["normalised"])
    x = data["normalised"][:12]
    rep = nas4dyn.count_macs(net, arch, [(x, None)])
    sub = net.extract(arch).eval()
    per_sample = []
    for i in range(len(x)):
        exit_index = sub.forward_with_exits(x[i : i + 1])[1].item()
        confidence = sum(rep.parts[f"confidence.{e.stage}.{e.block}"] for e in arch.exits[: exit_index + 1])
        per_sample.append(flop_counter_macs(sub, x[i : i + 1]) + confidence)
    assert rep.macs_expected == pytest.approx(sum(per_sample) / len(per_sample))
    hidden = sub.gater.fc1.out_features
    ungrouped = nas4dyn.count_macs(grouped_net(net, 1), arch)
    filters = sum(e - s for s, e in net._gate_rows(arch)[1].values())
    assert ungrouped.parts["gater"] - rep.parts["gater"] == hidden * (filters - sub.gater.fc2.out_features)


def test_pre_gathered_subsets_follow_the_block_to_another_dtype(net):
    """.to() reaches the pre-gathered lists as it reaches buffers (the same path as .cuda())."""
    blk = net.block(0, 0).extract(3, 8, "channel", 0, 3, GROUP).eval().double()
    assert all(t.dtype == torch.float64 for t in blk.subset_w1 + blk.subset_b1 + blk.subset_w2)
    with torch.no_grad():
        assert blk.run_subset(torch.randn(1, 4, 8, 8, dtype=torch.float64), 5).dtype == torch.float64


def test_grouped_gates_train_every_row_of_a_group_alike(data):
    """In training the gater's rows get gradients through their group's logit: each row of a group the same."""
    torch.manual_seed(0)
    net = make_decisive(nas4dyn.build_supernet(grouped_space())).train()
    arch = dataclasses.replace(ALL_MECHANISMS, exits=())
    net.set_active(arch)
    net.forward_all(data["normalised"][:16])[-1].square().sum().backward()
    rows, _, groups, _ = net._gate_rows(arch)
    grad = net.gater.fc2.weight.grad[rows]
    assert grad.abs().sum() > 0
    for g in range(int(groups.max()) + 1):
        members = grad[groups == g]
        assert torch.allclose(members, members[:1].expand_as(members))


def test_spaces_listing_names_the_gate_group():
    from nas4dyn.cli.spaces import describe

    assert "groups of 3" in describe(grouped_space()) and "groups of" not in describe(grouped_space(1))
