"""The exported model's batch-1 fast path (one host read per exit passed, no exit-index tensor in ``forward``)
decides as the batched path's tensor comparison does, also at a threshold that only float32 rounding puts on a
confidence."""
from __future__ import annotations

import dataclasses

import torch

import nas4dyn
from search_spaces.arch import ExitChoice
from supernet.dynamic.heads import confidence
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
