"""Search: trials against the cost model, the CLI contract, resuming after a kill, concurrent processes on one
storage, and the Ray backend. Tiny space, synthetic data, untrained net. Objectives, storage helpers, encoding,
calibration and hypervolume: tests/test_search_pieces.py."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import optuna
import pytest
import torch

import nas4dyn
from nas4dyn.api import save_supernet
from nas4dyn.cli.main import main
from nas4dyn.cost.macs import count_macs
from nas4dyn.data import load_data
from nas4dyn.search import SearchConfig, run_search
from nas4dyn.search.encoding import decode, suggest
from nas4dyn.search.outputs import completed as completed_trials
from nas4dyn.search.objectives import parse_objectives
from nas4dyn.search.storage import SETTINGS_ATTR, open_storage, open_study
from nas4dyn.search.trial import SearchSettings, cheapest_costs, evaluate_arch, load_context
from tests.conftest import make_decisive

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--bn-images", "64", "--threads", "1", "--no-progress"]  # synthetic data: 60 validation images per trial


@pytest.fixture(autouse=True)
def one_thread():
    """Trials of the tiny space run fastest on one thread on a shared CPU (the CLI's default too)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("search") / "run"
    torch.manual_seed(0)
    net = make_decisive(nas4dyn.build_supernet("tiny"))  # gates and exits take varied decisions
    save_supernet(root / "supernet.pt", net, load_data("synthetic").info.to_dict())
    return root


@pytest.fixture(scope="module")
def lut(run_dir: Path) -> Path:
    """A quick (rough) latency table of the tiny space."""
    path = run_dir.parent / "lut.json"
    assert main(["profile", "--space", "tiny", "--out", str(path), "--repeats", "3", "--calibrate", "6"]) == 0
    return path


def load(path: Path, name: str = "search") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{path}")


def states(study: optuna.Study) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def db_states(path: Path) -> dict[str, int]:
    """Trial states read straight from SQLite: opening an Optuna storage on a database that another process is
    still creating races with its schema creation. A short lock timeout: the writer may be stopped (SIGSTOP)
    holding the lock, and the caller simply looks again."""
    if not path.exists():
        return {}
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.2) as db:
        try:
            return dict(db.execute("SELECT state, COUNT(*) FROM trials GROUP BY state").fetchall())
        except sqlite3.OperationalError:  # tables not created yet, or locked by the stopped writer
            return {}


def cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "nas4dyn", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def kill_when(proc: subprocess.Popen, db: Path, ready: Callable[[dict[str, int]], bool], seconds: float) -> None:
    """SIGKILL ``proc`` once the trial states in ``db`` satisfy ``ready``; the process is frozen (SIGSTOP) while
    they are read, so a trial seen in flight still is when it dies."""
    try:
        deadline = time.time() + seconds
        while time.time() < deadline:
            time.sleep(0.3)
            proc.send_signal(signal.SIGSTOP)
            if ready(db_states(db)):
                break
            proc.send_signal(signal.SIGCONT)
        else:
            pytest.fail(f"the states never got ready: {proc.poll()} {proc.stderr.read() if proc.poll() else ''}")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()


# ---- trials -------------------------------------------------------------------------------------------------
def test_trial_costs_agree_with_the_cost_model(run_dir, tiny_space):
    settings = SearchSettings(parse_objectives("accuracy:max,macs_expected:min"), bn_images=64)
    ctx = load_context(run_dir, settings)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    checked = 0
    while checked < 2:
        arch = decode(tiny_space, suggest(study.ask(), tiny_space))
        if not arch.exits:
            continue
        result = evaluate_arch(ctx, arch, ctx.val_batches, exit_budget=0.5)
        tuned = result.arch
        assert [e.threshold for e in tuned.exits] == result.metrics["thresholds"]
        report = count_macs(ctx.net, tuned, ctx.val_batches)
        assert result.metrics["macs_expected"] == pytest.approx(report.macs_expected, rel=1e-9)
        assert result.metrics["macs_max"] == report.macs_max
        assert result.metrics["exit_rates"] == pytest.approx(report.exit_rates)
        ctx.net.set_active(tuned)
        with torch.no_grad():
            hits = sum(int((ctx.net(x).argmax(1) == y).sum()) for x, y in ctx.val_batches)
        assert result.metrics["accuracy"] == pytest.approx(hits / result.metrics["samples"])
        checked += 1



# ---- the command --------------------------------------------------------------------------------------------
def test_search_writes_outputs_and_front_honours_constraint(run_dir, tmp_path, capsys):
    out = tmp_path / "s"
    code = main(["search", "--run", str(run_dir), "--out", str(out), "--trials", "10", "--seed", "0",
                 "--constraint", "macs_expected<=150k", *FAST])
    assert code == 0
    printed = capsys.readouterr().out
    assert "hypervolume" in printed and "10 completed" in printed
    front = json.loads((out / "pareto.json").read_text())
    assert front, "some subnet meets the constraint"
    for entry in front:
        arch = nas4dyn.Arch.from_dict(entry["arch"])
        nas4dyn.load_space("tiny").validate(arch)
        m = entry["metrics"]
        assert 0.0 <= m["accuracy"] <= 1.0 and m["macs_expected"] <= 150e3
        assert {"macs_max", "macs_expected", "exit_rates", "gate_rates", "thresholds"} <= set(m)
        assert [e.threshold for e in arch.exits] == m["thresholds"]
    rows = (out / "trials.csv").read_text().strip().splitlines()
    assert len(rows) == 11 and rows[0].startswith("number,state")
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    study = load(out / "study.db")
    assert states(study) == {"COMPLETE": 10}
    # A fresh study starts from the space's corners: the largest and smallest static subnets, then the largest
    # with every exit; a rerun does not enqueue them again.
    space = nas4dyn.load_space("tiny")
    first = [decode(space, t.params) for t in study.trials[:3]]
    assert first[0] == space.max_arch() and first[1] == space.min_arch()
    assert first[2].without_dynamic() == space.max_arch() and len(first[2].exits) == len(space.exits.positions)
    # Rerunning with a larger target continues the same study.
    assert main(["search", "--run", str(run_dir), "--out", str(out), "--trials", "11", "--seed", "0",
                 "--constraint", "macs_expected<=150k", *FAST]) == 0
    again = load(out / "study.db")
    assert states(again) == {"COMPLETE": 11}
    assert sum("fixed_params" in t.system_attrs for t in again.trials) == 3  # Optuna's mark of enqueued trials
    # ...but not with other objectives.
    assert main(["search", "--run", str(run_dir), "--out", str(out), "--trials", "11",
                 "--objectives", "accuracy:max,macs_max:min", *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "was created with" in err


def test_latency_objective_and_constraint(run_dir, lut, tmp_path, capsys):
    settings = SearchSettings(parse_objectives("accuracy:max,latency_ms:min"), bn_images=64)
    ctx = load_context(run_dir, settings, latency_table=str(lut))
    probe = evaluate_arch(ctx, ctx.net.space.max_arch(), ctx.val_batches)
    bound = 0.8 * probe.metrics["latency_ms"]  # below the largest subnet, above the smallest
    args = ["search", "--run", str(run_dir), "--out", str(tmp_path), "--trials", "5", "--seed", "2",
            "--objectives", "accuracy:max,latency_ms:min,macs_expected:min", "--latency-table", str(lut),
            "--constraint", f"latency_ms<={bound}", *FAST]
    assert main(args) == 0
    study = load(tmp_path / "study.db")
    for entry in json.loads((tmp_path / "pareto.json").read_text()):
        assert entry["metrics"]["latency_ms"] <= bound
        assert entry["metrics"]["latency_ms_max"] >= entry["metrics"]["latency_ms"] * 0.999
    # The trial's expected latency is the latency model's, for the calibrated arch.
    trial = completed_trials(study)[0]
    tuned = nas4dyn.Arch.from_dict(trial.user_attrs["arch"])
    evaluate_arch(ctx, tuned, ctx.val_batches)  # recalibrates BN for it, as the trial did
    expected = ctx.latency.predict_expected(ctx.net, tuned, ctx.val_batches)
    assert trial.user_attrs["metrics"]["latency_ms"] == pytest.approx(expected, rel=1e-6)
    assert "latency_ms" in (tmp_path / "trials.csv").read_text().splitlines()[0]
    capsys.readouterr()
    floor = cheapest_costs(ctx)["latency_ms"]
    args[args.index("--constraint") + 1] = f"latency_ms<={floor - 0.5 * abs(floor) - 1e-6}"
    assert main(args[:1] + ["--study", "other"] + args[1:]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no subnet can meet it" in err


def test_a_table_of_another_version_of_the_space_is_refused(run_dir, lut, tmp_path, capsys):
    table = json.loads(lut.read_text())
    table["space"]["exits"]["hidden"] += 8  # same name, same entry keys, other exit heads timed
    edited = tmp_path / "edited_lut.json"
    edited.write_text(json.dumps(table))
    out = tmp_path / "s"
    assert main(["search", "--run", str(run_dir), "--out", str(out), "--trials", "2", "--latency-table",
                 str(edited), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another version of space 'tiny'" in err, err
    assert not (out / "study.db").exists()


def test_search_takes_a_table_of_either_runtime_with_every_gate_kind(run_dir, lut, tmp_path, capsys):
    data = json.loads(lut.read_text())
    import onnxruntime

    # search only predicts: the runtime does not matter to it
    data["fingerprint"] = {**{k: v for k, v in data["fingerprint"].items() if k != "torch"}, "runtime": "onnxruntime",
                           "onnxruntime": onnxruntime.__version__}
    (tmp_path / "ort.json").write_text(json.dumps(data))
    settings = SearchSettings(parse_objectives("accuracy:max,latency_ms:min"), bn_images=0)
    assert load_context(run_dir, settings, latency_table=str(tmp_path / "ort.json")).latency.table.runtime == "onnxruntime"
    # As an onnxruntime profile of tiny makes it: no MBConv channel-gate entries (no ONNX translation).
    data["entries"] = [e for e in data["entries"] if not (e["part"] == "block" and e["stage"] == 1
                                                         and e["gate"] == "channel")]
    (tmp_path / "ort_partial.json").write_text(json.dumps(data))
    assert main(["search", "--run", str(run_dir), "--out", str(tmp_path / "s"), "--trials", "3", "--latency-table",
                 str(tmp_path / "ort_partial.json"), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no entries for stage 1: gate 'channel'" in err, err
    assert not (tmp_path / "s" / "study.db").exists()


def test_bad_input_is_one_line_exit_2_before_any_trial(run_dir, tmp_path, capsys):
    cases = [
        (["--constraint", "macs_expected<=1000"], "no subnet can meet it"),
        (["--objectives", "accuracy:max,latency_ms:min"], "--latency-table"),
        (["--constraint", "latency_ms<<4"], "--constraint"),
        (["--workers", "2"], "--backend ray"),
        (["--trials", "0"], "--trials 0: must be 1 or more"),
    ]
    for extra, needle in cases:
        out = tmp_path / "bad"
        assert main(["search", "--run", str(run_dir), "--out", str(out), "--trials", "3", *extra, *FAST]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
        assert not (out / "study.db").exists()
    (tmp_path / "file").write_text("")
    assert main(["search", "--run", str(run_dir), "--out", str(tmp_path / "file" / "s"), *FAST]) == 2
    assert "is a file" in capsys.readouterr().err


def test_search_without_feasible_trial_names_the_constraint(run_dir, tmp_path, capsys):
    out = tmp_path / "infeasible"
    argv = ["search", "--run", str(run_dir), "--out", str(out), "--trials", "2", "--constraint", "accuracy>=0.99",
            *FAST]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "no feasible subnet among 2 completed trials: accuracy>=0.99 removed 2" in err[0], err
    assert json.loads((out / "pareto.json").read_text()) == [] and (out / "trials.csv").is_file()


def test_a_study_refuses_trials_of_another_supernet(run_dir, tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    assert main(["search", "--run", str(run_dir), "--out", str(tmp_path / "a"), "--storage", storage, "--trials", "1",
                 "--sampler", "random", *FAST]) == 0
    other = tmp_path / "other-run"
    torch.manual_seed(1)
    save_supernet(other / "supernet.pt", make_decisive(nas4dyn.build_supernet("tiny"), seed=1),
                  load_data("synthetic").info.to_dict())
    capsys.readouterr()
    assert main(["search", "--run", str(other), "--out", str(tmp_path / "b"), "--storage", storage, "--trials", "2",
                 "--sampler", "random", *FAST]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "supernet_sha256" in err[0] and "another --study" in err[0], err
    assert states(load(tmp_path / "study.db")) == {"COMPLETE": 1, "WAITING": 2}  # 2 corners still queued
    assert not (tmp_path / "b" / "pareto.json").exists()


def test_killed_run_resumes_and_its_running_trial_fails(run_dir, tmp_path):
    out = tmp_path / "s"
    proc = cli("search", "--run", str(run_dir), "--out", str(out), "--trials", "40", "--seed", "1", *FAST)
    kill_when(proc, out / "study.db", lambda counts: counts.get("COMPLETE", 0) >= 2 and counts.get("RUNNING", 0) == 1,
              150)
    before = load(out / "study.db")
    done = [t.number for t in before.get_trials(states=(optuna.trial.TrialState.COMPLETE,))]
    running = [t.number for t in before.get_trials(states=(optuna.trial.TrialState.RUNNING,))]
    assert running, "a trial was in flight when the run was killed"
    target = len(done) + 2
    assert main(["search", "--run", str(run_dir), "--out", str(out), "--trials", str(target), *FAST]) == 0
    after = load(out / "study.db")
    complete = [t.number for t in after.get_trials(states=(optuna.trial.TrialState.COMPLETE,))]
    assert len(complete) == target and set(done) <= set(complete)
    assert {t.number for t in after.get_trials(states=(optuna.trial.TrialState.FAIL,))} == set(running)
    assert not after.get_trials(states=(optuna.trial.TrialState.RUNNING,))


def test_two_processes_on_one_storage_lose_no_trials(run_dir, tmp_path):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    args = ["search", "--run", str(run_dir), "--storage", storage, "--trials", "4", "--sampler", "random", *FAST]
    procs = [cli(*args, "--out", str(tmp_path / f"p{i}")) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    study = load(tmp_path / "shared.db")
    counts = states(study)
    assert set(counts) == {"COMPLETE"} and counts["COMPLETE"] >= 4
    assert sorted(t.number for t in study.trials) == list(range(len(study.trials)))
    assert sum("fixed_params" in t.system_attrs for t in study.trials) == 3  # the creator alone enqueued corners
    directions = [d.name.lower() for d in study.directions]
    _, created = open_study(open_storage(storage), study.study_name, directions, study.user_attrs[SETTINGS_ATTR],
                            storage)
    assert not created


def test_journal_storage_and_static_search(run_dir, tmp_path):
    summary = run_search(SearchConfig(run_dir=str(run_dir), out_dir=str(tmp_path), trials=3, sampler="tpe",
                                      storage=f"journal:{tmp_path / 'journal.log'}", static=True, bn_images=64,
                                      progress=False))
    assert summary.complete == 3 and (tmp_path / "journal.log").stat().st_size > 0
    for entry in json.loads((tmp_path / "pareto.json").read_text()):
        assert not nas4dyn.Arch.from_dict(entry["arch"]).is_dynamic


def test_ray_backend_two_local_workers(run_dir, tmp_path):
    out = tmp_path / "ray"
    proc = cli("search", "--run", str(run_dir), "--out", str(out), "--backend", "ray", "--workers", "2",
               "--trials", "4", "--seed", "0", *FAST)
    stdout, stderr = proc.communicate(timeout=400)
    assert proc.returncode == 0, stderr[-3000:]
    assert "4 completed" in stdout
    assert states(load(out / "study.db")) == {"COMPLETE": 4}
    front = json.loads((out / "pareto.json").read_text())
    assert front and all("accuracy" in e["metrics"] for e in front)
    assert (out / "trials.csv").exists() and (out / "pareto.png").exists()
