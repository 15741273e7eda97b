"""Seed-paper mechanisms as gate kinds: EMGNet multi-scale kernels and DFS skip / int8 / fp32 routing."""
from __future__ import annotations

import copy
import dataclasses
import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import nas4dyn
from nas4dyn.errors import InvalidArchError
from search_spaces import Arch
from supernet.dynamic.dfs import DFSGate
from supernet.static_blocks import StaticBasicBlock
from tests.conftest import all_space, make_decisive

SPACE = "fmnist_dynamic_all"


@pytest.fixture(scope="module")
def space():
    return nas4dyn.load_space(SPACE)


@pytest.fixture(scope="module")
def net(space):
    torch.manual_seed(0)
    net = nas4dyn.build_supernet(space).train()
    with torch.no_grad():  # let the DFS activation ranges see data
        for seed in range(3):
            net.set_active(space.sample(random.Random(seed)))
            net.forward_all(torch.randn(8, 1, 28, 28).relu())
    return make_decisive(net)


def one_block_arch(space, gate: str, kernel: int = 5) -> Arch:
    """Depth (1, 2, 1); the gate sits on stage 1 block 1 (an identity-shortcut block)."""
    return Arch(SPACE, 28, (1, 2, 1), ((3,), (kernel, kernel), (3,)), ((12,), (48, 48), (48,)),
                (("none",), ("none", gate), ("none",)))


def test_rules_for_emg_and_dfs(space):
    with pytest.raises(InvalidArchError, match="'emg' is not one of"):
        space.validate(one_block_arch(space, "emg", kernel=3))
    bad = Arch(SPACE, 28, (1, 1, 1), ((3,), (3,), (3,)), ((12,), (48,), (48,)), (("dfs",), ("none",), ("none",)))
    with pytest.raises(InvalidArchError, match="'dfs' is not one of"):
        space.validate(bad)
    assert "emg" not in nas4dyn.load_space("mbv3").allowed_gates(1, 1, 7)


def _emg_block(net, space) -> tuple[StaticBasicBlock, torch.Tensor]:
    arch = one_block_arch(space, "emg")
    net.set_active(arch)
    sub = net.extract(arch).eval()
    blocks, none = sub.segments[0].blocks, torch.zeros(1, 0)
    with torch.no_grad():
        x = blocks[1](blocks[0](sub.stem(torch.randn(1, 1, 28, 28)), none), none)
    return blocks[2], x


def test_emg_computes_the_large_kernel_only_for_open_filters(net, space):
    block, x = _emg_block(net, space)
    with torch.no_grad():
        block.emg_threshold.copy_(block.emg_gates(x)[0].mean(dim=(2, 3))[0])  # put each filter on its edge
        block.emg_threshold[: len(block.emg_threshold) // 3] -= 1.0  # a third open, the rest closed
        gates = block.emg_gates(x)[1]
        n_on, n_all = int(gates.sum()), gates.shape[1]
        with FlopCounterMode(display=False) as counter:
            block.emg_conv1(x)
    pixels, cin = x.shape[-1] ** 2, x.shape[1]  # stride 1 block
    expected = pixels * cin * (9 * n_all + 25 * n_on)
    assert 0 < n_on < n_all
    assert counter.get_total_flops() / 2 == expected


def test_emg_and_dfs_batches_equal_single_samples(net, space):
    for gate in ("emg", "dfs"):
        arch = one_block_arch(space, gate)
        net.set_active(arch)
        sub = net.extract(arch).eval()
        x = torch.randn(12, 1, 28, 28)
        with torch.no_grad():
            batch = sub(x)
            singles = torch.cat([sub(x[i : i + 1]) for i in range(len(x))])
        assert (batch - singles).abs().max() <= 1e-5


def test_dfs_int8_path_uses_quantized_kernels_and_matches_fake_quant(net, space):
    arch = one_block_arch(space, "dfs")
    net.set_active(arch)
    block = net.stages[1][1]
    with torch.no_grad():
        block.dfs_gate.fc2.bias.copy_(torch.tensor([-9.0, 9.0, -9.0]))  # everyone takes int8
        block.dfs_gate.fc2.weight.zero_()
    sub = net.extract(arch).eval()
    static = sub.segments[0].blocks[2]
    assert isinstance(static.int8_branch.qconv1, torch.ao.nn.quantized.Conv2d)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        ref, ref_exit = net.forward_with_exits(x)
        out, out_exit = sub.forward_with_exits(x)
        net.set_active(arch.without_dynamic())
        fp32 = net.forward_all(x)[-1]
        h = torch.randn(4, 48, 7, 7).relu()
        real, fake = block.int8_branch(5, 48).eval()(h), block.fake_int8_branch(h, 5, 48)
    assert torch.equal(ref_exit, out_exit) and (ref - out).abs().max() <= 1e-5
    assert (ref - fp32).abs().max() > 1e-3  # the int8 branch really differs from fp32
    # Training's fake quantization emulates the int8 kernels to within rounding: the two round at different
    # points, so single outputs may differ by a few quantization steps (scaled by the last BN), on average by
    # less than one.
    step = max(q.qparams()[0] for q in (block.dfs_quant.out1, block.dfs_quant.out2))
    unit = step * float(block.bn2.weight.detach().abs().max() / block.bn2.running_var.min().sqrt())
    diff = (real - fake).abs()
    assert diff.max() <= 8 * unit and diff.mean() <= 0.5 * unit


def test_dfs_gate_learns_through_the_straight_through_estimator(net, space):
    arch = one_block_arch(space, "dfs")
    net.set_active(arch)
    net.train()
    net.zero_grad()
    outs = net.forward_all(torch.randn(6, 1, 28, 28))
    trace = [t for t in net.gate_trace if t.kind == "dfs"][0]
    (outs[-1].square().mean() + trace.values.mean()).backward()
    net.eval()
    assert net.stages[1][1].dfs_gate.fc2.weight.grad.abs().sum() > 0
    assert trace.values.shape == (6,) and set(trace.values.detach().tolist()) <= {0.0, 0.0625, 1.0}


def routed_arch(space) -> Arch:
    return Arch(SPACE, 28, (1, 1, 2), ((3,), (3,), (3, 5)), ((12,), (24,), (48, 96)),
                (("none",), ("none",), ("none", "none")), (), (1, 1, 4))


def test_routed_stage_runs_only_the_chosen_path(net, space):
    arch = routed_arch(space)
    net.set_active(arch)
    for router in net.routers.values():
        with torch.no_grad():
            router.fc2.weight.normal_(0, 3.0)
    sub = net.extract(arch).eval()
    routed = [b for seg in sub.segments for b in seg.blocks if hasattr(b, "router")]
    assert len(routed) == 2 and all(len(b.paths) == 4 for b in routed)
    calls = []
    for b in routed:
        for i, path in enumerate(b.paths):
            path.register_forward_hook(lambda m, inp, out, i=i: calls.append((i, len(inp[0]))))
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        batch = sub(x)
        assert sum(n for _, n in calls) == 2 * 16  # every sample through exactly one path per block
        calls.clear()
        single = sub(x[:1])
    assert len(calls) == 2 and (single - batch[:1]).abs().max() <= 1e-5
    net.reset_stats()
    with torch.no_grad():
        net(x)
    shares = net.route_stats()
    assert set(shares) == {"2.0", "2.1"} and all(abs(sum(v) - 1) < 1e-6 for v in shares.values())


def test_seeded_path_copies_make_routing_start_from_the_shared_block():
    space = all_space()
    torch.manual_seed(0)
    net = make_decisive(nas4dyn.build_supernet(space))
    single = Arch("tiny_all", 16, (1, 1, 2), ((5,), (3,), (3, 3)), ((8,), (3,), (16, 16)),
                  (("none",), ("none",), ("none", "none")))
    routed = dataclasses.replace(single, paths=(1, 1, 3))
    x = torch.randn(8, 1, 16, 16)

    def logits(arch: Arch) -> torch.Tensor:
        net.set_active(arch)
        with torch.no_grad():
            return net.forward_all(x)[-1]

    assert (logits(routed) - logits(single)).abs().max() > 1e-3  # untrained copies differ from the block
    net.seed_path_copies()
    assert (logits(routed) - logits(single)).abs().max() <= 1e-5


def test_a_training_forward_leaves_no_graph_on_the_modules():
    """Phase-end evaluation deep-copies the net right after training steps: no module may hold a non-leaf."""
    space = all_space()
    net = nas4dyn.build_supernet(space).train()
    net.set_active(Arch("tiny_all", 16, (2, 1, 2), ((5, 5), (3,), (3, 3)), ((8, 8), (3,), (16, 16)),
                        (("emg", "dfs"), ("none",), ("none", "skip"))))
    net.forward_all(torch.randn(4, 1, 16, 16))[-1].sum().backward()
    net.gate_trace, net.route_trace = [], []
    copy.deepcopy(net)


def test_information_gain_loss_rewards_class_pure_balanced_routes():
    from supernet.dynamic.cigt import information_gain_loss

    labels = torch.arange(8) % 4
    pure = torch.nn.functional.one_hot(labels % 2, 2).float()  # classes 0,2 -> path 0; 1,3 -> path 1
    uniform = torch.full((8, 2), 0.5)
    collapsed = torch.nn.functional.one_hot(torch.zeros(8, dtype=torch.long), 2).float()
    log2 = torch.log(torch.tensor(2.0))
    assert information_gain_loss(pure, labels, 4) == pytest.approx(-log2.item(), abs=1e-6)
    assert information_gain_loss(uniform, labels, 4) == pytest.approx(0.0, abs=1e-6)
    assert information_gain_loss(collapsed, labels, 4) == pytest.approx(0.0, abs=1e-6)
    assert information_gain_loss(pure, labels, 4, balance=2.0) < information_gain_loss(pure, labels, 4)
    # Above 1 the balance term breaks the tie between a collapsed router and an uninformed uniform one.
    assert information_gain_loss(collapsed, labels, 4, balance=2.0) > information_gain_loss(uniform, labels, 4, balance=2.0)


def test_router_standardises_logits_so_no_path_wins_every_sample():
    from supernet.dynamic.cigt import Router

    torch.manual_seed(0)
    router = Router(8, 3).train()
    with torch.no_grad():
        router.fc2.bias.copy_(torch.tensor([10.0, 0.0, -10.0]))  # a lead no input-dependent part can overturn
    x = torch.randn(64, 8, 4, 4)
    features = torch.relu(router.bn(router.fc1(x.mean(dim=(2, 3)))))
    raw = torch.nn.functional.linear(features, router.fc2.weight, router.fc2.bias)  # the logits before the BN
    assert set(raw.argmax(1).tolist()) == {0}
    shares = torch.bincount(router(x, 3).argmax(1), minlength=3).float() / 64
    assert (shares > 0.1).all(), shares


def test_bn_recalibration_covers_the_routers(net, space):
    from nas4dyn.data import load_data, make_loader
    from nas4dyn.train.bn import recalibrate_bn

    arch = routed_arch(space)
    router = net.routers["2_0"]
    with torch.no_grad():
        router.balance.running_mean.fill_(50.0)  # statistics left over from other subnets
        router.bn.running_var.fill_(1e4)
    data = load_data("synthetic", augment=False, synthetic={"resolution": 28, "n_train": 64, "n_test": 8})
    recalibrate_bn(net, arch, make_loader(data.train, 32), n_images=64)
    assert router.balance.running_mean.abs().max() < 50.0 and router.bn.running_var.max() < 1e4
    assert int(router.balance.num_batches_tracked) >= 1


def test_routers_learn_in_training(net, space):
    from supernet.dynamic.cigt import information_gain_loss

    arch = routed_arch(space)
    net.set_active(arch)
    net.train()
    net.zero_grad()
    net.forward_all(torch.randn(8, 1, 28, 28))
    loss = sum(information_gain_loss(r.probs, torch.arange(8) % 10, 10) for r in net.route_trace)
    loss.backward()
    net.eval()
    assert len(net.route_trace) == 2
    assert net.routers["2_0"].fc2.weight.grad.abs().sum() > 0


def test_dfs_single_sample_decision_is_the_batched_argmax():
    """The exported DFS block's batch-1 path (``one_sample_logits``, one host read) picks the option that the
    batched route (``logits(x).argmax``) picks, scripted too, for inputs spread over all three options."""
    torch.manual_seed(0)
    gate = DFSGate(8).eval()
    xs = 2 * torch.randn(300, 1, 8, 1, 1) + torch.randn(300, 1, 8, 5, 7)  # pooled inputs that differ per sample
    with torch.no_grad():
        gate.fc2.weight.mul_(10)
        gate.fc2.bias -= torch.cat([gate.logits(x) for x in xs]).mean(0)  # every option wins for some inputs
        scripted = torch.jit.script(gate)
        logits = torch.cat([gate.logits(x) for x in xs])
        top2 = logits.topk(2, dim=1).values
        clear = top2[:, 0] - top2[:, 1] > 1e-5  # a closer race may round either way
        assert logits.argmax(1).bincount(minlength=3).min() >= 30 and int(clear.sum()) > 290
        for x, row, decided in zip(xs, logits, clear):
            if decided:
                assert int(gate.one_sample_logits(x).argmax()) == int(scripted.one_sample_logits(x).argmax()) \
                    == int(row.argmax())
