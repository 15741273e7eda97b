"""The measured accuracy-latency front of a trained run, by mechanism (issue 20, item 5): do gates put a subnet
on the front that no static or exit-only subnet beats on both test accuracy and measured batch-1 latency?

Static backbones spread over the space's MAC range (log-spaced among random static subnets, the largest and
smallest included); each is measured as it is, with every exit it can hold (thresholds calibrated on the
validation images for two exit budgets, as a search trial calibrates them) and, on every ``--gated``-th
backbone, with each gate kind the space offers on every block that allows it, alone and with the exits. Each
variant: BatchNorm recalibrated, thresholds calibrated on validation, test accuracy of the supernet's dynamic
eval (equal to the exported model by the export tests), then exported and frozen as `nas4dyn export` does.
All exported models are timed interleaved, at batch 1, in rounds over the same test images.

Used by ``scripts/bench_mechanisms.py --front``; rows are kept in OUT/front.json, so a rerun measures only what
is missing (the timing always runs anew: times of separate runs do not compare).
"""
from __future__ import annotations

import io
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from tqdm import tqdm

import nas4dyn
from nas4dyn.data import make_loader
from nas4dyn.export.measure import collect, measure_latencies, unnormalised
from nas4dyn.export.runtime import export_subnet
from nas4dyn.export.torchscript import load_exported, save_torchscript
from nas4dyn.io import atomic_write, atomic_write_json
from nas4dyn.search.objectives import parse_objectives
from nas4dyn.search.trial import SearchSettings, evaluate_arch, load_context, load_run_data
from nas4dyn.train.evaluation import accuracy_and_rates
from nas4dyn.train.sampling import all_exits, gated
from search_spaces.arch import Arch

GATE_KINDS = ("channel", "skip", "width", "emg", "dfs")
EXIT_BUDGETS = (0.5, 0.8)  # share of (full path - first exit) cost the calibrated thresholds may spend


@dataclass(frozen=True)
class Variant:
    """One measured subnet: ``backbone`` index, ``mechanism`` ("static", "exits", "<kind> gates" or
    "<kind> gates + exits"), the uncalibrated arch and the exit budget its thresholds are calibrated for."""

    name: str
    backbone: int
    mechanism: str
    arch: Arch
    budget: float = 1.0

    @property
    def static_or_exits(self) -> bool:
        return self.mechanism in ("static", "exits")


def spread_backbones(space, count: int, seed: int, pool: int = 400) -> list[Arch]:
    """``count`` static subnets at the largest resolution, log-spaced in MACs between the smallest and the
    largest (both included), picked from ``pool`` random ones."""
    rng = random.Random(seed)
    res = max(space.resolutions)
    net = nas4dyn.build_supernet(space)
    drawn = [space.max_arch(), space.min_arch()] + [space.sample(rng, dynamic=False) for _ in range(pool)]
    macs = {a: nas4dyn.count_macs(net, a).macs_max
            for a in {Arch(a.space, res, a.depths, a.kernels, a.widths, a.gates) for a in drawn}}
    ordered = sorted(macs, key=lambda a: (macs[a], str(a.to_dict())))
    logs = np.log([macs[a] for a in ordered])
    picked: list[Arch] = []
    for target in np.linspace(logs[0], logs[-1], count):
        best = min((a for a in ordered if a not in picked), key=lambda a: abs(math.log(macs[a]) - target))
        picked.append(best)
    return sorted(picked, key=lambda a: macs[a])


def variants(space, backbones: list[Arch], gated_every: int, threshold: float) -> list[Variant]:
    """Static and exit variants of every backbone; gate variants (alone and with exits) of every
    ``gated_every``-th backbone counted from the largest, for each gate kind the space offers."""
    kinds = [k for k in GATE_KINDS if any(k in st.gates for st in space.stages)]
    out = []
    for i, base in enumerate(backbones):
        out.append(Variant(f"b{i} static", i, "static", base))
        with_exits = all_exits(space, base, threshold)
        if with_exits.exits:
            out += [Variant(f"b{i} exits@{b}", i, "exits", with_exits, b) for b in EXIT_BUDGETS]
        if (len(backbones) - 1 - i) % gated_every:
            continue
        for kind in kinds:
            arch = gated(space, base, kind)
            if arch == base:
                continue
            out.append(Variant(f"b{i} {kind}", i, f"{kind} gates", arch))
            if with_exits.exits:
                arch = Arch(arch.space, arch.resolution, arch.depths, arch.kernels, arch.widths, arch.gates,
                            with_exits.exits)
                out.append(Variant(f"b{i} {kind}+exits@{EXIT_BUDGETS[-1]}", i, f"{kind} gates + exits", arch,
                                   EXIT_BUDGETS[-1]))
    return out


def dominated(point: dict, others: list[dict]) -> Optional[dict]:
    """The first of ``others`` at least as accurate and at least as fast as ``point`` and better in one."""
    for o in others:
        if o is point:
            continue
        if (o["test_acc"] >= point["test_acc"] and o["ms"] <= point["ms"]
                and (o["test_acc"] > point["test_acc"] or o["ms"] < point["ms"])):
            return o
    return None


def measure_front(run: Path, out: Path, backbones: int, gated_every: int, val_images: Optional[int],
                  bn_images: int, test_images: int, rounds: int, seed: int, timing: Any, pool: int = 400) -> list[dict]:
    """Evaluate (or reload from OUT/front.json) every variant, then time them all interleaved inside the
    ``timing`` context (the lock and core of the measurement); the rows, each with ``ms``. ``pool``: random
    static subnets the backbones are picked from."""
    settings = SearchSettings(parse_objectives("accuracy:max,macs_expected:min"), bn_images=bn_images,
                              val_images=val_images, seed=seed)
    ctx = load_context(run, settings)
    ctx.net = ctx.net.to(memory_format=torch.contiguous_format)  # exported as `nas4dyn export` exports
    net, info = ctx.net, ctx.data_info
    space = net.space
    bundle = load_run_data(net, info, run / "supernet.pt")
    test_loader = make_loader(bundle.test, 500)
    plan = variants(space, spread_backbones(space, backbones, seed, pool), gated_every, space.exits.thresholds[-1])
    out.mkdir(parents=True, exist_ok=True)
    (out / "models").mkdir(exist_ok=True)
    rows_path = out / "front.json"
    done = {r["name"]: r for r in json.loads(rows_path.read_text())} if rows_path.is_file() else {}
    rows = []
    for v in tqdm(plan, desc="evaluating and exporting"):
        model_path = out / "models" / f"{v.name.replace(' ', '_').replace('@', '_b')}.ts"
        row = done.get(v.name)
        if row is None or not model_path.is_file() or Arch.from_dict(row["planned"]) != v.arch:
            trial = evaluate_arch(ctx, v.arch, ctx.val_batches, exit_budget=v.budget)
            net.set_active(trial.arch)
            stats = accuracy_and_rates(net, test_loader)
            save_torchscript(export_subnet(net, trial.arch, info), model_path)
            row = {"name": v.name, "backbone": v.backbone, "mechanism": v.mechanism, "planned": v.arch.to_dict(),
                   "arch": trial.arch.to_dict(), "val_acc": trial.metrics["accuracy"],
                   "test_acc": stats["val_acc"], "macs_expected": trial.metrics["macs_expected"],
                   "macs_max": trial.metrics["macs_max"], "exit_rates": trial.metrics["exit_rates"],
                   "gate_rates": trial.metrics["gate_rates"], "model": model_path.name}
            done[v.name] = row
            atomic_write_json(rows_path, list(done.values()))
        rows.append(row)
    images, _ = collect(unnormalised(make_loader(bundle.test, 256), bundle.info.mean, bundle.info.std), test_images)
    models = [load_exported(out / "models" / r["model"]) for r in rows]
    with timing:
        measured = measure_latencies(models, images, 1, rounds, seed=seed)
    for r, m in zip(rows, measured):
        r["ms"], r["ms_per_pass"] = m.ms_per_sample, m.repeats_ms_per_sample
    reference = [r for r in rows if r["mechanism"] in ("static", "exits")]
    for r in rows:
        r["on_front"] = dominated(r, rows) is None
        beaten_by = dominated(r, reference)
        r["beaten_by"] = None if beaten_by is None else beaten_by["name"]
    atomic_write_json(out / "front_timed.json", rows)
    return rows


def plot_front(rows: list[dict], path: Path, title: str) -> None:
    """Test accuracy against measured latency, one marker per mechanism, the measured front drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for mech in dict.fromkeys(r["mechanism"] for r in rows):
        pts = [r for r in rows if r["mechanism"] == mech]
        ax.scatter([r["ms"] for r in pts], [100 * r["test_acc"] for r in pts], label=mech, s=22,
                   marker="o" if mech in ("static", "exits") else "^")
    front = sorted((r for r in rows if r["on_front"]), key=lambda r: r["ms"])
    ax.plot([r["ms"] for r in front], [100 * r["test_acc"] for r in front], "k--", lw=0.8, label="measured front")
    ax.set_xlabel("measured latency, ms per image at batch 1")
    ax.set_ylabel("test accuracy, %")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def front_table(rows: list[dict]) -> list[str]:
    """Markdown: every gated subnet and every point of the measured front, and the verdict per gate kind."""
    lines = ["| subnet | mechanism | test acc | MMACs expected | ms/img (b1) | on the measured front | beaten by "
             "(static / exits) |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["ms"]):
        if not r["on_front"] and r["mechanism"] in ("static", "exits"):
            continue
        lines.append(f"| {r['name']} | {r['mechanism']} | {100 * r['test_acc']:.2f}% | {r['macs_expected'] / 1e6:.2f} | "
                     f"{r['ms']:.3f} | {'yes' if r['on_front'] else 'no'} | {r['beaten_by'] or '—'} |")
    kinds = dict.fromkeys(r["mechanism"].split(" gates")[0] for r in rows if " gates" in r["mechanism"])
    lines.append("")
    for kind in kinds:
        mine = [r for r in rows if r["mechanism"].startswith(f"{kind} gates")]
        unbeaten = [r["name"] for r in mine if r["beaten_by"] is None]
        lines.append(f"- {kind} gates: {len(unbeaten)} of {len(mine)} subnets beaten by no static or exit-only "
                     f"subnet{(' (' + ', '.join(unbeaten) + ')') if unbeaten else ''}.")
    return lines
