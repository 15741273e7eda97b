"""Ray Tune backend: the same trial function under ``tune.Tuner`` with ``OptunaSearch``, K trials at a time.

The Optuna study (sampler, storage, constraints) lives in the driver; Ray runs each trial in a worker with the
:class:`TrialContext` shipped once through the object store (so a cluster needs no shared file system). A
local cluster gets ``K`` CPUs, no dashboard, a small object store and a private temporary directory that is
removed afterwards; ``--ray-address`` joins an existing cluster instead.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import pickle
import shutil
import tempfile
from typing import Any, Optional

import optuna
import ray
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

    # Live Optuna objects: Optuna 5.1+ samplers and studies hold thread locks and do not pickle.
    LIVE = ("_sampler", "_ot_study", "_ot_trials")

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
    settings = ctx.settings
    temp_dir = None if address else tempfile.mkdtemp(prefix="nas4dyn-ray-")
    try:
        _init_ray(workers, address, temp_dir, _context_bytes(ctx))
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
                run_config=tune.RunConfig(storage_path=temp_dir or tempfile.gettempdir(), name="nas4dyn",
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
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)


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
