"""``--strategy predictor``: rounds of fit -> NSGA-II over the predictor -> measure the most promising candidates.

1. Warm-up: the study's corners, then random trials (the unbiased sample a predictor learns from best), measured
   like any trial, until the study holds ``warmup`` completed trials.
2. Each round fits a :class:`~nas4dyn.search.predictor.SubnetPredictor` on every measured trial of the study,
   runs Optuna's NSGA-II in memory for ``candidates`` candidates scored by the predictor (accuracy, exit and gate
   rates) and the cost tables (:mod:`nas4dyn.search.candidate_costs`), its first generation the best measured
   trials (a first generation drawn at random led it to subnets far from any measured one, where the predictor
   over-rates them: 0.94x plain NSGA-II's hypervolume over 3 seeds on fmnist, 1.12x from the elites), then picks
   ``round_size`` new candidates greedily by predicted hypervolume gain over the measured front, and enqueues
   them in the study with their predictions (user attribute ``nas4dyn:predicted``).
3. The enqueued candidates are measured as ordinary trials by the backend (this process, or Ray workers in
   parallel), so the storage, ``--trials`` and resuming work as for ``--strategy measure``: a killed run leaves
   its enqueued candidates WAITING and a rerun measures them before fitting again.

Each round's fit (out-of-fold τ and RMSE of each model), candidate count and timing are stored on the study
(user attributes ``nas4dyn:predictor_round.NNN``).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import optuna
from optuna._hypervolume import compute_hypervolume
from optuna.study._multi_objective import _fast_non_domination_rank
from optuna.trial import TrialState

from nas4dyn.search import outputs
from nas4dyn.search.candidate_costs import CandidateCosts
from nas4dyn.search.encoding import budget, decode, suggest
from nas4dyn.search.objectives import budget_metric
from nas4dyn.search.predictor import Featurizer, SubnetPredictor, rates_of
from nas4dyn.search.storage import count
from nas4dyn.search.trial import TrialContext
from search_spaces.arch import Arch

log = logging.getLogger(__name__)

PREDICTED_ATTR = "nas4dyn:predicted"
ROUND_ATTR = "nas4dyn:predictor_round."
Measure = Callable[[int], None]  # measure trials until the study holds this many completed ones


@dataclass(frozen=True)
class PredictorSettings:
    """The knobs of ``--strategy predictor``."""

    warmup: int = 40  # measured trials (corners included) before the first fit
    round_size: int = 10  # candidates measured per round
    candidates: int = 10_000  # predictor queries per round
    population: int = 100  # of the candidate NSGA-II
    kind: str = "auto"  # mlp | gbm | ensemble | auto (by out-of-fold Kendall tau)
    caution: float = 0.0  # predicted accuracy minus caution x the models' half disagreement (SubnetPredictor)
    seed: Optional[int] = None


@dataclass
class Candidate:
    params: dict[str, Any]
    arch: Arch
    metrics: dict[str, float]
    violation: float  # summed positive constraint violations (0: predicted feasible)


def _key(arch: Arch, params: dict[str, Any]) -> tuple:
    """Identity of a candidate: its structure, and its exit budget to 0.05 when it has exits."""
    return (arch, round(budget(params) * 20) if arch.exits else None)


def query_candidates(ctx: TrialContext, predictor: SubnetPredictor, featurizer: Featurizer, costs: CandidateCosts,
                     settings: PredictorSettings, seed: Optional[int],
                     parents: Sequence[dict[str, Any]] = ()) -> list[Candidate]:
    """NSGA-II in memory over ``settings.candidates`` candidates, each scored by the predictor and the cost
    tables (every objective and constraint metric a trial measures, predicted). ``parents``: the parameters
    of its first generation (the measured elites), so its offspring start from subnets known to be good
    rather than from random ones far from any measured trial, where the predictor is least right."""
    s = ctx.settings
    space = ctx.net.space
    study = optuna.create_study(directions=[o.optuna_direction for o in s.objectives],
                                sampler=optuna.samplers.NSGAIISampler(population_size=settings.population, seed=seed))
    for params in parents[:settings.population]:
        study.enqueue_trial(params)
    out: list[Candidate] = []
    while len(out) < settings.candidates:
        trials = [study.ask() for _ in range(min(settings.population, settings.candidates - len(out)))]
        params = [suggest(t, space, s.static) for t in trials]
        archs = [decode(space, p) for p in params]
        prediction = predictor.predict(featurizer, archs, [budget(p) for p in params])
        for row, (trial, p, arch) in enumerate(zip(trials, params, archs)):
            exits, gates = rates_of(featurizer, arch, prediction, row, budget(p))
            metrics = {"accuracy": float(prediction.accuracy[row]), **costs.metrics(arch, exits, gates)}
            violations = [c.violation(metrics[c.metric]) for c in s.constraints]
            for c, v in zip(s.constraints, violations):
                trial.set_constraint(str(c), float(v))
            study.tell(trial, [metrics[o.metric] for o in s.objectives])
            out.append(Candidate(p, arch, metrics, float(sum(max(0.0, v) for v in violations))))
    return out


def select(candidates: list[Candidate], measured: list[dict[str, Any]], ctx: TrialContext,
           reference: dict[str, float], k: int, seen: set, rng: np.random.Generator) -> list[Candidate]:
    """``k`` new predicted-feasible candidates, greedily by predicted hypervolume gain over the measured
    front (normalised as the study's hypervolume); when no candidate adds any, the rest come at random from
    the predicted non-dominated front."""
    objectives = ctx.settings.objectives
    pool, keys = [], set()
    for c in candidates:
        key = _key(c.arch, c.params)
        if c.violation <= 0 and key not in seen and key not in keys:
            keys.add(key)
            pool.append(c)
    if not pool:
        return []
    losses = outputs.normalised_losses([c.metrics for c in pool], objectives, reference)
    ranks = _fast_non_domination_rank(losses, n_below=k * 20)
    front = list(np.argsort(ranks, kind="stable")[:k * 20])  # the best-ranked candidates; the gains are among them
    ref = np.ones(len(objectives))
    base = outputs.normalised_losses(measured, objectives, reference)
    base = base[np.all(base < ref, axis=1)]
    picked: list[int] = []
    while len(picked) < k:
        current = compute_hypervolume(base, ref) if len(base) else 0.0
        best, gain = None, 0.0
        for i in front:
            if i in picked or not np.all(losses[i] < ref):
                continue
            g = compute_hypervolume(np.vstack([base, losses[i:i + 1]]), ref) - current
            if g > gain:
                best, gain = i, g
        if best is None:
            break
        picked.append(best)
        base = np.vstack([base, losses[best:best + 1]])
    rest = [i for i in front if i not in picked and ranks[i] == ranks[front[0]]]  # the predicted front
    rng.shuffle(rest)
    picked += rest[:k - len(picked)]
    return [pool[i] for i in picked]


def elites(trials: list[optuna.trial.FrozenTrial], ctx: TrialContext, reference: dict[str, float],
           k: int) -> list[dict[str, Any]]:
    """Parameters of the ``k`` best measured feasible trials, by non-domination rank of their measured metrics
    (ties in trial order)."""
    return [t.params for t, _ in outputs.by_rank([t for t in trials if t.params], ctx.settings.objectives,
                                                   reference)[:k]]


def run_predictor_search(study: optuna.Study, ctx: TrialContext, target: int, settings: PredictorSettings,
                         reference: dict[str, float], measure: Measure,
                         on_round: Optional[Callable[[str], None]] = None) -> None:
    """Rounds (see the module docstring) until ``study`` holds ``target`` completed trials; ``measure(n)``
    measures the study's enqueued (or, failing those, sampled) trials until it holds ``n`` completed ones."""
    space = ctx.net.space
    costs = CandidateCosts(ctx.net, ctx.latency)
    featurizer = Featurizer(space, costs, budget_metric(ctx.settings.objectives))
    rng = np.random.default_rng(settings.seed)
    while (done := count(study, TrialState.COMPLETE)) < target:
        waiting = count(study, TrialState.WAITING)
        if done < settings.warmup:  # enqueued trials (a new study's corners) go first, then random ones
            seed = None if settings.seed is None else settings.seed + len(study.get_trials(deepcopy=False))
            study.sampler = optuna.samplers.RandomSampler(seed=seed)
            measure(min(target, max(settings.warmup, done + waiting)))
            continue
        if waiting:  # candidates a killed run enqueued: measured before the next fit
            measure(min(target, done + waiting))
            continue
        number = len([k for k in study.user_attrs if k.startswith(ROUND_ATTR)])
        trials = outputs.completed(study)
        start = time.perf_counter()
        predictor = SubnetPredictor(settings.kind, seed=number if settings.seed is None else settings.seed + number,
                                    caution=settings.caution)
        predictor.fit(featurizer.samples(trials))
        fitted, cpu = time.perf_counter(), time.process_time()
        seed = None if settings.seed is None else settings.seed + 1000 + number
        candidates = query_candidates(ctx, predictor, featurizer, costs, settings, seed,
                                      elites(trials, ctx, reference, settings.population))
        searched, cpu = time.perf_counter(), time.process_time() - cpu
        seen = {_key(decode(space, t.params), t.params) for t in study.get_trials(deepcopy=False)
                if t.state != TrialState.FAIL and t.params}
        measured = [t.user_attrs["metrics"] for t in trials if outputs.feasible(t)]
        picks = select(candidates, measured, ctx, reference, min(settings.round_size, target - done), seen, rng)
        if not picks:
            log.warning("round %d: every candidate the predictor proposes is measured already or predicted "
                        "infeasible; sampling at random instead", number)
            study.sampler = optuna.samplers.RandomSampler(seed=seed)
            measure(min(target, done + settings.round_size))
            continue
        for c in picks:
            study.enqueue_trial(c.params, user_attrs={PREDICTED_ATTR: c.metrics})
        info = {"round": number, "measured": done, "model": predictor.chosen, "scores": predictor.scores,
                "candidates": len(candidates), "fit_s": fitted - start, "search_s": searched - fitted,
                "search_cpu_s": cpu,  # this process's CPU time: the rate on a machine others share
                "enqueued": len(picks), "traced": costs.traced}
        study.set_user_attr(f"{ROUND_ATTR}{number:03d}", info)
        note = (f"round {number}: {len(candidates)} candidates in {searched - fitted:.0f} s, predictor "
                f"{predictor.chosen} tau {predictor.tau:.2f}")
        log.info(note)
        if on_round is not None:
            on_round(note)
        measure(done + len(picks))
