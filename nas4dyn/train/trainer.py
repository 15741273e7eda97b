"""The training loop: progressive shrinking into a dynamic phase, sandwich steps, checkpoints and reports.

One :class:`Trainer` runs every phase of a :class:`TrainConfig` on a :class:`DataBundle`. A step samples the
sandwich (max, min, random subnets), computes the teacher's logits once, accumulates every subnet's
gradients, averages them over ranks and takes one optimizer step. Rank 0 alone writes the run directory.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from nas4dyn.api import save_supernet
from nas4dyn.data import DataBundle
from nas4dyn.errors import ConfigError, DivergenceError, Nas4dynError
from nas4dyn.io import atomic_write_json
from search_spaces.space import SearchSpace
from supernet.network import Supernet
from nas4dyn.train import checkpoint as ckpt
from nas4dyn.train.config import TrainConfig
from nas4dyn.train.distributed import (DistEnv, ShardedBatches, broadcast_object, broadcast_state,
                                           gather_objects, state_checksum, sync_gradients)
from nas4dyn.train.evaluation import evaluate_phase
from nas4dyn.train.losses import subnet_loss
from nas4dyn.train.precision import autocast, resolve_precision
from nas4dyn.train.sampling import sandwich
from nas4dyn.train.schedule import PhasePlan, make_optimizer, plan_phases
from nas4dyn.train.verdict import near_chance

log = logging.getLogger(__name__)


@contextlib.contextmanager
def frozen_bn_statistics(net: nn.Module) -> Iterator[None]:
    """BN layers normalise with batch statistics but leave their running statistics alone.

    Only the max subnet updates running statistics, so the eval-mode teacher forward sees statistics that
    belong to the max subnet rather than a blend of every sampled subnet.
    """
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(bns, saved):
            m.momentum = momentum


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Trains a supernet of ``space`` on ``data`` into ``run_dir`` (see :mod:`nas4dyn.train`)."""

    def __init__(self, space: SearchSpace, data: DataBundle, config: TrainConfig, run_dir: str | Path,
                 seed: int = 0, env: Optional[DistEnv] = None, resume: bool = False, preset: Optional[str] = None):
        self.space, self.data, self.config, self.seed = space, data, config, seed
        self.preset = preset  # recorded in train_metrics.json (the config itself is the full record)
        self.env = env or DistEnv()
        self.run_dir = Path(run_dir)
        seed_everything(seed)  # identical initial weights on every rank
        self.net = Supernet(space).to(self.env.device)
        # Decided once per run from the device (config "auto"); every rank has the same kind of device.
        self.precision = resolve_precision(config.precision, self.env.device)
        self.stream = ShardedBatches(data.train, config.batch_size, seed, self.env)
        self.plans = plan_phases(config, self.stream.steps_per_epoch)
        self.phase, self.step = 0, 0
        self.metrics: dict[str, Any] = {"phases": [], "phase_elapsed_s": 0.0}
        self.resumed: Optional[dict[str, Any]] = self._load_or_start(resume)
        # (phase name, step) of the checkpoint on disk, named when training diverges
        self.last_good: Optional[tuple[str, int]] = None
        if self.resumed is not None:
            self.last_good = (self.plans[min(self.phase, len(self.plans) - 1)].name, self.step)
        broadcast_state(self.net, self.env)
        # NHWC weights (and so activations): 1.2-1.4x the full phase's steps per second of NCHW on 2 CPU cores
        # for the fmnist space (docs/BENCHMARKS.md, "Training (default preset)"). Values are unchanged, so
        # checkpoints and supernet.pt load into a plain NCHW supernet.
        self.net = self.net.to(memory_format=torch.channels_last)
        self.writer: Optional[SummaryWriter] = None

    # ---- state -------------------------------------------------------------------------------------------
    def _read_checkpoint(self, resume: bool) -> Optional[dict[str, Any]]:
        path = self.run_dir / ckpt.CHECKPOINT_NAME
        if not resume:
            for name in (ckpt.CHECKPOINT_NAME, "supernet.pt"):
                if (self.run_dir / name).exists():
                    raise ConfigError(f"--out {self.run_dir}: already holds a run ({name}); pass --resume to continue "
                                      "it, or choose another --out")
            return None
        if not path.exists():
            log.warning("--resume: no %s in %s; starting a new run", ckpt.CHECKPOINT_NAME, self.run_dir)
            return None
        return ckpt.load_checkpoint(self.run_dir, self.space.to_dict(), self.config.to_dict(), self.seed)

    def _load_or_start(self, resume: bool) -> Optional[dict[str, Any]]:
        blob = error = None
        if self.env.is_main:  # rank 0 alone reads the run directory; the others get its verdict
            try:
                blob = self._read_checkpoint(resume)
            except Nas4dynError as exc:
                error = exc
        blob, error = broadcast_object((blob, error), self.env)
        if error is not None:
            raise error
        if blob is None:
            seed_everything(self.seed + 7919 * self.env.rank)  # augmentation and gate noise differ per rank
            return None
        self.net.load_state_dict(blob["model"])
        self.phase, self.step, self.metrics = blob["phase"], blob["step"], blob["metrics"]
        self.stream.position = blob["data_position"]
        if blob["world_size"] == self.env.world_size:
            ckpt.restore_rng(blob["rng"][self.env.rank])
        else:
            log.warning("resuming %d-rank checkpoint on %d ranks: the data shards and random streams change, so the "
                        "result will not equal an uninterrupted run", blob["world_size"], self.env.world_size)
            seed_everything(self.seed + 7919 * self.env.rank + self.stream.position)
        log.info("resuming at phase %s step %d", self.plans[min(self.phase, len(self.plans) - 1)].name, self.step)
        return blob

    def _save(self, opt: torch.optim.Optimizer, sched: Any, phase_start: float) -> None:
        self._check_weights(self.plans[min(self.phase, len(self.plans) - 1)])  # never checkpoint a diverged net
        rng = gather_objects(ckpt.capture_rng(), self.env)
        if not self.env.is_main:
            return
        self.metrics["phase_elapsed_s"] = time.perf_counter() - phase_start
        ckpt.save_checkpoint(self.run_dir, {
            "space": self.space.to_dict(), "config": self.config.to_dict(), "seed": self.seed,
            "world_size": self.env.world_size, "phase": self.phase, "step": self.step,
            "data_position": self.stream.position, "model": self.net.state_dict(),
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng, "metrics": self.metrics,
        })
        self.last_good = (self.plans[min(self.phase, len(self.plans) - 1)].name, self.step)

    # ---- divergence --------------------------------------------------------------------------------------
    def _diverged(self, plan: PhasePlan, step: int, what: str) -> DivergenceError:
        """The one-line error of a diverged run: where, what, the likely cause, and what is kept on disk."""
        fix = f"lower phases.{plan.name}.lr (now {plan.config.lr:g})"
        if self.config.grad_clip <= 0:
            fix += " or set grad_clip=1.0"
        kept = (f"{self.run_dir / ckpt.CHECKPOINT_NAME} (phase {self.last_good[0]}, step {self.last_good[1]}) is the "
                "last good checkpoint" if self.last_good else "no checkpoint was written")
        return DivergenceError(f"training diverged in phase {plan.name} at step {step} of {plan.steps}: "
                               f"{what}; likely cause: a learning rate too high for this phase — {fix}; {kept}, "
                               "no supernet.pt was written")

    def _check_weights(self, plan: PhasePlan) -> None:
        """Raise :class:`DivergenceError` when a weight or buffer is non-finite (identical on every rank)."""
        state = [t for t in self.net.state_dict().values() if t.is_floating_point()]
        bad = sum(not bool(torch.isfinite(t).all()) for t in state)
        if bad:
            raise self._diverged(plan, self.step, f"{bad} of {len(state)} weight tensors are not finite")

    # ---- one step ----------------------------------------------------------------------------------------
    def train_step(self, plan: PhasePlan, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer
                   ) -> dict[str, float]:
        """One sandwich step; returns the losses of its subnets for logging."""
        cfg, net = self.config, self.net
        subnets = sandwich(self.space, set(plan.config.elastic), cfg.num_random, self.seed, plan.index, self.step,
                           cfg.eval_threshold)
        opt.zero_grad(set_to_none=True)
        teacher = None
        if len(subnets) > 1 and cfg.kd_ratio > 0:
            net.eval()  # the teacher: the max subnet with eval-mode BN, no gradient
            net.set_active(subnets[0].arch.without_dynamic())
            with torch.no_grad(), autocast(self.precision, self.env.device):
                teacher = net.forward_all(x)[-1].float()
        net.train()
        net.router_temperature = self.router_temperature(plan)
        logs: dict[str, float] = {}
        for role, arch in subnets:
            net.set_active(arch)
            with frozen_bn_statistics(net) if role != "max" else contextlib.nullcontext(), \
                    autocast(self.precision, self.env.device):
                outs = net.forward_all(x)
                loss, parts = subnet_loss(outs, y, None if role == "max" else teacher, net.gate_trace, cfg,
                                          net.route_trace)
            loss.backward()  # gradients accumulate over the sandwich; graphs are freed one subnet at a time
            logs[f"loss_{role}"] = logs.get(f"loss_{role}", 0.0) + float(loss.detach())
            for key in ("gate_rate", "ig"):
                if key in parts:
                    logs[key] = parts[key]
        # Drop the last graph's references (and let evaluation deep-copy the net).
        net.gate_trace, net.route_trace = [], []
        local_loss = sum(v for k, v in logs.items() if k.startswith("loss_"))
        logs["loss"] = sync_gradients(net, self.env, local_loss)
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        # The loss and the gradient norm are the same on every rank (after the all-reduce), so all ranks stop at
        # the same step.
        norm = (nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip) if cfg.grad_clip > 0
                else nn.utils.get_total_norm(grads))
        logs["grad_norm"] = float(norm)
        if not (math.isfinite(logs["loss"]) and math.isfinite(logs["grad_norm"])):  # stop before the update
            raise self._diverged(plan, self.step + 1, f"loss {logs['loss']:g}, gradient norm {logs['grad_norm']:g}")
        opt.step()
        return logs

    def router_temperature(self, plan: PhasePlan) -> float:
        """CIGT's annealed softmax temperature: geometric from start to end over a phase that samples paths
        (a pure function of the step, so a resumed run anneals alike)."""
        cfg = self.config
        if "paths" not in plan.config.elastic:
            return cfg.router_temperature_end
        progress = self.step / max(1, plan.steps - 1)
        return cfg.router_temperature_start * (cfg.router_temperature_end / cfg.router_temperature_start) ** progress

    # ---- phases ------------------------------------------------------------------------------------------
    def _global_step(self) -> int:
        return sum(p.steps for p in self.plans[: self.phase]) + self.step

    def _run_phase(self, plan: PhasePlan) -> None:
        if self.step == 0 and plan.config.sort_channels:
            self.net.sort_channels()  # first-k widths now keep the most important channels
        if self.step == 0 and "paths" in plan.config.elastic and not any(
                "paths" in p.config.elastic for p in self.plans[: plan.index]):
            self.net.seed_path_copies()  # routing starts: every path begins as the trained shared block
        self.stream.use(self.data.train if self.config.augments(plan.config) else self.data.train_eval)
        opt, sched = make_optimizer(self.net, plan, self.config)
        if self.resumed is not None and self.step > 0:
            opt.load_state_dict(self.resumed["optimizer"])
            sched.load_state_dict(self.resumed["scheduler"])
        self.resumed = None
        phase_start = time.perf_counter() - (self.metrics["phase_elapsed_s"] if self.step > 0 else 0.0)
        images = self.stream.batch * self.env.world_size
        bar = tqdm(total=plan.steps, initial=self.step, desc=f"phase {plan.index + 1}/{len(self.plans)} {plan.name}",
                   unit="step", disable=not self.env.is_main, mininterval=1.0, dynamic_ncols=True)
        rate, recent = 0.0, []
        while self.step < plan.steps:
            tic = time.perf_counter()
            x, y = self.stream.next()
            try:
                logs = self.train_step(plan, x.to(self.env.device), y.to(self.env.device), opt)
            except DivergenceError:
                bar.close()  # the error line comes after the bar, not inside it
                raise
            sched.step()
            self.step += 1
            ips = images / (time.perf_counter() - tic)
            rate = ips if rate == 0 else 0.9 * rate + 0.1 * ips
            recent = (recent + [logs["loss"]])[-50:]
            bar.set_postfix(loss=f"{logs['loss']:.3f}", img_s=f"{rate:.0f}", refresh=False)
            bar.update()
            self._log_scalars({**logs, "lr": opt.param_groups[0]["lr"], "img_per_s": ips}, "train")
            if self.step % self.config.checkpoint_every == 0 and self.step < plan.steps:
                self._save(opt, sched, phase_start)
        bar.close()
        self._check_weights(plan)
        train_time = time.perf_counter() - phase_start
        results = evaluate_phase(self.net, plan.config.elastic, self.data.train_eval, self.data.val, self.config,
                                 self.seed, self.env)
        self._record_phase(plan, results, train_time, time.perf_counter() - phase_start, recent)
        self.phase, self.step = self.phase + 1, 0
        self._save(opt, sched, time.perf_counter())

    def _record_phase(self, plan: PhasePlan, results: dict[str, dict[str, Any]], train_time: float,
                      wall_time: float, recent: list[float]) -> None:
        probe = results.get("max_dynamic", {})
        entry = {
            "name": plan.name, "epochs": plan.config.epochs, "steps": plan.steps, "elastic": plan.config.elastic,
            "wall_time_s": round(wall_time, 2), "eval_time_s": round(wall_time - train_time, 2),
            # The phase's mean training throughput (the progress bar shows a moving average).
            "img_per_s": round(plan.steps * self.stream.batch * self.env.world_size / train_time, 1),
            "train_loss": sum(recent) / max(1, len(recent)),
            "max_val_acc": results["max"]["val_acc"], "min_val_acc": results["min"]["val_acc"],
            "exit_rates": probe.get("exit_rates", []), "gate_rates": probe.get("gate_rates", {}),
            "subnets": results,
        }
        self.metrics["phases"].append(entry)
        log.info("phase %s: max %.4f, min %.4f val acc, %.0f s", plan.name, entry["max_val_acc"],
                 entry["min_val_acc"], wall_time)
        for name, r in results.items():
            self._log_scalars({f"{name}_val_acc": r["val_acc"]}, f"eval/{plan.name}")

    def _log_scalars(self, values: dict[str, float], prefix: str) -> None:
        if self.writer is not None:
            step = self._global_step()
            for key, value in values.items():
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    # ---- the whole run -----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train every remaining phase, write the final artifacts, return the metrics (on every rank)."""
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temp_files(self.run_dir)
            atomic_write_json(self.run_dir / "space.json",
                              {"space": self.space.to_dict(), "data": self.data.info.to_dict()})
            purge = self._global_step() if self.phase or self.step else None
            self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=purge)
        start = time.perf_counter()
        try:
            while self.phase < len(self.plans):
                self._run_phase(self.plans[self.phase])
        finally:
            if self.writer is not None:
                self.writer.close()
        return self._finish(time.perf_counter() - start)

    def _finish(self, session_time: float) -> dict[str, Any]:
        checksums = gather_objects(state_checksum(self.net), self.env)
        self.metrics.pop("phase_elapsed_s", None)
        metrics = {
            "space": self.space.name, "data": self.data.info.dataset, "seed": self.seed,
            "world_size": self.env.world_size, "steps_per_epoch": self.stream.steps_per_epoch,
            "precision": self.precision,
            "total_wall_time_s": round(sum(p["wall_time_s"] for p in self.metrics["phases"]), 2),
            "last_session_s": round(session_time, 2), "rank_checksums": checksums,
            "ranks_consistent": len(set(checksums)) == 1, "preset": self.preset, "config": self.config.to_dict(),
            **self.metrics,
        }
        warning = near_chance(metrics["phases"][-1]["max_val_acc"], self.data.info.num_classes,
                              sum(p.steps for p in self.plans), self.stream.steps_per_epoch, len(self.data.train),
                              self.preset) if metrics["phases"] else None
        metrics["warnings"] = [warning] if warning else []
        if warning and self.env.is_main:  # `nas4dyn train` repeats it, framed, after its summary table
            log.warning("%s", warning["message"])
        if not metrics["ranks_consistent"]:
            log.error("ranks ended with different weights: %s", checksums)
        if self.env.is_main:
            save_supernet(self.run_dir / "supernet.pt", self.net, self.data.info.to_dict())
            atomic_write_json(self.run_dir / "train_metrics.json", metrics)
        return metrics


def summary_table(metrics: dict[str, Any]) -> str:
    """A plain-text table of the phases: steps, time, throughput, accuracies, exit and gate rates."""
    head = f"{'phase':<10}{'steps':>7}{'time':>9}{'img/s':>8}{'max acc':>9}{'min acc':>9}  exit rates / mean gate rate"
    lines = [head, "-" * len(head)]
    for p in metrics["phases"]:
        gates = p["gate_rates"]
        dyn = " ".join(f"{r:.2f}" for r in p["exit_rates"])
        if gates:
            dyn += f" / {sum(gates.values()) / len(gates):.2f}"
        lines.append(f"{p['name']:<10}{p['steps']:>7}{p['wall_time_s']:>8.0f}s{p['img_per_s']:>8.0f}"
                     f"{100 * p['max_val_acc']:>8.2f}%{100 * p['min_val_acc']:>8.2f}%  {dyn or '-'}")
    lines.append(f"total {metrics['total_wall_time_s']:.0f} s on {metrics['world_size']} process(es); "
                 f"ranks consistent: {metrics['ranks_consistent']}")
    return "\n".join(lines)


def load_metrics(run_dir: str | Path) -> dict[str, Any]:
    """``RUN_DIR/train_metrics.json``."""
    return json.loads((Path(run_dir) / "train_metrics.json").read_text())
