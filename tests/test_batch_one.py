"""The exported model's batch-1 fast path (one host read per exit passed, no exit-index tensor in ``forward``)
decides as the batched path's tensor comparison does, also at a threshold that only float32 rounding puts on a
confidence; its channel gates' open filters, found for all blocks at once, equal each block's own decision."""
from __future__ import annotations

import dataclasses

import torch

import nas4dyn
from search_spaces.arch import ExitChoice
from supernet.dynamic.heads import confidence
from supernet.scripting import freeze_scripted
from tests.conftest import make_decisive
from tests.test_export import ALL_MECHANISMS, RES


def test_batch_one_exit_decisions_equal_the_tensor_comparison_at_the_float32_boundary():
    torch.manual_seed(0)
    net = nas4dyn.build_supernet("tiny").eval()
    x = torch.rand(1, 1, RES, RES)
    arch = dataclasses.replace(ALL_MECHANISMS, gates=(("none",) * 2,) * 3, exits=(ExitChoice(0, 0, 0.5),))
    with torch.no_grad():
        conf = confidence(net.extract(arch).eval().forward_all(x)[0], "max_softmax")
    seen = set()
    for threshold in (float(conf), float(conf) + 1e-12, float(conf) + 1e-6):  # the middle one rounds to conf
        sub = net.extract(arch.with_thresholds([threshold])).eval()
        with torch.no_grad():
            one_logits, one_exit = sub.forward_with_exits(x)
            if threshold == float(conf) + 1e-12:  # TorchScript decides alike (scripted once: it takes seconds)
                scripted = torch.jit.script(sub)
                assert torch.equal(scripted(x), one_logits)
                assert torch.equal(scripted.forward_with_exits(x)[1], one_exit)
            expected = 0 if bool(conf >= threshold) else 1  # what the batched path's comparison decides
            assert int(one_exit[0]) == expected, threshold
            assert torch.allclose(one_logits, sub.forward_with_exits(x.repeat(2, 1, 1, 1))[0][:1], atol=1e-5)
        seen.add(expected)
    assert seen == {0, 1}


def test_batch_one_open_filters_equal_each_blocks_own_decision():
    """At batch 1 ``SubNet.open_filters`` finds every per-filter channel-gated block's open filters at once; the
    result equals, bit for bit, each block deciding from the gate logits itself (``forward_all`` runs that
    path) — eager and frozen TorchScript — and the supernet's dynamic eval. Covers a block with every filter
    closed and a pre-gathered-subset block between slotted ones (so the slots skip gate columns)."""
    torch.manual_seed(0)
    net = make_decisive(nas4dyn.build_supernet("tiny"))
    arch = dataclasses.replace(ALL_MECHANISMS, gates=(("channel", "channel"), ("channel", "skip"), ("channel",) * 2),
                               exits=())  # block (0, 1) has 4 filters: pre-gathered subsets, no slot
    rows, columns, _, _ = net._gate_rows(arch)
    with torch.no_grad():
        net.gater.fc2.weight.mul_(10.0)
        start, end = columns[(2, 1)]
        net.gater.fc2.bias[rows[start:end]] = -1e3  # block (2, 1): every filter closed for every image
    sub = net.extract(arch).eval()
    assert [blk.keep_slot for seg in sub.segments for blk in seg.blocks] == [0, -1, 1, -1, 2, 3]
    assert not sub.keep_every_column
    frozen = freeze_scripted(sub, ["forward_all"])
    x = torch.randn(16, 1, RES, RES)
    net.set_active(arch)
    with torch.no_grad():
        reference = net.forward_all(x)[-1]
        counts = []
        for i in range(len(x)):
            one = x[i : i + 1]
            counts.append([len(k) for k in sub.open_filters(sub._prepare(one)[1])])
            assert torch.equal(sub(one), sub.forward_all(one)[-1])
            assert torch.equal(frozen(one), frozen.forward_all(one)[-1])
            assert (sub(one)[0] - reference[i]).abs().max() <= 1e-5
    filters = [8, 24, 16, 16]  # the slotted blocks' filters
    assert all(c[3] == 0 for c in counts)
    assert all(len({c[b] for c in counts}) > 1 and all(0 < c[b] < filters[b] for c in counts) for b in range(3))
