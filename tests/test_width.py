"""Width gates (per-sample width choice), BatchNorm folding of gated blocks, and the static path twins that
path-equivalent overhead is measured against."""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import nas4dyn
from nas4dyn.cost.static_path import block_decisions, path_model
from nas4dyn.errors import InvalidArchError
from nas4dyn.train.losses import gated_mac_rate
from nas4dyn.train.sampling import gated
from search_spaces import Arch
from search_spaces.arch import ExitChoice
from supernet.dynamic.width import WidthGate, WidthGatedBlock
from supernet.scripting import freeze_scripted
from tests.conftest import all_space, make_decisive


@pytest.fixture(scope="module")
def space():
    return all_space()


@pytest.fixture(scope="module")
def net(space):
    """A decisive supernet whose width heads pick every option for some samples: the logits are scaled up and
    each option's margin over the options' mean is centred at its median over random inputs."""
    torch.manual_seed(0)
    net = make_decisive(nas4dyn.build_supernet(space))
    arch = gated(space, space.max_arch(), "width")
    logits = {}
    hooks = [m.register_forward_hook(lambda m, i, o: logits.__setitem__(m, o)) for m in net.modules()
             if isinstance(m, WidthGate)]
    net.set_active(arch)
    with torch.no_grad():
        net.forward_all(images(space, arch, 64, seed=9))
        for gate, out in logits.items():
            gate.fc2.weight.mul_(20.0)
            gate.fc2.bias.mul_(20.0)
            relative = 20.0 * (out - out.mean(1, keepdim=True))  # each option against the others
            gate.fc2.bias.sub_(relative.median(0).values)
    for h in hooks:
        h.remove()
    return net


def images(space, arch, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, space.input_channels, arch.resolution, arch.resolution,
                       generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def with_exits(net, arch: Arch, positions: list[tuple[int, int]], x: torch.Tensor) -> Arch:
    """``arch`` with exits at ``positions``, each threshold between two observed confidences so that about a
    third of the samples reaching it leave."""
    arch = dataclasses.replace(arch, exits=tuple(ExitChoice(s, b, 0.5) for s, b in positions))
    net.set_active(arch)
    confidences = [torch.softmax(z, 1).max(1).values.sort().values for z in net.forward_all(x)[:-1]]
    k = 2 * len(x) // 3
    return arch.with_thresholds([float(c[k - 1] + c[k]) / 2 for c in confidences])


def width_arch(space, net, x: torch.Tensor) -> Arch:
    """Every block that allows it width-gated at its widest width, two exits."""
    return with_exits(net, gated(space, space.max_arch(), "width"), [(0, 0), (1, 1)], x)


def test_width_gates_are_allowed_only_where_a_stage_has_widths_to_choose(space):
    assert "width" in space.allowed_gates(1, 1)
    one_width = dataclasses.replace(space, stages=(dataclasses.replace(space.stages[0], widths=(8,)),) + space.stages[1:])
    assert "width" not in one_width.allowed_gates(0, 1)
    assert space.stages[0].width_options(8) == (4, 8) and space.stages[0].width_options(4) == (4,)
    # At the stage's narrowest width a width gate would have one option: a static block in disguise.
    narrowest = min(space.stages[1].widths)
    assert "width" in space.allowed_gates(1, 1, width=max(space.stages[1].widths))
    assert "width" not in space.allowed_gates(1, 1, width=narrowest)
    depths = space.max_arch().depths
    narrow = dataclasses.replace(space.max_arch(),
                                 widths=tuple((min(st.widths),) * d for st, d in zip(space.stages, depths)))
    assert all(blk.gate != "width" for blk in gated(space, narrow, "width").blocks())
    with pytest.raises(InvalidArchError, match="'width' is not one of"):
        space.validate(dataclasses.replace(narrow, gates=gated(space, space.max_arch(), "width").gates))
    wide = dataclasses.replace(space.stages[0], widths=(2, 3, 4, 5, 6, 7))
    assert wide.width_options(6) == (3, 4, 5, 6)  # at most four, the widest up to the block's


@torch.no_grad()
def test_exported_width_gates_equal_the_supernets_dynamic_eval(space, net):
    x = images(space, space.max_arch(), 12)
    arch = width_arch(space, net, x)
    net.set_active(arch)
    ref_logits, ref_exit = net.forward_with_exits(x)
    sub = net.extract(arch).eval()
    width_blocks = [b for seg in sub.segments for b in seg.blocks if isinstance(b, WidthGatedBlock)]
    assert len(width_blocks) == sum(g == "width" for s in arch.gates for g in s) >= 3
    frozen = freeze_scripted(sub, ["forward_with_exits", "gate_decisions"])
    logits, exits = frozen.forward_with_exits(x)
    assert torch.equal(exits, ref_exit) and len(set(exits.tolist())) >= 2
    assert (logits - ref_logits).abs().max() <= 1e-5
    for i in range(0, len(x), 2):  # batch 1 runs one branch per block, the same one
        one, e = frozen.forward_with_exits(x[i : i + 1])
        assert e.item() == exits[i].item() and (one[0] - logits[i]).abs().max() <= 1e-5
    # Decisions are filter masks keeping each sample's first filters, and the samples chose different widths.
    decisions = frozen.gate_decisions(x)
    widths = decisions.sum(1)
    assert len(set(widths.tolist())) >= 3
    for row in torch.split(decisions, [int(b.masks.shape[1]) for b in width_blocks], dim=1):
        on = row.sum(1)
        assert torch.equal(row, torch.arange(row.shape[1])[None, :] < on[:, None])


def test_width_gates_train_under_the_budget_loss(space, net):
    arch = gated(space, space.max_arch(), "width")
    trained = nas4dyn.build_supernet(space).train()
    trained.set_active(arch)
    trained.forward_all(images(space, arch, 8))
    rate = gated_mac_rate(trained.gate_trace)
    assert rate is not None and 0 < float(rate.mean()) <= 1
    rate.mean().backward()  # the budget loss's gradient reaches every width head
    heads = [b.width_gate for b in trained.modules() if getattr(b, "width_gate", None) is not None]
    used = [h for h in heads if h.fc2.weight.grad is not None]
    assert used and all(float(h.fc2.weight.grad.abs().sum()) > 0 for h in used)


@torch.no_grad()
def test_width_gate_macs_follow_the_chosen_width(space, net):
    arch = gated(space, space.max_arch(), "width")
    x = images(space, arch, 6, seed=3)
    report = nas4dyn.count_macs(net, arch, [(x, None)])
    sub = net.extract(arch).eval()
    per_sample = []
    for i in range(len(x)):
        with FlopCounterMode(display=False) as counter:
            sub(x[i : i + 1])
        per_sample.append(counter.get_total_flops() / 2)
    assert min(per_sample) < max(per_sample) <= report.macs_max
    assert report.macs_expected == pytest.approx(sum(per_sample) / len(per_sample))


def _emg_arch(space) -> Arch:
    return Arch(space.name, 16, (2, 1, 1), ((5, 5), (3,), (3,)), ((8, 8), (3,), (16,)),
                (("none", "emg"), ("none",), ("none",)))


@torch.no_grad()
def test_emg_folds_its_batchnorm_even_with_a_negative_scale(space):
    """The exported EMG block folds bn1 into both kernels; where the BN's scale is negative the threshold's
    comparison flips, and the decisions still equal the supernet's."""
    torch.manual_seed(1)
    net = make_decisive(nas4dyn.build_supernet(space))
    arch = _emg_arch(space)
    x = images(space, arch, 16, seed=2)
    block = net.stages[0][1]
    block.bn1.weight[::2] *= -1.0  # every other filter: a negative scale
    # thresholds at each filter's median response: decisions vary across samples
    h = net.stages[0][0](net.stem(x), 5, 8)
    response = block.emg_gate.small_response(h, block.conv1.kernel_weight(8, block.in_ch, 5), block.stride)
    block.emg_gate.threshold[:8] = response.mean(dim=(2, 3)).median(0).values + 1e-3
    net.set_active(arch)
    ref_logits, ref_exit = net.forward_with_exits(x)
    gates = net.gate_trace[0].values.bool()
    sub = net.extract(arch).eval()
    exported = sub.segments[0].blocks[1]
    assert exported.emg_sign[::2].eq(-1).all() and exported.emg_sign[1::2].eq(1).all()
    assert torch.equal(sub.gate_decisions(x).bool(), gates) and 0 < gates.float().mean() < 1
    logits, exits = sub.forward_with_exits(x)
    assert torch.equal(exits, ref_exit) and (logits - ref_logits).abs().max() <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("kind", ["channel", "skip", "emg", "dfs", "width", "route"])
def test_path_twins_compute_the_dynamic_models_logits(space, net, kind):
    """Each sample's static path twin (what path-equivalent overhead is measured against) gives the dynamic
    subnet's logits, with none of its decision machinery."""
    top = dataclasses.replace(space.max_arch(), kernels=((5, 5), (3, 3), (3, 3)))
    arch = dataclasses.replace(top, paths=(1, 1, 3)) if kind == "route" else gated(space, top, kind)
    assert arch != top
    x = images(space, arch, 6, seed=4)
    arch = with_exits(net, arch, [(1, 1)], x)
    sub = net.extract(arch).eval()
    logits, exits = sub.forward_with_exits(x)
    decisions = block_decisions(sub, x)
    mean, std = torch.zeros(1), torch.ones(1)
    paths = set()
    for i in range(len(x)):
        rows = [d[i] for d in decisions]
        twin = freeze_scripted(path_model(sub, mean, std, int(exits[i]), rows))
        assert (twin(x[i : i + 1])[0] - logits[i]).abs().max() <= 1e-4
        paths.add((int(exits[i]),) + tuple(tuple(r.long().tolist()) for r in rows))
        eager = path_model(sub, mean, std, int(exits[i]), rows)
        assert not {"GlobalGater", "SkipGate", "DFSGate", "WidthGate", "Router"} & {type(m).__name__ for m in eager.modules()}
    assert len(paths) >= 2  # the samples took different paths
