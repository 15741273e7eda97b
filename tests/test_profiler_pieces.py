"""What the latency profiler times: weights shaped like trained ones, and exits timed inside a subnet."""
from __future__ import annotations

import torch

from nas4dyn.cost.profiler import exit_contexts, trained_like_batchnorms
from supernet.network import Supernet
from tests.conftest import all_space


def test_profiled_weights_have_no_all_zero_batchnorm_scales():
    torch.manual_seed(0)
    net = Supernet(all_space())
    fresh = [m.weight for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert any(bool((w == 0).all()) for w in fresh)  # zero-initialised residual BatchNorms: why this exists
    trained_like_batchnorms(net)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert bool((m.weight >= 0.5).all()) and bool((m.running_var >= 0.5).all())


@torch.no_grad()
def test_exit_contexts_differ_by_one_exit_that_no_sample_takes():
    space = all_space()
    torch.manual_seed(0)
    net = trained_like_batchnorms(Supernet(space)).eval()
    stages = {s for s, _ in space.exits.positions}
    for r in space.resolutions:
        contexts = exit_contexts(net, r)
        assert set(contexts) == stages
        x = torch.randn(3, space.input_channels, max(space.resolutions), max(space.resolutions))
        for s, (without, with_exit) in contexts.items():
            assert len(without.segments) == 1 and len(with_exit.segments) == 2
            assert without.resolution == with_exit.resolution == r
            logits, left = with_exit.forward_with_exits(x)
            assert bool((left == 1).all())  # the exit is never taken: every sample runs the whole subnet
            torch.testing.assert_close(logits, without(x))


def test_torchscript_tables_keep_each_exit_as_its_cost_in_context(tiny_table):
    table = tiny_table
    kinds = {key[0] for key in table.levels}
    assert "exit_context" not in kinds and "exit" in kinds
    exits = {key: levels for key, levels in table.levels.items() if key[0] == "exit"}
    assert len(exits) == len({s for s, _ in all_space().exits.positions}) * len(all_space().resolutions)
    assert all(len(levels) == 1 and levels[0][1] >= 0 for levels in exits.values())
    assert table.exit_scale == 1.0  # measured in context, exits get no scale fitted of their own
