"""Search pieces: objectives and constraints, storage helpers (masked URLs, orphaned trials, enqueued trials
popped by concurrent processes), the encoding, calibration of exit thresholds and the hypervolume. Trials and the
command: tests/test_search.py."""
from __future__ import annotations

import multiprocessing
import subprocess
import sys
import threading
import time

import numpy as np
import optuna
import pytest

from nas4dyn.errors import ConfigError
from nas4dyn.search.calibrate import ExitOutcomes, calibrate
from nas4dyn.search.encoding import decode, suggest
from nas4dyn.search.outputs import hypervolume
from nas4dyn.search.objectives import Constraint, parse_constraint, parse_objectives
from nas4dyn.search.storage import OWNER_ATTR, fail_orphaned_trials, mask_url, open_storage, owner


# ---- parsing ------------------------------------------------------------------------------------------------
def test_objectives_and_constraints_parse():
    objs = parse_objectives("accuracy:max, macs_expected:min,latency_ms")
    assert [(o.metric, o.direction) for o in objs] == [("accuracy", "max"), ("macs_expected", "min"),
                                                       ("latency_ms", "min")]
    assert parse_constraint("latency_ms<=4") == Constraint("latency_ms", "<=", 4.0)
    assert parse_constraint(" macs_expected <= 2.5M ").bound == 2.5e6
    assert parse_constraint("accuracy>=0.8").violation(0.9) < 0 < parse_constraint("accuracy>=0.8").violation(0.7)
    for bad in ("accuracy:max", "accuracy:max,flops:min", "accuracy:up,macs_max:min", "accuracy,accuracy"):
        with pytest.raises(ConfigError):
            parse_objectives(bad)
    for bad in ("latency_ms<4", "speed<=3", "latency_ms<=fast"):
        with pytest.raises(ConfigError, match="--constraint"):
            parse_constraint(bad)


def test_storage_url_password_is_masked():
    assert mask_url("postgresql://bob:s3cret@db.example:5432/nas") == "postgresql://bob:***@db.example:5432/nas"
    assert mask_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    assert mask_url("mysql://bob:p@ss:w@rd@db:3306/nas?x=1") == "mysql://bob:***@db:3306/nas?x=1"
    assert mask_url("can't open postgresql://a:b@c@h/d (timeout) user@example") == \
        "can't open postgresql://a:***@h/d (timeout) user@example"
    with pytest.raises(ConfigError) as info:
        open_storage("postgresql+nosuchdriver://bob:s3cret@127.0.0.1:1/nas")
    assert "s3cret" not in str(info.value) and "***" in str(info.value)


def test_orphaned_trials_fail_and_live_ones_stay():
    study = optuna.create_study(directions=["maximize"])
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout.strip()
    trials = {name: study.ask() for name in ("live", "dead", "ownerless", "claimed_late")}
    trials["live"].set_user_attr(OWNER_ATTR, owner())
    trials["dead"].set_user_attr(OWNER_ATTR, {**owner(), "pid": int(dead_pid), "start": "0"})
    claimed = threading.Timer(0.1, trials["claimed_late"].set_user_attr, (OWNER_ATTR, owner()))
    claimed.start()  # its process records the owner during the grace period, as a live run does
    assert fail_orphaned_trials(study, grace_s=0.5) == 2
    claimed.join()
    failed = {t.number for t in study.get_trials(states=(optuna.trial.TrialState.FAIL,))}
    assert failed == {trials["dead"].number, trials["ownerless"].number}


def ask_enqueued(url: str, start: float, trials: int, out: "multiprocessing.Queue") -> None:
    """Worker of the test below: ask ``trials`` trials of study "race" once ``start`` comes."""
    study = optuna.load_study(study_name="race", storage=open_storage(url, heartbeat=False))
    while time.time() < start:
        pass
    out.put([study.ask().number for _ in range(trials)])


def test_processes_popping_enqueued_trials_never_share_one(tmp_path):
    """pysqlite's lazy BEGIN let two processes both pop one enqueued trial (both ran it; the second tell
    failed). Without BEGIN IMMEDIATE this run gave 29-33 distinct trials of 40."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    url = f"sqlite:///{tmp_path / 'race.db'}"
    study = optuna.create_study(study_name="race", storage=open_storage(url, heartbeat=False))
    for i in range(40):
        study.enqueue_trial({"x": float(i)}, skip_if_exists=False)
    ctx = multiprocessing.get_context("spawn")
    out, start = ctx.Queue(), time.time() + 8  # after every worker has started
    workers = [ctx.Process(target=ask_enqueued, args=(url, start, 10, out)) for _ in range(4)]
    for w in workers:
        w.start()
    asked = [n for _ in workers for n in out.get(timeout=120)]
    for w in workers:
        w.join()
    assert sorted(asked) == list(range(40))


# ---- encoding and calibration -------------------------------------------------------------------------------
def test_full_vector_encoding_decodes_every_suggestion(tiny_space):
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    names = None
    for _ in range(30):
        trial = study.ask()
        params = suggest(trial, tiny_space)
        arch = decode(tiny_space, params)  # validated against the space
        names = names or set(params)
        assert set(params) == names, "every trial suggests the same flat vector (NSGA-II needs it)"
        assert all(e.block < arch.depths[e.stage] for e in arch.exits)
        study.tell(trial, [0.0, 0.0])
    static = decode(tiny_space, suggest(study.ask(), tiny_space, static=True))
    assert not static.is_dynamic


def test_calibration_meets_limit_at_best_accuracy():
    rng = np.random.default_rng(0)
    n = 400
    conf = rng.random((n, 2))
    # Confident samples are more often right at the early exits; the final classifier is right more often.
    correct = np.stack([rng.random(n) < conf[:, 0], rng.random(n) < conf[:, 1], rng.random(n) < 0.9], 1)
    costs = {"macs_expected": np.tile(np.array([1.0, 2.0, 4.0]), (n, 1))}
    outcomes = ExitOutcomes(conf, correct, costs)
    limit = Constraint("macs_expected", "<=", 2.5)
    t = calibrate(outcomes, [limit])
    got = outcomes.evaluate(t[None, :])
    assert got["macs_expected"][0] <= 2.5
    # No threshold pair on a fine grid beats it under the same limit.
    grid = np.stack(np.meshgrid(*[np.unique(conf[:, k]) for k in range(2)], indexing="ij"), -1).reshape(-1, 2)
    every = outcomes.evaluate(grid[:: max(1, len(grid) // 20000)])
    best = every["accuracy"][every["macs_expected"] <= 2.5].max()
    assert got["accuracy"][0] >= best - 0.01
    assert calibrate(outcomes, [Constraint("macs_expected", "<=", 0.5)]).shape == (2,)  # infeasible: least violation


def test_hypervolume_is_normalised_by_the_reference_corners():
    objectives = parse_objectives("accuracy:max,macs_expected:min")
    ref = {"accuracy": 0.5, "macs_expected": 100.0}  # error of the smallest subnet, MACs of the largest
    points = [{"accuracy": 0.75, "macs_expected": 50.0}, {"accuracy": 0.6, "macs_expected": 10.0}]
    # Losses (0.5, 0.5) and (0.8, 0.1) against (1, 1): 0.25 + 0.18 - 0.1 overlap.
    assert hypervolume(points, objectives, ref) == pytest.approx(0.33)
    assert hypervolume(points + [{"accuracy": 0.4, "macs_expected": 1.0}], objectives, ref) == pytest.approx(0.33)
    assert hypervolume([], objectives, ref) == 0.0
