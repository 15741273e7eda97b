"""Predictor-driven search: the predictor fits and predicts on a tiny run, candidate costs agree with measured
trials, a killed predictor search resumes keeping every measured trial, and the Ray backend runs it."""
from __future__ import annotations

import numpy as np
import optuna
import pytest

from nas4dyn.cli.main import main
from nas4dyn.search import SearchConfig, run_search
from nas4dyn.errors import ConfigError
from nas4dyn.search.candidate_costs import CandidateCosts, fit_exit_shares
from nas4dyn.search.outputs import completed
from nas4dyn.search.predictor import Featurizer, Samples, SubnetPredictor, rates_of
from nas4dyn.search.predictor_features import cost_limit
from nas4dyn.search.predictor_strategy import (PREDICTED_ATTR, ROUND_ATTR, PredictorSettings, elites,
                                               query_candidates)
from nas4dyn.search.runner import default_objectives
from nas4dyn.search.trial import SearchSettings, load_context
from nas4dyn.search.objectives import parse_objectives
from search_spaces.arch import Arch
from tests.test_search import FAST, cli, kill_when, load, one_thread, run_dir, states  # noqa: F401 (fixtures)

PREDICTOR = ["--strategy", "predictor", "--warmup", "8", "--candidates", "200"]


def test_predictor_fits_predicts_and_costs_candidates_like_trials(run_dir, tmp_path):
    run_search(SearchConfig(run_dir=str(run_dir), out_dir=str(tmp_path), trials=14, sampler="random", seed=3,
                            bn_images=64, progress=False))
    trials = completed(load(tmp_path / "study.db"))
    ctx = load_context(run_dir, SearchSettings(parse_objectives("accuracy:max,macs_expected:min"), bn_images=64))
    costs = CandidateCosts(ctx.net)
    featurizer = Featurizer(ctx.net.space, costs)
    data = featurizer.samples(trials)
    predictor = SubnetPredictor("auto", epochs=150).fit(data)
    assert set(predictor.scores) == {"mlp", "gbm", "ensemble"} and predictor.chosen in predictor.scores
    assert all(-1.0 <= s["tau"] <= 1.0 and s["rmse"] >= 0 for s in predictor.scores.values())
    assert predictor.tau == predictor.scores[predictor.chosen]["tau"]

    archs = [Arch.from_dict(t.user_attrs["arch"]) for t in trials]
    pred = predictor.predict_x(data.x, data.exit_mask, data.gate_mask)
    ensemble = SubnetPredictor("ensemble", epochs=150).fit(data)
    assert set(ensemble.scores) == {"ensemble"} and ensemble.chosen == "ensemble"
    means = []
    for kind in ("mlp", "gbm", "ensemble"):  # one fit holds both models; the ensemble is their mean
        ensemble.chosen = kind
        means.append(ensemble.predict_x(data.x, data.exit_mask, data.gate_mask).accuracy)
    assert means[2] == pytest.approx(np.clip((means[0] + means[1]) / 2, 0, 1)) and not np.allclose(means[0], means[1])
    assert np.all((pred.accuracy >= 0) & (pred.accuracy <= 1))
    assert np.allclose(pred.exits.sum(1), 1.0, atol=1e-5) and np.all(pred.exits[~data.exit_mask] < 1e-6)
    assert np.all(pred.gates[~data.gate_mask] == 0) and np.all((pred.gates >= 0) & (pred.gates <= 1))
    on_target = 0
    for row, (t, arch) in enumerate(zip(trials, archs)):
        exits, gates = rates_of(featurizer, arch, pred, row, t.params["exit_budget"])
        assert len(exits) == len(arch.exits) + 1 and len(gates) == sum(b.gate != "none" for b in arch.blocks())
        assert sum(exits) == pytest.approx(1.0) and min(exits) >= 0
        if arch.exits:  # the shares move towards the predicted share of the budget's cost limit, never away
            per_exit = costs.exit_costs(arch, gates)["macs_expected"]
            target = pred.cost_share[row] * cost_limit(per_exit, t.params["exit_budget"])
            raw = pred.exits[row][data.exit_mask[row]]
            assert abs(np.dot(exits, per_exit) - target) <= abs(raw @ per_exit - target) + 1e-6 * target
            on_target += np.dot(exits, per_exit) == pytest.approx(target, rel=1e-9)
    assert on_target >= 1
    # Cost shares: measured expected MACs over the budget's limit, known exactly for the archs with exits.
    with_exits = np.array([bool(a.exits) for a in archs])
    assert np.all(np.isfinite(data.cost_share[with_exits])) and np.all(np.isnan(data.cost_share[~with_exits]))
    assert np.all((data.cost_share[with_exits] > 0) & (data.cost_share[with_exits] <= 1 + 1e-6))
    assert np.all((pred.cost_share > 0) & (pred.cost_share <= 1)) and np.all(pred.cost_share[~with_exits] == 1)
    base = Featurizer(ctx.net.space, costs, features="base")
    assert len(base.row(archs[0], 0.5)) < data.x.shape[1] == len(featurizer.row(ctx.net.space.min_arch(), 0.0))
    with pytest.raises(ConfigError, match="features"):
        Featurizer(ctx.net.space, costs, features="bogus")

    # Costs from rates: the full path exactly, and the expected MACs exactly where no gate makes them depend
    # on the per-sample correlation of gates and exits (the corners include the largest subnet with every exit).
    ungated = 0
    for t, arch in zip(trials, archs):
        m = t.user_attrs["metrics"]
        gate_rates = [m["gate_rates"][f"{b.stage}.{b.block}"] for b in arch.blocks() if b.gate != "none"]
        got = costs.metrics(arch, m["exit_rates"], gate_rates)
        # Expected cost is linear in the exit shares: the per-exit costs reproduce it.
        assert np.dot(m["exit_rates"], costs.exit_costs(arch, gate_rates)["macs_expected"]) == \
            pytest.approx(got["macs_expected"], rel=1e-9)
        assert got["macs_max"] == pytest.approx(m["macs_max"], rel=1e-9)
        if not gate_rates:
            ungated += bool(arch.exits)
            assert got["macs_expected"] == pytest.approx(m["macs_expected"], rel=1e-6)
    assert ungated >= 1
    traced = costs.traced
    assert [costs.macs_max(a) for a in archs] == pytest.approx([t.user_attrs["metrics"]["macs_max"] for t in trials])
    assert costs.traced == traced  # every piece is memoised now: no subnet is traced again

    # The candidate NSGA-II starts from the measured elites: the measured front first, then the next ranks.
    reference = {"accuracy": 1.0, "macs_expected": 2 * max(t.user_attrs["metrics"]["macs_expected"] for t in trials)}
    losses = [(1 - t.user_attrs["metrics"]["accuracy"], t.user_attrs["metrics"]["macs_expected"]) for t in trials]
    front = [t.params for t, a in zip(trials, losses)
             if not any(b[0] <= a[0] and b[1] <= a[1] and b != a for b in losses)]
    parents = elites(trials, ctx, reference, len(front) + 2)
    assert len(parents) == len(front) + 2 and all(p in front for p in parents[:len(front)])
    assert all(p in [t.params for t in trials] for p in parents)
    candidates = query_candidates(ctx, predictor, featurizer, costs, PredictorSettings(candidates=30, population=10),
                                  0, parents)
    first = min(len(parents), 10)  # the first generation: population 10
    assert len(candidates) == 30 and [c.params for c in candidates[:first]] == parents[:first]


def test_fit_exit_shares_meets_the_cost_target_within_valid_shares():
    shares, per_exit = [0.2, 0.3, 0.5], [1.0, 2.0, 4.0]
    fitted = fit_exit_shares(shares, per_exit, 2.5)
    assert fitted == pytest.approx([0.25, 0.375, 0.375]) and fitted @ per_exit == pytest.approx(2.5)
    assert fit_exit_shares(shares, per_exit, 0.5) == pytest.approx([0.4, 0.6, 0.0])  # as cheap as valid shares go
    assert fit_exit_shares(shares, per_exit, 9.0) == pytest.approx([0.0, 0.0, 1.0])  # nobody leaves early
    assert fit_exit_shares([0.0, 0.0, 1.0], per_exit, 2.5) @ np.asarray(per_exit) == pytest.approx(2.5)
    assert fit_exit_shares([1.0], [3.0], 1.0) == pytest.approx([1.0])  # no exit: nothing to move


def test_killed_predictor_search_resumes_keeping_every_measured_trial(run_dir, tmp_path):
    out = tmp_path / "s"
    proc = cli("search", "--run", str(run_dir), "--out", str(out), "--trials", "60", "--round-size", "4",
               "--seed", "1", *PREDICTOR, *FAST)
    # Past the warm-up, with predicted candidates still to measure.
    kill_when(proc, out / "study.db",
              lambda counts: counts.get("COMPLETE", 0) > 8 and counts.get("WAITING", 0) + counts.get("RUNNING", 0) >= 1,
              600)
    before = load(out / "study.db")
    done = {t.number for t in before.get_trials(states=(optuna.trial.TrialState.COMPLETE,))}
    pending = {t.number for t in before.get_trials(states=(optuna.trial.TrialState.WAITING,))}
    running = {t.number for t in before.get_trials(states=(optuna.trial.TrialState.RUNNING,))}
    assert any(k.startswith(ROUND_ATTR) for k in before.user_attrs)
    target = len(done) + len(pending) + 4
    assert main(["search", "--run", str(run_dir), "--out", str(out), "--trials", str(target), "--round-size", "4",
                 *PREDICTOR, *FAST]) == 0
    after = load(out / "study.db")
    complete = {t.number for t in after.get_trials(states=(optuna.trial.TrialState.COMPLETE,))}
    assert len(complete) == target and done | pending <= complete
    assert {t.number for t in after.get_trials(states=(optuna.trial.TrialState.FAIL,))} == running  # killed in flight
    predicted = [t for t in after.trials if PREDICTED_ATTR in t.user_attrs]
    assert len(predicted) >= 4 and all(t.state.name == "COMPLETE" or t.number in running for t in predicted)


def test_ray_backend_runs_the_predictor_strategy(run_dir, tmp_path):
    out = tmp_path / "ray"
    # The warm-up in this process (one Ray cluster start fewer), then a round whose candidates Ray measures.
    run_search(SearchConfig(run_dir=str(run_dir), out_dir=str(out), trials=8, strategy="predictor", warmup=8,
                            seed=0, bn_images=64, progress=False))
    proc = cli("search", "--run", str(run_dir), "--out", str(out), "--backend", "ray", "--workers", "2",
               "--trials", "10", "--round-size", "2", "--seed", "0", *PREDICTOR, *FAST)
    try:
        _, stderr = proc.communicate(timeout=900)  # a local Ray cluster: slow to start on a busy CPU
    finally:
        proc.kill()  # on a timeout, no search left behind
    assert proc.returncode == 0, stderr[-3000:]
    study = load(out / "study.db")
    assert states(study) == {"COMPLETE": 10}
    assert sum(PREDICTED_ATTR in t.user_attrs for t in study.trials) == 2


def test_default_objectives_are_latency_with_a_table_else_macs():
    assert default_objectives("lut.json") == "accuracy:max,latency_ms:min"
    assert default_objectives(None) == "accuracy:max,macs_expected:min"


def test_caution_lowers_accuracy_by_half_the_models_disagreement():
    rng = np.random.default_rng(0)
    n = 40
    x = rng.standard_normal((n, 5)).astype(np.float32)
    exit_mask = np.ones((n, 2), dtype=bool)  # one exit position and the final classifier
    exits = np.tile([0.4, 0.6], (n, 1))
    data = Samples(x, 0.8 + 0.05 * np.tanh(x[:, 0] + x[:, 1] * x[:, 2]), exits, exit_mask, np.zeros((n, 0)),
                   np.zeros((n, 0), dtype=bool), np.full(n, np.nan))
    plain, cautious = SubnetPredictor("gbm", epochs=60), SubnetPredictor("gbm", epochs=60, caution=1.0)
    plain._fit(data, "mlp")  # the MLP alone: without caution no LightGBM is fitted
    cautious._fit(data, "mlp")  # with it, LightGBM too: the disagreement needs both
    assert plain._gbm is None and cautious._gbm is not None
    got = {}
    for kind in ("mlp", "gbm", "ensemble"):
        cautious.chosen = kind
        cautious.caution = 0.0
        got[kind] = cautious.predict_x(x, exit_mask, data.gate_mask).accuracy
    assert np.array_equal(got["mlp"], plain.predict_x(x, exit_mask, data.gate_mask).accuracy)  # same seeds
    half_gap = np.abs(got["mlp"] - got["gbm"]) / 2
    assert half_gap.max() > 1e-4
    cautious.caution = 1.0
    for kind in ("mlp", "gbm", "ensemble"):
        cautious.chosen = kind
        lowered = cautious.predict_x(x, exit_mask, data.gate_mask).accuracy
        assert lowered == pytest.approx(np.clip(got[kind] - half_gap, 0, 1), abs=1e-6)
    assert lowered == pytest.approx(np.minimum(got["mlp"], got["gbm"]), abs=1e-6)  # the ensemble: the lower one


def test_negative_predictor_caution_is_refused_before_any_trial(run_dir, tmp_path, capsys):
    code = main(["search", "--run", str(run_dir), "--out", str(tmp_path / "s"), "--trials", "12", *PREDICTOR,
                 "--predictor-caution", "-1"])
    assert code == 2 and "--predictor-caution -1" in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_cautious_search_records_the_lower_rating_and_bench_refits_it(run_dir, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import bench_predictor

    run_search(SearchConfig(run_dir=str(run_dir), out_dir=str(tmp_path), trials=12, strategy="predictor", warmup=8,
                            round_size=4, candidates=200, predictor="ensemble", predictor_caution=1.0, seed=0,
                            bn_images=64, progress=False))
    ctx = load_context(run_dir, SearchSettings(parse_objectives("accuracy:max,macs_expected:min"), bn_images=64))
    featurizer = Featurizer(ctx.net.space, CandidateCosts(ctx.net))
    result = bench_predictor.optimism(featurizer, str(tmp_path / "study.db"), cautions=(0.0, 1.0))
    assert result["proposals"] == 4 and result["rounds"] == 1
    # The refit reproduces the search's fit: its ensemble at caution 1 (the lower of the two models) is what the
    # search recorded for each proposal.
    assert result["ensemble"][1]["bias"] == pytest.approx(result["recorded_bias"], abs=1e-9)
    assert result["ensemble"][1]["bias"] <= result["ensemble"][0]["bias"]
