"""``run_search``: a whole search from a run directory to pareto.json, trials.csv and pareto.png."""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import optuna
from optuna.trial import TrialState

from nas4dyn.errors import ConfigError
from nas4dyn.io import check_writable, file_digest
from nas4dyn.search import outputs
from nas4dyn.search.encoding import corner_params
from nas4dyn.search.objectives import parse_constraint, parse_objectives
from nas4dyn.search.optuna_backend import make_sampler, run_optuna
from nas4dyn.search.predictor import MIN_TRIALS, check_predictor
from nas4dyn.search.predictor_strategy import PredictorSettings, run_predictor_search
from nas4dyn.search.storage import count, default_storage, fail_orphaned_trials, mask_url, open_storage, open_study
from nas4dyn.search.trial import SearchSettings, TrialContext, check_constraints, hv_reference, load_context

log = logging.getLogger(__name__)

BACKENDS = ("optuna", "ray")
STRATEGIES = ("measure", "predictor")
REFERENCE_ATTR = "nas4dyn:hv_reference"


@dataclass
class SearchConfig:
    """The knobs of a search (the flags of ``nas4dyn search``)."""

    run_dir: str
    out_dir: str
    objectives: Optional[str] = None  # default: see default_objectives
    constraints: tuple[str, ...] = ()
    latency_table: Optional[str] = None
    sampler: str = "nsga2"
    trials: int = 50
    storage: Optional[str] = None  # default: sqlite:///OUT_DIR/study.db
    study: str = "search"
    backend: str = "optuna"
    workers: int = 1
    ray_address: Optional[str] = None
    data_root: Optional[str] = None
    static: bool = False
    population: int = 20
    seed: Optional[int] = None
    bn_images: int = 2000
    val_images: Optional[int] = None
    batch_size: int = 256
    progress: bool = True
    strategy: str = "measure"  # measure every sampled trial, or let a predictor propose them (predictor_strategy)
    warmup: int = 40  # --strategy predictor: measured trials before the first fit
    round_size: int = 10  # --strategy predictor: trials measured per round
    candidates: int = 10_000  # --strategy predictor: predictor queries per round
    predictor: str = "auto"  # mlp | gbm | ensemble | auto
    predictor_caution: float = 0.0  # --strategy predictor: accuracy minus this x the models' half disagreement


def default_objectives(latency_table: Optional[str]) -> str:
    """Expected latency on the profiled device when there is a latency table, expected MACs otherwise."""
    return "accuracy:max,latency_ms:min" if latency_table else "accuracy:max,macs_expected:min"


@dataclass
class SearchSummary:
    """What a search left behind."""

    study: str
    storage: str  # password masked
    complete: int
    failed: int
    orphaned: int  # RUNNING trials of killed runs marked FAILED at start
    front: int
    hypervolume: float
    reference: dict[str, float] = field(default_factory=dict)  # hypervolume reference point per metric
    out_dir: str = ""


class Progress:
    """A tqdm bar over completed trials whose postfix shows the best feasible accuracy so far and its cost."""

    def __init__(self, total: int, initial: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=min(initial, total), unit="trial", desc="search", disable=not enabled,
                        dynamic_ncols=True)
        self.note = ""  # --strategy predictor: the last round (candidates queried, the predictor's tau)

    def set_note(self, note: str) -> None:
        self.note = note
        self.bar.set_postfix_str(note)

    def __call__(self, study: optuna.Study) -> None:
        done = count(study, TrialState.COMPLETE)
        self.bar.update(max(0, min(done, self.bar.total) - self.bar.n))
        best = [t for t in outputs.completed(study) if outputs.feasible(t)]
        if best:
            top = max((t.user_attrs["metrics"] for t in best), key=lambda m: m["accuracy"])
            self.bar.set_postfix_str(f"best acc {top['accuracy']:.4f} @ {top['macs_expected'] / 1e6:.2f} MMACs, "
                                     f"front {len(study.best_trials)}" + (f"; {self.note}" if self.note else ""))

    def close(self) -> None:
        self.bar.close()


def _check(config: SearchConfig) -> None:
    if config.backend not in BACKENDS:
        raise ConfigError(f"--backend {config.backend!r}: choose one of {', '.join(BACKENDS)}")
    if config.strategy not in STRATEGIES:
        raise ConfigError(f"--strategy {config.strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if config.strategy == "predictor":
        check_predictor(config.predictor)
        for name, low in (("warmup", MIN_TRIALS), ("round_size", 1), ("candidates", 1)):
            if getattr(config, name) < low:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(config, name)}: must be {low} or more")
        if not config.predictor_caution >= 0:
            raise ConfigError(f"--predictor-caution {config.predictor_caution}: must be 0 (off) or more, e.g. 1")
        if config.trials <= config.warmup:
            log.warning(f"--strategy predictor with --trials {config.trials} <= --warmup {config.warmup}: every "
                        "trial is a random warm-up trial and no predictor is fitted; raise --trials or lower --warmup")
    if config.trials < 1:
        raise ConfigError(f"--trials {config.trials}: must be 1 or more (the study holds that many completed trials "
                          "when the command ends)")
    if config.workers < 1:
        raise ConfigError(f"--workers {config.workers}: must be 1 or more")
    if config.backend == "optuna" and config.workers > 1:
        raise ConfigError(f"--workers {config.workers} needs --backend ray; with the optuna backend start more "
                          "`nas4dyn search` processes on the same --storage instead")
    if config.ray_address and config.backend != "ray":
        raise ConfigError("--ray-address needs --backend ray")
    for name in ("bn_images", "batch_size"):
        if getattr(config, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(config, name)}: must be 1 or more")
    if config.val_images is not None and config.val_images < 1:
        raise ConfigError(f"--val-images {config.val_images}: must be 1 or more")


def predictor_settings(config: SearchConfig) -> PredictorSettings:
    return PredictorSettings(warmup=config.warmup, round_size=config.round_size, candidates=config.candidates,
                             kind=config.predictor, caution=config.predictor_caution, seed=config.seed)


def _batches_digest(batches: list) -> str:
    digest = hashlib.sha256()
    for x, y in batches:
        digest.update(x.contiguous().numpy().tobytes())
        digest.update(y.numpy().tobytes())
    return digest.hexdigest()[:16]


def study_settings(ctx: TrialContext, supernet_digest: str) -> dict[str, Any]:
    """What a stored study must agree on to be resumed (a different value would mix incomparable trials): the
    supernet file (its SHA-256), the validation images and labels the trials measure (a digest), objectives,
    constraints and how trials measure."""
    s = ctx.settings
    return {
        "supernet_sha256": supernet_digest[:16],
        "space": ctx.net.space.name,
        "dataset": str(ctx.data_info.get("dataset")),
        "validation_data": _batches_digest(ctx.val_batches),
        "objectives": [str(o) for o in s.objectives],
        "constraints": [str(c) for c in s.constraints],
        "static": s.static,
        "bn_images": s.bn_images,
        "val_images": s.val_images,
        "batch_size": s.batch_size,
    }


def run_search(config: SearchConfig) -> SearchSummary:
    """Search ``config.run_dir``'s supernet until the study holds ``config.trials`` completed trials, then write
    the outputs to ``config.out_dir``. A rerun with the same storage and study continues.

    Raises:
        ConfigError: bad flags, a constraint no subnet can meet, a study made with other settings.
        CheckpointError, DataError: the run or its data cannot be read.
    """
    _check(config)
    settings = SearchSettings(
        objectives=parse_objectives(config.objectives or default_objectives(config.latency_table)),
        constraints=tuple(parse_constraint(c) for c in config.constraints),
        static=config.static,
        bn_images=config.bn_images,
        val_images=config.val_images,
        batch_size=config.batch_size,
    )
    make_sampler(config.sampler, population=config.population)  # fail on bad sampler options before loading
    check_writable(config.out_dir)
    ctx = load_context(config.run_dir, settings, config.latency_table, config.data_root)
    check_constraints(ctx)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    url = config.storage or default_storage(out_dir)
    storage = open_storage(url, heartbeat=config.backend == "optuna")
    directions = [o.optuna_direction for o in settings.objectives]
    provenance = study_settings(ctx, file_digest(Path(config.run_dir) / "supernet.pt"))
    study, created = open_study(storage, config.study, directions, provenance, url)
    orphaned = fail_orphaned_trials(study)
    # A new study starts from the space's corners (the same for every sampler). Only its creator enqueues them:
    # two processes both seeing an empty study would queue them twice and leave duplicates waiting.
    if created:
        for params in corner_params(ctx.net.space, config.static):
            study.enqueue_trial(params)
    # Measured once per study and stored, so every rerun reports hypervolumes against the same point.
    reference = study.user_attrs.get(REFERENCE_ATTR)
    if reference is None:
        reference = hv_reference(ctx)
        study.set_user_attr(REFERENCE_ATTR, reference)
    # A resumed study gets a fresh seed stream, so a seeded sampler does not replay the first run's choices.
    seed = None if config.seed is None else config.seed + len(study.get_trials(deepcopy=False))
    study.sampler = make_sampler(config.sampler, seed, config.population)
    log.info("study %s in %s: %d completed, target %d", config.study, mask_url(url), count(study, TrialState.COMPLETE),
             config.trials)
    progress = Progress(config.trials, count(study, TrialState.COMPLETE), config.progress)

    def measure(target: int) -> None:
        if config.backend == "ray":
            from nas4dyn.search.ray_backend import run_ray

            run_ray(study, storage, ctx, target, config.workers, config.ray_address, progress)
        else:
            run_optuna(study, ctx, target, progress)

    try:
        if config.strategy == "predictor":
            run_predictor_search(study, ctx, config.trials, predictor_settings(config), reference, measure,
                                 progress.set_note)
        else:
            measure(config.trials)
    finally:
        progress.close()
    hv = outputs.write_outputs(study, out_dir, settings.objectives, reference, settings.constraints)
    if settings.constraints and not outputs.front(study):
        raise ConfigError(outputs.infeasibility(study, settings.constraints) + f"; the trials are in {out_dir}/trials.csv")
    return SearchSummary(
        study=config.study,
        storage=mask_url(url),
        complete=count(study, TrialState.COMPLETE),
        failed=count(study, TrialState.FAIL),
        orphaned=orphaned,
        front=len(outputs.front(study)),
        hypervolume=hv,
        reference=reference,
        out_dir=str(out_dir),
    )
