"""Writing a gate analysis: report.json, report.md and small PNG figures (matplotlib, Agg backend)."""
from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers and in tests
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.cluster.hierarchy import dendrogram, linkage  # noqa: E402
from scipy.spatial.distance import squareform  # noqa: E402

from nas4dyn.analyze.analysis import GateAnalysis  # noqa: E402
from nas4dyn.analyze.semantics import spearman_ceiling  # noqa: E402
from nas4dyn.io import atomic_write, atomic_write_json, atomic_write_text  # noqa: E402

log = logging.getLogger(__name__)

DPI = 80  # small PNGs: the figures go into the docs
FIGURES = ("rates.png", "distances.png", "dendrogram.png")
_TITLES = {"hierarchy": "hierarchy (tree path)", "gates_hamming": "gates: Hamming", "gates_jaccard": "gates: Jaccard",
           "gates_cosine": "gate rates: cosine", "cnn_euclidean": "CNN: Euclidean", "cnn_cosine": "CNN: cosine"}


def _save(fig: plt.Figure, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def _order(a: GateAnalysis) -> list[int]:
    return a.hierarchy.order(a.classes) if a.hierarchy is not None else list(range(len(a.classes)))


def plot_rates(a: GateAnalysis, path: Path) -> None:
    """Class x gate activation rates; classes in hierarchy order, gated blocks separated by lines."""
    order = _order(a)
    fig, ax = plt.subplots(figsize=(9, 0.3 * len(a.classes) + 1.4))
    im = ax.imshow(a.rates[order], aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    for g in a.groups[1:]:
        ax.axvline(g.start - 0.5, color="white", lw=0.8)
    ax.set_yticks(range(len(order)), [a.classes[i] for i in order], fontsize=8)
    ticks = [(g.start + g.end - 1) / 2 for g in a.groups]
    ax.set_xticks(ticks, [f"{g.name}\n{g.kind}" for g in a.groups], fontsize=6)
    ax.set_title("gate activation rate per class", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    _save(fig, path)


def plot_distances(a: GateAnalysis, path: Path) -> None:
    """Every class distance matrix (and the hierarchy's), rows and columns in hierarchy order."""
    order = _order(a)
    mats = ({"hierarchy": a.hierarchy_distances} if a.hierarchy is not None else {}) | a.distances
    cols = 3
    rows = -(-len(mats) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    names = [a.classes[i][:8] for i in order]
    for ax, (name, m) in zip(axes.flat, mats.items()):
        ax.imshow(m[np.ix_(order, order)], cmap="magma_r", interpolation="nearest")
        corr = a.correlations.get(name)
        extra = f"\nSpearman {corr.rho:.2f}, p={corr.p_value:.3f}" if corr is not None else ""
        ax.set_title(_TITLES.get(name, name) + extra, fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        ax.set_yticks(range(len(names)), names, fontsize=6)
    for ax in list(axes.flat)[len(mats):]:
        ax.axis("off")
    fig.tight_layout()
    _save(fig, path)


def plot_dendrograms(a: GateAnalysis, path: Path) -> None:
    """Average-linkage dendrograms of the classes: gate patterns (Hamming) next to CNN descriptors."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 0.25 * len(a.classes) + 1.5))
    colours = plt.get_cmap("tab10")
    groups = sorted({a.hierarchy.group_of(c) for c in a.classes}) if a.hierarchy is not None else []
    for ax, name in zip(axes, ("gates_hamming", "cnn_euclidean")):
        with warnings.catch_warnings():  # identical patterns: every merge at 0 makes a zero-width x axis
            warnings.simplefilter("ignore", UserWarning)
            dendrogram(linkage(squareform(a.distances[name], checks=False), "average"), labels=a.classes,
                       orientation="right", ax=ax, color_threshold=0, above_threshold_color="grey")
        ax.set_title(_TITLES[name], fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
        for label in ax.get_yticklabels():  # leaves coloured by their top-level hierarchy group
            if groups:
                label.set_color(colours(groups.index(a.hierarchy.group_of(label.get_text())) % 10))
    fig.tight_layout()
    _save(fig, path)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def markdown(a: GateAnalysis) -> str:
    """The human-readable report."""
    m, s = a.meta, a.gate_summary()
    lines = ["# Gating-pattern semantics", ""]
    lines += [f"- {key}: `{value}`" for key, value in m.items()]
    lines += [
        f"- samples: {int(a.counts.sum())} ({int(a.counts.min())}-{int(a.counts.max())} per class), "
        f"{len(a.classes)} classes",
        f"- gates: {s['total']} ({s['input_dependent']} input-dependent, {s['always_on']} always on, "
        f"{s['always_off']} always off); {s['differ_between_classes']} differ between class patterns "
        f"(rate >= 0.5)",
        f"- CNN descriptor: {a.feature_dim} penultimate features", "",
    ]
    if s["differ_between_classes"] == 0:
        never_close = " Every gate is always on: the dynamic phase kept all gates open." if s["always_on"] == s[
            "total"] else ""
        lines += ["**Every class has the same binary gating pattern**: Hamming and Jaccard distances are all zero "
                  f"and their correlations undefined.{never_close}", ""]
    lines += [
        "| gated block | kind | gates | mean rate |", "|---|---|---:|---:|",
    ]
    lines += [f"| {g.name} | {g.kind} | {g.end - g.start} | {_fmt(a.gate_on[g.start:g.end].mean())} |"
              for g in a.groups]
    lines += ["", "## Semantics", ""]
    if a.hierarchy is None:
        lines.append("No class hierarchy for these classes; pass `--hierarchy FILE.json` to test semantics.")
    else:
        groups: dict[str, list[str]] = {}
        for c in a.classes:
            groups.setdefault("/".join(a.hierarchy.paths[c]) or c, []).append(c)
        placed = "; ".join(f"{g}: {', '.join(cs)}" for g, cs in groups.items())
        lines += [f"Hierarchy: {a.hierarchy.source} — {placed}",
                  "", "Spearman rank correlation of class distances with the hierarchy's tree distance over the "
                  "class pairs; one-sided Mantel permutation p-value (class labels permuted). The hierarchy has "
                  "few distinct distances, so a distance without ties reaches at most "
                  f"rho = {_fmt(spearman_ceiling(a.hierarchy_distances))}.", "",
                  "| distance | Spearman | Mantel p | permutations |", "|---|---:|---:|---:|"]
        lines += [f"| {_TITLES[n]} | {_fmt(c.rho)} | {_fmt(c.p_value, 4)} | {c.permutations} |"
                  for n, c in a.correlations.items()]
    ks = sorted({k for r in a.retrieval for k in r.map_at_k})
    lines += ["", "## Retrieval", "",
              "Each query ranks all other analysed samples by descriptor distance; mAP@k of same-class retrieval.", "",
              "| descriptor | metric | bytes/sample | " + " | ".join(f"mAP@{k}" for k in ks) + " |",
              "|---|---|---:|" + "---:|" * len(ks)]
    lines += [f"| {r.descriptor} | {r.metric} | {r.bytes_per_sample} | "
              + " | ".join(_fmt(r.map_at_k.get(k)) for k in ks) + " |" for r in a.retrieval]
    lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in FIGURES]
    return "\n".join(lines) + "\n"


def write_report(a: GateAnalysis, out_dir: str | Path) -> Path:
    """Write report.json, report.md and the figures into ``out_dir``; returns the report.md path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_rates(a, out / FIGURES[0])
    plot_distances(a, out / FIGURES[1])
    plot_dendrograms(a, out / FIGURES[2])
    atomic_write_json(out / "report.json", a.to_json())
    atomic_write_text(out / "report.md", markdown(a))
    log.info("wrote %s", out / "report.md")
    return out / "report.md"
