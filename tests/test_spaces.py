"""Space files, the schema's error reports, and Arch validation errors."""
from __future__ import annotations

import json
import random

import pytest
import yaml

import nas4dyn
from nas4dyn.errors import InvalidArchError, SpaceError
from search_spaces import Arch, ExitChoice, builtin_spaces, load_space
from search_spaces.space import BUILTIN_DIR


def test_builtins_load_and_fmnist_is_regular_conv():
    assert {"fmnist", "mbv3", "tiny"} <= set(builtin_spaces())
    fm = load_space("fmnist")
    assert fm.input_channels == 1
    assert all(st.block == "basic" for st in fm.stages)
    assert set().union(*(st.kernels for st in fm.stages)) == {3, 5, 7}
    assert len(fm.exits.positions) >= 3
    assert all(set(st.gates) >= {"channel", "skip"} for st in fm.stages)
    mb = load_space("mbv3")
    assert all(st.block == "mbconv" and st.kernels == (3, 5, 7) and st.widths == (3, 4, 6) for st in mb.stages)
    assert len(mb.resolutions) > 1


def test_space_file_by_path_and_json_round_trip(tmp_path):
    data = yaml.safe_load((BUILTIN_DIR / "tiny.yaml").read_text())
    data["name"] = "mine"
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(data))
    space = load_space(str(path))
    assert space.name == "mine"
    assert load_space(str(path)) == space


def test_schema_reports_every_problem(tmp_path):
    data = yaml.safe_load((BUILTIN_DIR / "tiny.yaml").read_text())
    data["stages"][0]["kernels"] = [4]
    data["stages"][1]["block"] = "transformer"
    data["exits"]["positions"] = [[9, 0]]
    data["colour"] = "blue"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpaceError) as err:
        load_space(str(path))
    msg = str(err.value)
    for fragment in ("stages[0].kernels", "stages[1].block", "exits.positions[0]", "space.colour"):
        assert fragment in msg


def test_unknown_space_names_the_choices():
    with pytest.raises(SpaceError, match="built-in name"):
        load_space("no-such-space")


def _replace(arch: Arch, **kw) -> Arch:
    d = dict(space=arch.space, resolution=arch.resolution, depths=arch.depths, kernels=arch.kernels,
             widths=arch.widths, gates=arch.gates, exits=arch.exits)
    d.update(kw)
    return Arch(**d)


BAD = {
    "depth": (lambda a: _replace(a, depths=(3,) + a.depths[1:], kernels=((3, 3, 3),) + a.kernels[1:],
                                 widths=((8, 8, 8),) + a.widths[1:], gates=(("none",) * 3,) + a.gates[1:]),
              "arch.depths[0]", "[1, 2]"),
    "kernel": (lambda a: _replace(a, kernels=((7,) * a.depths[0],) + a.kernels[1:]), "arch.kernels", "[3, 5]"),
    "exit": (lambda a: _replace(a, exits=(ExitChoice(0, 1, 0.5),)), "arch.exits", "candidate position"),
    "gate": (lambda a: _replace(a, gates=(("sometimes",) * a.depths[0],) + a.gates[1:]), "arch.gates",
             "['none', 'channel']"),
    "resolution": (lambda a: _replace(a, resolution=-16), "arch.resolution", "[12, 16]"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_archs_name_field_and_allowed_values(tiny_space, case):
    make, field, allowed = BAD[case]
    base = tiny_space.min_arch()
    with pytest.raises(ValueError) as err:
        tiny_space.validate(make(base))
    assert isinstance(err.value, InvalidArchError)
    assert field in str(err.value) and allowed in str(err.value)


def test_mismatched_block_lists_are_rejected():
    with pytest.raises(InvalidArchError, match="one entry per active block"):
        Arch("tiny", 12, (2,), ((3,),), ((4,),), (("none",),))


def test_arch_from_dict_rejects_other_versions(tiny_space):
    d = tiny_space.max_arch().to_dict()
    d["format_version"] = 99
    with pytest.raises(InvalidArchError, match="format_version"):
        Arch.from_dict(d)


def test_sampling_is_deterministic_and_static_sampling_has_no_dynamics(tiny_space):
    a = tiny_space.sample(random.Random(7))
    assert a == tiny_space.sample(random.Random(7))
    for seed in range(50):
        static = tiny_space.sample(random.Random(seed), dynamic=False)
        assert not static.is_dynamic


def test_num_subnets_counts_choices(tiny_space):
    # static: 2 resolutions x prod over stages of sum over depths of (kernels*widths)^depth
    expected = 2 * (4 + 16) * (4 + 16) * (2 + 4)
    assert tiny_space.num_subnets(dynamic=False) == expected
    assert tiny_space.num_subnets() > expected


def test_public_api_names_exist():
    for name in ("load_space", "build_supernet", "load_supernet", "Arch"):
        assert hasattr(nas4dyn, name)
