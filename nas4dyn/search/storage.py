"""Study storage: opening Optuna storages from a URL, resuming, and failing the trials of killed runs.

``--storage`` takes any Optuna RDB URL (``sqlite:///path.db``, ``postgresql://user:pw@host/db``, ...) or
``journal:PATH`` (Optuna's journal file storage, for file systems where SQLite locking is unreliable). The
default is ``sqlite:///SEARCH_DIR/study.db``. URLs are only ever shown with the password masked.

Every trial records its owner (host, process id, process start time). On start, RUNNING trials whose owner
process on this host is gone — a killed run — are marked FAILED, so they are not counted and the study
resumes; so are trials still without an owner after a grace period (a run killed between creating a trial and
recording its owner). Trials of live processes (another search on the same storage) are left alone. RDB
storages also keep Optuna's heartbeat, which fails stale trials of other hosts after the grace period.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState
import sqlalchemy
from sqlalchemy.exc import IntegrityError, OperationalError

from nas4dyn.errors import ConfigError

log = logging.getLogger(__name__)

OWNER_ATTR = "nas4dyn:owner"
SETTINGS_ATTR = "nas4dyn:settings"
JOURNAL_PREFIX = "journal:"
HEARTBEAT_S = 60
CREATE_ATTEMPTS = 5
OWNERLESS_GRACE_S = 10.0  # a trial's process records its owner within ms of creating it
SQLITE_TIMEOUT_S = 120  # processes sharing one SQLite file wait for its lock instead of failing
# user:password@ — the password runs to the last '@' (a password may hold '@'; over-masking is the safe side)
_PASSWORD = re.compile(r"(://[^:/@\s]*:)\S*@")


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (safe to log or print)."""
    return _PASSWORD.sub(r"\1***@", url)


def default_storage(out_dir: str | Path) -> str:
    return f"sqlite:///{Path(out_dir).resolve() / 'study.db'}"


def open_storage(url: str, heartbeat: bool = True) -> BaseStorage:
    """An Optuna storage for ``url`` (RDB: with Optuna's heartbeat, which only ``Study.optimize`` keeps — so
    not for the Ray backend, whose searcher asks and tells).

    Raises:
        ConfigError: malformed URL, missing database driver, or unreachable database (password masked).
    """
    if url.startswith(JOURNAL_PREFIX):
        path = Path(url[len(JOURNAL_PREFIX):].removeprefix("//"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:"):
        engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_S}
    attempt = 0
    while True:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeat_interval: stable since 2.9
                storage = RDBStorage(url, engine_kwargs=engine_kwargs,
                                     heartbeat_interval=HEARTBEAT_S if heartbeat else None)
            if url.startswith("sqlite:"):
                _begin_immediate(storage.engine)
            return storage
        except Exception as exc:  # sqlalchemy raises many types (ArgumentError, OperationalError, ImportError)
            # Processes that open a new database at once race to create its tables and version row (the loser
            # sees "already exists" or a UNIQUE violation); a retry finds them made.
            attempt += 1
            if isinstance(exc, (OperationalError, IntegrityError)) and attempt < CREATE_ATTEMPTS:
                time.sleep(0.5 * attempt)
                continue
            message = mask_url(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            raise ConfigError(f"--storage {mask_url(url)}: cannot open ({type(exc).__name__}: {message}); pass an "
                              "Optuna RDB URL such as sqlite:///study.db or journal:PATH") from None


def _begin_immediate(engine: Any) -> None:
    """Make every SQLite transaction take the write lock at its start (SQLAlchemy's recipe for pysqlite).
    pysqlite begins a transaction only at the first write, so Optuna's read-check-write of a trial's state can
    interleave between processes: two processes both saw an enqueued trial WAITING, both set it RUNNING and
    ran it, and the second one's result was refused ("Cannot tell a COMPLETE trial")."""
    @sqlalchemy.event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection: Any, _: Any) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself, below

    @sqlalchemy.event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened while Optuna created the tables predate the listeners


# ---- owners -------------------------------------------------------------------------------------------------
def _start_time(pid: int) -> Optional[str]:
    """The process start time (clock ticks since boot) from /proc, which tells a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def owner() -> dict[str, Any]:
    """This process, as recorded on the trials it runs."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid())}


def owner_alive(record: Any) -> Optional[bool]:
    """Whether the process in an owner record still runs (None: another host, or no record — unknown)."""
    if not isinstance(record, dict) or record.get("host") != socket.gethostname():
        return None
    pid = int(record.get("pid", -1))
    if pid <= 0:
        return None
    if record.get("start") is not None and Path("/proc").is_dir():
        return _start_time(pid) == record["start"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_orphaned_trials(study: optuna.Study, grace_s: float = OWNERLESS_GRACE_S) -> int:
    """Mark FAILED the RUNNING trials whose owner process on this host has died, and those that still have no
    owner after ``grace_s`` seconds; returns how many.

    A trial exists (RUNNING) a moment before its process records the owner: a run killed in that window leaves
    a trial without one. A live process records it within milliseconds, so a trial still ownerless after the
    grace period is orphaned (the wait happens only when such a trial is found).
    """
    def fail(trials: list[FrozenTrial]) -> int:
        failed = 0
        for trial in trials:
            try:
                failed += bool(study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL))
            except UpdateFinishedTrialError:
                pass  # another process finished or failed it first
        return failed

    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    failed = fail([t for t in running if owner_alive(t.user_attrs.get(OWNER_ATTR)) is False])
    ownerless = {t.number for t in running if OWNER_ATTR not in t.user_attrs}
    if ownerless:
        time.sleep(grace_s)
        failed += fail([t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                        if t.number in ownerless and OWNER_ATTR not in t.user_attrs])
    if failed:
        log.info("marked %d trial(s) of a killed run FAILED (not counted)", failed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # other hosts: heartbeat older than the grace period
    return failed


# ---- studies ------------------------------------------------------------------------------------------------
def open_study(storage: BaseStorage, name: str, directions: list[str], settings: dict[str, Any],
               url: str) -> tuple[optuna.Study, bool]:
    """Create the study or load it to resume; a study made with other objectives, constraints or space is
    refused rather than mixed. Also returns whether this call created it: of several processes starting on one
    storage exactly one did, so one-time set-up (enqueued trials) happens once.

    Raises:
        ConfigError: the stored study differs in what it optimises.
    """
    created = True
    try:
        study = optuna.create_study(storage=storage, study_name=name, directions=directions)
    except optuna.exceptions.DuplicatedStudyError:
        created = False
        study = optuna.load_study(storage=storage, study_name=name)
    except ValueError as exc:  # e.g. a direction Optuna does not know (a stored study's are checked below)
        raise ConfigError(f"--study {name} in {mask_url(url)}: {exc}; use another --study name") from None
    stored = study.user_attrs.get(SETTINGS_ATTR)
    if stored is None:
        study.set_user_attr(SETTINGS_ATTR, settings)
    elif stored != settings:
        diff = [f"{k} {stored.get(k)!r} (now {settings.get(k)!r})" for k in settings if stored.get(k) != settings.get(k)]
        raise ConfigError(f"--study {name} in {mask_url(url)} was created with {'; '.join(diff)}; rerun with the "
                          "same settings to resume, or pick another --study name")
    if [d.name.lower() for d in study.directions] != directions:
        raise ConfigError(f"--study {name}: stored directions differ from --objectives; use another --study name")
    return study, created


def count(study: optuna.Study, state: TrialState) -> int:
    return len(study.get_trials(deepcopy=False, states=(state,)))
