"""scripts/bench_decision_cost.py: a path's "decided" model (decision modules replaced by the image's decisions as
constants) gives the dynamic export's logits on that image, and it really holds constants where the heads were."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import nas4dyn
from nas4dyn.train.sampling import gated
from supernet.network import Supernet

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench_decision_cost import ConstantGate, decided  # noqa: E402
from bench_overhead import all_mechanisms  # noqa: E402
from bench_export import backbone  # noqa: E402


@pytest.mark.parametrize("kind", ["channel", "width", "dfs"])
@torch.no_grad()
def test_decided_model_gives_the_dynamic_logits_of_its_image(kind):
    torch.manual_seed(0)
    net = Supernet(all_mechanisms(nas4dyn.load_space("fmnist"))).eval()
    exported = nas4dyn.export_subnet(net, gated(net.space, backbone(net.space), kind), {"mean": [0.3], "std": [0.3]})
    images = torch.rand(3, 1, 28, 28)
    for i in range(len(images)):
        x = images[i : i + 1]
        fixed = decided(exported, f"{kind} gates", images[i])
        assert torch.allclose(fixed(x), exported(x), atol=1e-5)
        constants = [m for m in fixed.modules() if isinstance(m, ConstantGate)]
        assert constants and not any(isinstance(m, ConstantGate) for m in exported.modules())
