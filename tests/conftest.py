"""Shared fixtures: tiny spaces and supernets whose gates and exits take varied decisions."""
from __future__ import annotations

import os
import random

import pytest
import torch
import yaml

import nas4dyn
from nas4dyn.cost.profiler import profile_space
from nas4dyn.cost.settings import ProfileSettings
from search_spaces.space import BUILTIN_DIR, SearchSpace, space_from_dict
from supernet.dynamic.gates import SkipGate

torch.set_num_threads(min(2, len(os.sched_getaffinity(0))))  # never more threads than usable cores


def make_decisive(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb an untrained supernet so that gates open and close and exits fire: random BN statistics,
    gate biases around zero, and sharper exit heads. Returns the net in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(0.4 * torch.rand(m.num_features, generator=g) - 0.2)
            if isinstance(m, SkipGate):
                m.fc2.bias.uniform_(-0.5, 0.5, generator=g)
        if getattr(net, "gater", None) is not None:
            net.gater.fc2.bias.uniform_(-0.5, 0.5, generator=g)
        for head in list(getattr(net, "exit_heads", {}).values()):
            head.fc.weight.mul_(8.0)
    return net.eval()


def all_space() -> SearchSpace:
    """tiny with every dynamic mechanism: EMG and DFS gates in the basic stages (kernel 5 qualifies for EMG),
    width gates in the first two (a basic and an MBConv stage), CIGT routing (1, 2 or 3 paths) in the last."""
    data = yaml.safe_load((BUILTIN_DIR / "tiny.yaml").read_text())
    data["name"] = "tiny_all"
    data["stages"][0]["gates"] = ["none", "channel", "skip", "emg", "dfs", "width"]
    data["stages"][1]["gates"] = ["none", "channel", "skip", "width"]
    data["stages"][2]["gates"] = ["none", "channel", "skip", "dfs"]
    data["stages"][2]["paths"] = [1, 2, 3]
    return space_from_dict(data)


def onnx_space() -> SearchSpace:
    """:func:`all_space` less the gates model.onnx cannot carry (DFS, MBConv channel gates): width gates on a basic
    and an MBConv stage, EMG gates, channel and skip gates, CIGT routing."""
    data = all_space().to_dict()
    data["name"] = "tiny_onnx"
    data["stages"][0]["gates"] = ["none", "channel", "skip", "emg", "width"]
    data["stages"][1]["gates"] = ["none", "skip", "width"]
    data["stages"][2]["gates"] = ["none", "channel", "skip"]
    return space_from_dict(data)


@pytest.fixture(scope="session")
def tiny_table():
    """A latency table of :func:`all_space`, measured with settings small enough for a test and large enough
    that every code path of the profiler runs."""
    quick = ProfileSettings(repeats=2, burst=1, channel_levels=3, calibrate=3, validate=2)
    return profile_space(all_space(), quick, progress=False)


@pytest.fixture(scope="session")
def tiny_space():
    return nas4dyn.load_space("tiny")


@pytest.fixture()
def tiny_net(tiny_space):
    torch.manual_seed(0)
    return make_decisive(nas4dyn.build_supernet(tiny_space))


@pytest.fixture()
def rng():
    return random.Random(0)
