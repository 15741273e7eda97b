"""The measured front by mechanism (scripts/bench_mechanisms.py --front): every variant evaluated, exported and
timed; the front and the "beaten by static or exits" verdicts follow from the rows; a rerun measures nothing
again but times anew."""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import pytest
import torch

from tests.test_search import run_dir  # noqa: F401 (fixture)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import mechanism_front  # noqa: E402


def _front(run: Path, out: Path) -> list[dict]:
    return mechanism_front.measure_front(run, out, backbones=2, gated_every=2, val_images=40, bn_images=32,
                                         test_images=4, rounds=1, seed=0, timing=contextlib.nullcontext(), pool=40)


def test_front_of_a_run_by_mechanism_and_a_rerun_only_times(run_dir, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    rows = _front(run_dir, tmp_path / "f")
    mechanisms = {r["mechanism"] for r in rows}
    assert {"static", "exits", "channel gates", "skip gates", "channel gates + exits"} <= mechanisms
    assert len({r["backbone"] for r in rows}) == 2
    # Every second backbone counted from the largest carries the gate variants: here the largest alone.
    assert {r["backbone"] for r in rows if "gates" in r["mechanism"]} == {1}
    macs = [r["macs_max"] for r in rows if r["mechanism"] == "static"]
    assert macs == sorted(macs) and macs[0] < macs[-1]
    for r in rows:
        assert 0.0 <= r["test_acc"] <= 1.0 and r["ms"] > 0 and (tmp_path / "f" / "models" / r["model"]).is_file()
        better = [o for o in rows if o["test_acc"] >= r["test_acc"] and o["ms"] <= r["ms"]
                  and (o["test_acc"], o["ms"]) != (r["test_acc"], r["ms"])]
        assert r["on_front"] == (not better)
        if r["beaten_by"]:
            assert next(o for o in rows if o["name"] == r["beaten_by"])["mechanism"] in ("static", "exits")
    assert (tmp_path / "f" / "front_timed.json").is_file()
    lines = mechanism_front.front_table(rows)
    assert any(line.startswith("- channel gates:") for line in lines)
    mechanism_front.plot_front(rows, tmp_path / "f" / "front.png", "tiny")
    assert (tmp_path / "f" / "front.png").stat().st_size > 0

    def no_evaluation(*args, **kwargs):
        raise AssertionError("a rerun evaluated a subnet again")

    monkeypatch.setattr(mechanism_front, "evaluate_arch", no_evaluation)
    again = _front(run_dir, tmp_path / "f")
    assert [(r["name"], r["test_acc"]) for r in again] == [(r["name"], r["test_acc"]) for r in rows]
    saved = json.loads((tmp_path / "f" / "front.json").read_text())
    assert {r["name"] for r in saved} == {r["name"] for r in rows}


def test_dominated_needs_better_in_one_objective():
    a = {"test_acc": 0.9, "ms": 1.0}
    assert mechanism_front.dominated(a, [a, {"test_acc": 0.9, "ms": 1.0}]) is None
    assert mechanism_front.dominated(a, [{"test_acc": 0.9, "ms": 0.9}]) is not None
    assert mechanism_front.dominated(a, [{"test_acc": 0.95, "ms": 1.1}]) is None


@pytest.mark.parametrize("count", [2, 5])
def test_spread_backbones_are_static_and_span_the_mac_range(tiny_space, count):
    picked = mechanism_front.spread_backbones(tiny_space, count, seed=0, pool=60)
    assert len(picked) == count and len(set(picked)) == count
    assert all(not a.is_dynamic and a.resolution == max(tiny_space.resolutions) for a in picked)
    top = tiny_space.max_arch()
    assert picked[-1].depths == top.depths and picked[-1].widths == top.widths
