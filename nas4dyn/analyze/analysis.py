"""The gating-semantics analysis end to end: decisions -> class patterns -> distances -> semantics, retrieval."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch

from nas4dyn.analyze.distances import class_distances
from nas4dyn.analyze.patterns import (PATTERN_THRESHOLD, GateGroup, GateModel, binarise, class_means, class_rates,
                                     collect)
from nas4dyn.analyze.retrieval import RetrievalResult, retrieval
from nas4dyn.analyze.semantics import (MIN_PERMUTATIONS, Correlation, Hierarchy, check_permutations, mantel,
                                      spearman_ceiling)
from nas4dyn.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class GateAnalysis:
    """Everything the report shows; arrays are indexed by class in the data's order."""

    classes: list[str]
    groups: list[GateGroup]
    counts: np.ndarray  # samples per class
    gate_on: np.ndarray  # per gate: share of all samples on which it fires
    rates: np.ndarray  # C x G activation rates
    patterns: np.ndarray  # C x G binary class patterns
    feature_dim: int
    distances: dict[str, np.ndarray]
    hierarchy: Optional[Hierarchy]
    correlations: dict[str, Correlation]  # distance name -> correlation with the hierarchy (empty without one)
    retrieval: list[RetrievalResult]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def hierarchy_distances(self) -> Optional[np.ndarray]:
        return self.hierarchy.distances(self.classes) if self.hierarchy is not None else None

    def gate_summary(self) -> dict[str, int]:
        """How many gates always fire, never fire, or depend on the input (the only informative ones)."""
        always, never = int((self.gate_on == 1).sum()), int((self.gate_on == 0).sum())
        return {"total": len(self.gate_on), "always_on": always, "always_off": never,
                "input_dependent": len(self.gate_on) - always - never,
                "differ_between_classes": int((self.patterns.any(0) & ~self.patterns.all(0)).sum())}

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary (matrices as nested lists; NaN as null)."""

        def clean(a: Any) -> Any:
            arr = np.asarray(a, dtype=float)
            return [clean(r) for r in arr] if arr.ndim else (None if not np.isfinite(arr) else round(float(arr), 6))

        return {
            "meta": self.meta,
            "classes": self.classes,
            "samples_per_class": self.counts.tolist(),
            "gates": self.gate_summary(),
            "gate_groups": [{"name": g.name, "kind": g.kind, "gates": g.end - g.start,
                             "mean_rate": clean(self.gate_on[g.start:g.end].mean())} for g in self.groups],
            "pattern_threshold": PATTERN_THRESHOLD,
            "class_patterns": ["".join("1" if b else "0" for b in row) for row in self.patterns],
            "class_rates": clean(self.rates),
            "distances": {name: clean(m) for name, m in self.distances.items()},
            "hierarchy": None if self.hierarchy is None else {
                "source": self.hierarchy.source,
                "paths": {c: list(p) for c, p in self.hierarchy.paths.items()},
                "distances": clean(self.hierarchy_distances),
                "spearman_ceiling": clean(spearman_ceiling(self.hierarchy_distances)),
            },
            "semantics": {name: {"spearman": clean(c.rho), "mantel_p": clean(c.p_value),
                                 "permutations": c.permutations} for name, c in self.correlations.items()},
            "retrieval": [{"descriptor": r.descriptor, "metric": r.metric, "bytes_per_sample": r.bytes_per_sample,
                           "map_at_k": {str(k): round(v, 6) for k, v in r.map_at_k.items()}}
                          for r in self.retrieval],
        }


def analyze_gates(model: GateModel, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], classes: Sequence[str],
                  hierarchy: Optional[Hierarchy] = None, ks: tuple[int, ...] = (10, 100), queries: int = 1000,
                  permutations: int = MIN_PERMUTATIONS, seed: int = 0) -> GateAnalysis:
    """Analyse the gating patterns of ``model`` over ``batches`` of (inputs, labels).

    Without a hierarchy the semantic correlation is skipped; distances, retrieval and figures remain.

    Raises:
        ConfigError: bad ``ks``, ``queries`` or ``permutations``; a gate layout that misses decisions.
        DataError: no samples, no gates, or a class without samples.
    """
    if not ks or min(ks) < 1 or queries < 1:
        raise ConfigError(f"retrieval needs k >= 1 and queries >= 1, got k={list(ks)}, queries={queries}")
    check_permutations(permutations)  # fail before the slow part, not after it
    classes = list(classes)
    data = collect(model, batches)
    groups = model.gate_groups()
    if groups and groups[-1].end != data.decisions.shape[1]:
        raise ConfigError(f"the model's gate layout (gate_sizes) covers {groups[-1].end} columns but its "
                          f"gate_decisions gives {data.decisions.shape[1]}; the export is inconsistent: export again")
    rates = class_rates(data.decisions, data.labels, classes)
    patterns = binarise(rates)
    distances = class_distances(patterns, rates, class_means(data.features, data.labels, len(classes)))
    correlations: dict[str, Correlation] = {}
    if hierarchy is not None:
        reference = hierarchy.distances(classes)
        correlations = {name: mantel(d, reference, permutations, seed) for name, d in distances.items()}
        for name, c in correlations.items():
            if np.isnan(c.rho):
                log.warning("%s: every class pair is at the same distance (or a distance is undefined); "
                            "its correlation with the hierarchy is undefined", name)
            else:
                log.info("%s vs hierarchy: Spearman %.3f, Mantel p %.4f", name, c.rho, c.p_value)
    else:
        log.warning("no class hierarchy for these classes: skipping the semantic correlation "
                    "(pass --hierarchy FILE.json)")
    return GateAnalysis(
        classes=classes, groups=groups, counts=np.bincount(data.labels, minlength=len(classes)),
        gate_on=data.decisions.mean(0), rates=rates, patterns=patterns, feature_dim=data.features.shape[1],
        distances=distances, hierarchy=hierarchy, correlations=correlations,
        retrieval=retrieval(data.decisions, data.features, data.labels, ks, queries, seed),
    )
