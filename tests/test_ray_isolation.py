"""The Ray backend keeps to itself: a local cluster listens on loopback only, Tune's saved state holds no storage
URL, and SIGTERM leaves no process or temporary folder behind."""
from __future__ import annotations

import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

import nas4dyn
from nas4dyn.search.objectives import parse_objectives
from nas4dyn.search.storage import open_storage
from nas4dyn.search.trial import SearchSettings
from tests.test_search import FAST, ROOT, db_states, run_dir  # noqa: F401 - run_dir is a fixture
def process_tree(root: int) -> set[int]:
    """``root`` and its descendants, from /proc."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, ppid = int(stat.parent.name), int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(pid)
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        tree.add(pid)
        todo += parents.get(pid, [])
    return tree


def _address(hex_address: str) -> str:
    host = hex_address.split(":")[0]
    if len(host) == 8:
        return socket.inet_ntop(socket.AF_INET, bytes.fromhex(host)[::-1])
    words = b"".join(bytes.fromhex(host[i:i + 8])[::-1] for i in range(0, 32, 8))  # /proc: 4 host-order words
    return socket.inet_ntop(socket.AF_INET6, words)


def listening_addresses(pids: set[int]) -> dict[str, set[int]]:
    """Address -> pids, of every TCP socket in LISTEN state (/proc/net/tcp{,6}) that one of ``pids`` holds."""
    owner_of = {}
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                owner_of[target[8:-1]] = pid
    found: dict[str, set[int]] = {}
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in owner_of:  # 0A: LISTEN
                found.setdefault(_address(fields[1]), set()).add(owner_of[fields[9]])
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_ray_listens_on_loopback_only_keeps_the_url_out_of_tune_and_cleans_up_on_sigterm(run_dir, tmp_path,
                                                                                          request):
    temp = Path(tempfile.mkdtemp(prefix="t", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    request.addfinalizer(lambda: shutil.rmtree(temp, ignore_errors=True))
    db = tmp_path / "secret-study-name.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(temp)}
    proc = subprocess.Popen([sys.executable, "-m", "nas4dyn", "search", "--run", str(run_dir), "--out",
                             str(tmp_path / "out"), "--storage", f"sqlite:///{db}", "--backend", "ray", "--trials",
                             "200", *FAST], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while db_states(db).get("COMPLETE", 0) < 1:  # Ray, Tune and a worker are up once a trial completed
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "timeout"
            time.sleep(0.5)
        tree = process_tree(proc.pid)
        sockets = listening_addresses(tree)
        private = [(p.name, p.stat().st_mode & 0o777) for p in temp.glob("nas4dyn-ray-*")]
        pickles = {}
        for path in temp.rglob("*.pkl"):  # Tune's searcher state, tuner.pkl, experiment state
            try:
                pickles[path.name] = path.read_bytes()
            except FileNotFoundError:  # a temp file Tune renamed meanwhile
                pass
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert len(tree) >= 4 and sockets, (tree, sockets)  # driver, GCS, raylet, worker(s)
    assert set(sockets) <= {"127.0.0.1", "::1", "::ffff:127.0.0.1"}, sockets
    assert len(private) == 1 and private[0][1] == 0o700, private
    assert any(name.startswith("searcher-state") for name in pickles), list(pickles)
    assert not [name for name, blob in pickles.items() if b"secret-study-name" in blob]
    # 143: our handler's SystemExit. 1: once in a loaded full-suite run Ray's own head-node handler (kill its
    # processes, sys.exit(1)) took the signal; either exit unwinds through run_ray's finally. Killed by the signal
    # (-15) or aborted by Ray's crash handler (-6) would leave the folder behind and fail here.
    assert proc.returncode in (143, 1), stderr[-2000:]
    assert not list(temp.iterdir())  # the private folder is gone
    deadline = time.time() + 30
    while [pid for pid in tree if alive(pid)] and time.time() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in tree if alive(pid)]


def test_tune_state_never_pickles_the_storage(run_dir, tmp_path):
    """What Tune writes to disk of the searcher (its pickle, and save()) holds no storage and no URL."""
    from nas4dyn.search.ray_backend import DefineByRun, RecordingSearch

    url = f"sqlite:///{tmp_path / 'pw-SENTINEL.db'}"
    storage = open_storage(url, heartbeat=False)
    settings = SearchSettings(objectives=parse_objectives("accuracy:max,macs_expected:min"))
    study = optuna.create_study(storage=storage, study_name="s", directions=["maximize", "minimize"])
    searcher = RecordingSearch(settings, space=DefineByRun(nas4dyn.load_space("tiny"), False),
                               metric=["accuracy", "macs_expected"], mode=["max", "min"],
                               sampler=optuna.samplers.RandomSampler(), study_name="s", storage=storage)
    assert searcher._storage is storage and study.study_name == "s"
    searcher.save(str(tmp_path / "searcher.pkl"))
    for blob in (pickle.dumps(searcher), (tmp_path / "searcher.pkl").read_bytes()):
        assert b"SENTINEL" not in blob and b"RDBStorage" not in blob
