"""Optuna backend: Optuna's samplers, and the trials of one process run by ``Study.optimize``.

Several ``nas4dyn search`` processes (on one machine or many) may share a storage: each runs its own trials
against the same study until it holds the requested number of completed trials.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import optuna
from optuna.trial import FrozenTrial, TrialState

from nas4dyn.errors import ConfigError, Nas4dynError
from nas4dyn.search.encoding import suggest
from nas4dyn.search.storage import OWNER_ATTR, count, owner
from nas4dyn.search.trial import SearchSettings, TrialContext, TrialResult, run_trial

SAMPLERS = ("nsga2", "tpe", "random")
TrialCallback = Callable[[optuna.Study], None]  # called after every finished trial


def make_sampler(name: str, seed: Optional[int] = None, population: int = 20) -> optuna.samplers.BaseSampler:
    """NSGA-II, multi-objective TPE, or random search (constraints come from each trial, see :func:`record`).

    Raises:
        ConfigError: unknown sampler or a population below 2.
    """
    if name == "nsga2":
        if population < 2:
            raise ConfigError(f"--population {population}: NSGA-II needs at least 2")
        return optuna.samplers.NSGAIISampler(population_size=population, seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError(f"--sampler {name!r}: choose one of {', '.join(SAMPLERS)}")


def record(trial: Any, result: TrialResult, settings: SearchSettings) -> list[float]:
    """Store a finished trial's arch, metrics and constraint values on its Optuna trial; returns the objective
    values. Constraints go through ``Trial.set_constraint`` (Optuna 5's replacement of ``constraints_func``), so
    samplers rank infeasible trials behind feasible ones and ``best_trials`` keeps feasible ones only."""
    trial.set_user_attr("arch", result.arch.to_dict())
    trial.set_user_attr("metrics", result.metrics)
    for key, violation in result.constraint_values(settings.constraints).items():
        trial.set_constraint(key, violation)
    return result.objective_values(settings.objectives)


def run_optuna(study: optuna.Study, ctx: TrialContext, target: int, on_trial: Optional[TrialCallback] = None) -> None:
    """Run trials in this process until ``study`` holds ``target`` completed trials (counting other processes'
    trials too). An exception in a trial fails that trial and ends the run.

    Raises:
        Nas4dynError: a round of trials completed none (every trial failed without raising).
    """
    settings = ctx.settings

    def objective(trial: optuna.Trial) -> list[float]:
        trial.set_user_attr(OWNER_ATTR, owner())
        params = suggest(trial, ctx.net.space, settings.static)
        return record(trial, run_trial(ctx, params), settings)

    def after_trial(study: optuna.Study, _: FrozenTrial) -> None:
        if on_trial is not None:
            on_trial(study)
        if count(study, TrialState.COMPLETE) >= target:  # other processes on the storage count too
            study.stop()

    while (done := count(study, TrialState.COMPLETE)) < target:
        study.optimize(objective, n_trials=target - done, callbacks=[after_trial])
        if count(study, TrialState.COMPLETE) == done:
            raise Nas4dynError(f"no trial of the last {target - done} completed; see the log above (run with "
                               "--debug for details)")
