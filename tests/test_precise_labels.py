"""Precise labels for the predictor's held-out test (scripts/bench_predictor.py --precise): one validation pass
measures every subset as a trial of only those images would, the held-out plan holds only subnets no study
measured, and a measurement stopped midway resumes keeping what it measured."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest

from nas4dyn.data import subset_indices
from nas4dyn.errors import ConfigError
from nas4dyn.search import SearchConfig, run_search
from nas4dyn.search.encoding import decode, suggest
from nas4dyn.search.objectives import parse_objectives
from nas4dyn.search.outputs import completed
from nas4dyn.search.predictor_strategy import _key
from nas4dyn.search.trial import SearchSettings, evaluate_arch, evaluate_arch_subsets, load_context
from tests.test_search import load, run_dir  # noqa: F401 (fixture)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import predictor_holdout  # noqa: E402

OBJECTIVES = parse_objectives("accuracy:max,macs_expected:min")


def test_one_pass_measures_each_subset_as_a_trial_of_only_those_images(run_dir, tiny_space):
    whole = load_context(run_dir, SearchSettings(OBJECTIVES, bn_images=64))
    part = load_context(run_dir, SearchSettings(OBJECTIVES, bn_images=64, val_images=30))
    total = sum(len(y) for _, y in whole.val_batches)
    rows = np.asarray(subset_indices(total, 30, 0))
    images = np.concatenate([x.numpy() for x, _ in whole.val_batches])
    assert np.array_equal(images[rows], np.concatenate([x.numpy() for x, _ in part.val_batches]))  # the same images
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=5))
    drawn = [decode(tiny_space, suggest(study.ask(), tiny_space)) for _ in range(12)]
    with_exits = [arch for arch in drawn if arch.exits][:3]  # the calibration is what differs between subsets
    assert len(with_exits) == 3
    for arch in with_exits:
        got = evaluate_arch_subsets(whole, arch, whole.val_batches, {"all": None, "part": rows}, exit_budget=0.5)
        for name, ctx in (("all", whole), ("part", part)):
            alone = evaluate_arch(ctx, arch, ctx.val_batches, exit_budget=0.5).metrics
            for key in ("accuracy", "macs_expected", "samples", "thresholds", "exit_rates", "gate_rates"):
                assert got[name].metrics[key] == pytest.approx(alone[key], rel=1e-6), (name, key)


def test_held_out_plan_is_new_subnets_and_a_stopped_measurement_resumes(run_dir, tmp_path, monkeypatch):
    run_search(SearchConfig(run_dir=str(run_dir), out_dir=str(tmp_path / "s"), trials=10, sampler="random", seed=3,
                            bn_images=64, val_images=30, progress=False))
    study = load(tmp_path / "s" / "study.db")
    trials = completed(study)
    args = SimpleNamespace(run=str(run_dir), precise=4, precise_out=str(tmp_path / "p"), precise_no_measure=True,
                           candidates=100, seed=0)
    assert predictor_holdout.run_precise(args, trials, [study])["subnets_measured"] == 0  # plans, measures nothing
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    space = load_context(run_dir, SearchSettings(OBJECTIVES)).net.space
    keys = [_key(decode(space, p["params"]), p["params"]) for p in plan]
    assert len(set(keys)) == 4 and not set(keys) & {_key(decode(space, t.params), t.params) for t in trials}
    assert [p["kind"] for p in plan] == ["random", "proposed"] * 2

    calls = []
    measure_subsets = predictor_holdout.evaluate_arch_subsets

    def stopped_after_two(*a, **k):  # a kill after two subnets
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(a[1])
        return measure_subsets(*a, **k)

    monkeypatch.setattr(predictor_holdout, "evaluate_arch_subsets", stopped_after_two)
    args.precise_no_measure = False
    with pytest.raises(KeyboardInterrupt):
        predictor_holdout.run_precise(args, trials, [study])
    first = json.loads((tmp_path / "p" / "measured.json").read_text())
    assert len(first) == 2
    calls.clear()
    monkeypatch.setattr(predictor_holdout, "evaluate_arch_subsets", measure_subsets)
    args.precise_curve = True
    result = predictor_holdout.run_precise(args, trials, [study])
    measured = json.loads((tmp_path / "p" / "measured.json").read_text())
    assert result["subnets_measured"] == 4 and measured[:2] == first  # the first two kept, not measured again
    assert [(m["all"]["samples"], m["study"]["samples"], m["rest"]["samples"]) for m in measured] == [(60, 30, 30)] * 4
    scores = result["scores"]["all"]
    assert scores["subnets"] == 4 and set(scores["all"]) == {"mlp", "gbm", "ensemble", "own subset label"}
    assert all(np.isfinite(s["rmse"]) for s in scores["rest"].values())
    noise = scores["noise"]
    assert -1 <= noise["tau_ceiling"] <= 1 and -1 <= noise["tau_split_model"] <= 1
    assert noise["sd_whole_split"] == pytest.approx(noise["sd_study_subset"] / np.sqrt(2))  # 60 vs 30 images
    assert [c["trials"] for c in result["curve"]] == [8, 10]  # a quarter or half of 10 is below the 8 a fit needs
    assert result["curve"][-1]["ensemble"] == pytest.approx(scores["all"]["ensemble"]["tau"])  # the same fit
    assert "| all (4) | gbm |" in predictor_holdout.precise_table(result)

    args.precise = 5  # another plan's size: refused, nothing overwritten
    with pytest.raises(ConfigError, match="--precise 4"):
        predictor_holdout.run_precise(args, trials, [study])
    assert json.loads((tmp_path / "p" / "plan.json").read_text()) == plan


def test_label_noise_recovers_the_noise_and_the_true_spread_of_synthetic_labels():
    rng = np.random.default_rng(0)
    true = 0.9 + 0.01 * rng.standard_normal(2000)  # subnets' accuracies, SD 1 point
    c = 0.005 ** 2 * 2000  # noise SD 0.5 points on 2000 images

    measured = []
    for t in true:
        study, rest = t + rng.standard_normal() * np.sqrt(c / 2000), t + rng.standard_normal() * np.sqrt(c / 4000)
        measured.append({"study": {"accuracy": study, "samples": 2000}, "rest": {"accuracy": rest, "samples": 4000},
                         "all": {"accuracy": (study + 2 * rest) / 3, "samples": 6000}})
    noise = predictor_holdout.label_noise(measured)
    assert noise["sd_study_subset"] == pytest.approx(0.005, rel=0.05)
    assert noise["sd_whole_split"] == pytest.approx(0.005 / np.sqrt(3), rel=0.05)
    # Gaussian accuracies: Kendall τ = (2/π) arcsin(correlation); the labels on 6000 images against those
    # plus the noise once more, and the two subsets against each other
    whole = 0.01 ** 2 + c / 6000
    assert noise["tau_ceiling"] == pytest.approx(2 / np.pi * np.arcsin(whole / np.sqrt(whole * (whole + c / 6000))),
                                                 abs=0.02)
    split = whole / np.sqrt((whole + c / 2000) * (whole + c / 4000))  # the labels' own noise counted twice
    assert noise["tau_split_model"] == pytest.approx(2 / np.pi * np.arcsin(split), abs=0.02)
    measured_split = 0.01 ** 2 / np.sqrt((0.01 ** 2 + c / 2000) * (0.01 ** 2 + c / 4000))
    assert noise["tau_split"] == pytest.approx(2 / np.pi * np.arcsin(measured_split), abs=0.03)
