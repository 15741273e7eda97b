"""Ray Tune backend: the same trial function under ``tune.Tuner`` with ``OptunaSearch``, K trials at a time.

The Optuna study (sampler, storage, constraints) lives in the driver; Ray runs each trial in a worker with the
:class:`TrialContext` shipped once through the object store (so a cluster needs no shared file system). A
local cluster gets ``K`` CPUs, no dashboard, a small object store, and listens on 127.0.0.1 only (GCS, raylet,
workers, agents). Ray's session files and Tune's experiment state go to a private (0700) temporary directory
that is removed on every exit, SIGTERM included; Tune's pickled state never holds the Optuna storage (whose URL
may carry a password). ``--ray-address`` joins an existing cluster instead: its processes listen where that
cluster was started to listen, and the trial context (weights, validation batches) travels through its object
store.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import shutil
import signal
import tempfile
import threading
from typing import Any, Iterator, Optional

import optuna
import ray
import ray._private.ray_constants as ray_constants
import torch
from ray import tune
from ray.tune.search.optuna import OptunaSearch
from optuna.storages import BaseStorage
from optuna.trial import TrialState

from nas4dyn.errors import ConfigError, Nas4dynError
from nas4dyn.search.encoding import suggest
from nas4dyn.search.optuna_backend import TrialCallback, record
from nas4dyn.search.storage import OWNER_ATTR, count, owner
from nas4dyn.search.trial import SearchSettings, TrialContext, TrialResult, run_trial
from search_spaces.arch import Arch
from search_spaces.space import SearchSpace

log = logging.getLogger(__name__)

OBJECT_STORE_BYTES = 128 * 1024**2  # the context (weights, cached batches) plus headroom; Ray spills beyond
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's node IP is 127.0.0.1 (see _loopback_only)
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _context_bytes(ctx: TrialContext) -> int:
    tensors = [t for batch in ctx.bn_batches + ctx.val_batches for t in batch]
    tensors += list(ctx.net.state_dict().values())
    return sum(t.numel() * t.element_size() for t in tensors)


class RecordingSearch(OptunaSearch):
    """OptunaSearch that stores arch, metrics and constraints on the Optuna trial before telling it (plain
    OptunaSearch only tells the objective values)."""

    def __init__(self, settings: SearchSettings, **kwargs: Any):
        self.settings = settings
        super().__init__(**kwargs)

    # Live Optuna objects: Optuna 5.1+ samplers and studies hold thread locks and do not pickle; the storage
    # would carry its URL (password included) into Tune's state files.
    LIVE = ("_sampler", "_ot_study", "_ot_trials", "_storage")

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its searcher into the experiment directory (at start, and in save() at its checkpoints)
        # for Tuner.restore; nas4dyn resumes from the Optuna storage instead, so the copies leave them out.
        return {k: v for k, v in self.__dict__.items() if k not in self.LIVE}

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__getstate__(), f)

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        if result and not error and "nas4dyn_metrics" in result and trial_id in self._ot_trials:
            done = TrialResult(Arch.from_dict(json.loads(result["nas4dyn_arch"])), json.loads(result["nas4dyn_metrics"]))
            record(self._ot_trials[trial_id], done, self.settings)
        super().on_trial_complete(trial_id, result, error)


class DefineByRun:
    """OptunaSearch's search space: the same suggestions as the Optuna backend, owned by the driver. A class,
    not a closure, because Tune pickles the searcher when it checkpoints the experiment."""

    def __init__(self, space: SearchSpace, static: bool):
        self.space, self.static = space, static

    def __call__(self, trial: Any) -> None:
        trial.set_user_attr(OWNER_ATTR, owner())
        suggest(trial, self.space, self.static)


class Progress(tune.Callback):
    """Reports every finished Ray trial to the driver's progress bar."""

    def __init__(self, study: optuna.Study, on_trial: Optional[TrialCallback]):
        self.study, self.on_trial = study, on_trial

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks into the experiment directory (for Tuner.restore; nas4dyn resumes from the
        # Optuna study instead), and neither the progress bar nor a live study pickles: the copy reports nothing.
        return {"study": None, "on_trial": None}

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.on_trial is not None:
            self.on_trial(self.study)


def _trainable(config: dict[str, Any], ctx: TrialContext, threads: int) -> dict[str, Any]:
    """One Ray trial: the Optuna parameters in ``config`` -> metrics (objectives top level for the searcher)."""
    torch.set_num_threads(threads)
    result = run_trial(ctx, config)
    metrics = {o.metric: float(result.metrics[o.metric]) for o in ctx.settings.objectives}
    # JSON strings: Tune flattens nested dicts before the searcher sees them.
    return {**metrics, "nas4dyn_arch": json.dumps(result.arch.to_dict()), "nas4dyn_metrics": json.dumps(result.metrics)}


def run_ray(study: optuna.Study, storage: BaseStorage, ctx: TrialContext, target: int, workers: int,
            address: Optional[str] = None, on_trial: Optional[TrialCallback] = None) -> None:
    """Run trials on Ray until ``study`` (kept in ``storage``) holds ``target`` completed trials.

    Raises:
        ConfigError: Ray cannot start or reach ``address``.
        Nas4dynError: a round of trials completed none (the first error is shown).
    """
    private = _private_dir()
    try:
        with _terminated_as_exit(), _loopback_only(address is None):
            _run_rounds(study, storage, ctx, target, workers, address, on_trial, private)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(private, ignore_errors=True)


def _run_rounds(study: optuna.Study, storage: BaseStorage, ctx: TrialContext, target: int, workers: int,
                address: Optional[str], on_trial: Optional[TrialCallback], private: str) -> None:
    settings = ctx.settings
    _init_ray(workers, address, None if address else os.path.join(private, "r"), _context_bytes(ctx))
    _catch_sigterm()
    trainable = tune.with_resources(tune.with_parameters(_trainable, ctx=ctx, threads=1), {"cpu": 1})
    while (done := count(study, TrialState.COMPLETE)) < target:
        searcher = RecordingSearch(
            settings,
            space=DefineByRun(ctx.net.space, settings.static),
            metric=[o.metric for o in settings.objectives],
            mode=[o.direction for o in settings.objectives],
            sampler=study.sampler,
            study_name=study.study_name,
            storage=storage,
        )
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=target - done,
                                        max_concurrent_trials=workers),
            run_config=tune.RunConfig(storage_path=os.path.join(private, "tune"), name="nas4dyn",
                                      verbose=0, callbacks=[Progress(study, on_trial)]),
        )
        console = io.StringIO()
        with contextlib.redirect_stdout(console):  # Tune prints its own tables; our bar is on stderr
            grid = tuner.fit()
        log.debug("Ray Tune output:\n%s", console.getvalue())
        if count(study, TrialState.COMPLETE) == done:
            first = next(iter(grid.errors), None)
            raise Nas4dynError(f"no Ray trial of the last {target - done} completed"
                               + (f": {str(first).splitlines()[-1]}" if first else ""))


def _private_dir() -> str:
    """A new 0700 temporary directory (Ray makes its own folder inside world-writable, which the private parent
    keeps to this user). Ray's Unix socket paths (``.../session_<date>_<pid>/sockets/plasma_store``) must fit
    107 bytes, so a long TMPDIR gives way to /tmp."""
    base = tempfile.gettempdir()
    if len(base) > 20 and os.path.isdir("/tmp"):
        base = "/tmp"
    return tempfile.mkdtemp(prefix="nas4dyn-ray-", dir=base)


def _exit_on_sigterm(signum: int, _: Any) -> None:
    raise SystemExit(128 + signum)


def _catch_sigterm() -> None:
    """Make SIGTERM raise SystemExit (main thread only: Python runs signal handlers there). Called again after
    ``ray.init``, whose core worker installs its own crash handler for SIGTERM (it logs and aborts)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)


@contextlib.contextmanager
def _terminated_as_exit() -> Iterator[None]:
    """SIGTERM raises SystemExit(143) while inside, so the ``finally`` blocks shut Ray down and remove the
    temporary directory (the default action would kill this process and orphan them)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    _catch_sigterm()
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _loopback_only(local: bool) -> Iterator[None]:
    """A local cluster listens on 127.0.0.1 only. Ray picks the node IP once per process: a "cluster-enabled"
    node takes its outward address (and ``_node_ip_address="127.0.0.1"`` is turned back into it), and its gRPC
    servers then listen on every interface. Ray's own switch for single-machine use (what it does on macOS and
    Windows) makes the node IP 127.0.0.1 and the servers bind to it; set here for this process and, through the
    environment, for the processes Ray starts; both restored afterwards."""
    if not local:
        yield
        return
    saved_env = os.environ.get(SINGLE_MACHINE_ENV)
    saved_flag = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[SINGLE_MACHINE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False  # read when ray.init picks the node IP; _init_ray checks the result
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(SINGLE_MACHINE_ENV, None)
        else:
            os.environ[SINGLE_MACHINE_ENV] = saved_env


def _init_ray(workers: int, address: Optional[str], temp_dir: Optional[str], context_bytes: int) -> None:
    try:
        if address:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
            return
        ray.init(
            num_cpus=workers,
            include_dashboard=False,  # a Ray dashboard executes code sent to it: never expose one
            object_store_memory=max(OBJECT_STORE_BYTES, 3 * context_bytes),
            _temp_dir=temp_dir,
            log_to_driver=False,
            configure_logging=False,
        )
    except Exception as exc:  # ConnectionError, RuntimeError, ValueError depending on what failed
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
        raise ConfigError(f"cannot start {where} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                          ) from None
    node_ip = ray.util.get_node_ip_address()
    if node_ip not in LOOPBACK:  # a Ray version that ignores the switch of _loopback_only: refuse to expose it
        ray.shutdown()
        raise ConfigError(f"the local Ray cluster came up on {node_ip}, not on loopback, so it would listen beyond "
                          "this machine; use --backend optuna, or --ray-address with a cluster you secured")
