"""Per-sample descriptors for k-NN class retrieval: gate decision vectors against CNN features.

Each query sample ranks every other analysed sample by descriptor distance; a retrieved sample is relevant
when it has the query's class. Ties (frequent for binary descriptors) keep dataset order, which is unrelated
to class, so they cost nothing on average.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.distance import cdist

_CHUNK = 256  # queries per distance block: 256 x N float64 stays small for N = 10,000


@dataclass(frozen=True)
class RetrievalResult:
    """mAP@k of one descriptor and metric, and the descriptor's storage size per sample."""

    descriptor: str
    metric: str
    bytes_per_sample: int
    map_at_k: dict[int, float]


def average_precision_at_k(descriptors: np.ndarray, labels: np.ndarray, queries: np.ndarray, metric: str,
                           ks: tuple[int, ...]) -> dict[int, np.ndarray]:
    """AP@k of each query (indices into ``descriptors``) retrieving from all other samples, for every k.

    AP@k = sum over ranks i <= k of precision@i at the relevant ranks, divided by min(k, relevant samples).
    """
    counts = np.bincount(labels)
    out = {k: np.zeros(len(queries)) for k in ks}
    depth = max(ks)
    for lo in range(0, len(queries), _CHUNK):
        q = queries[lo : lo + _CHUNK]
        dist = cdist(descriptors[q], descriptors, metric)
        dist[np.arange(len(q)), q] = np.inf  # a query never retrieves itself
        top = np.argsort(dist, axis=1, kind="stable")[:, :depth]  # one ranking serves every k
        rel = labels[top] == labels[q][:, None]
        hits = (np.cumsum(rel, axis=1) / np.arange(1, depth + 1)) * rel
        for k in ks:
            relevant = np.minimum(k, counts[labels[q]] - 1)
            out[k][lo : lo + _CHUNK] = hits[:, :k].sum(axis=1) / np.maximum(relevant, 1)
    return out


def retrieval(decisions: np.ndarray, features: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = (10, 100),
              queries: int = 1000, seed: int = 0) -> list[RetrievalResult]:
    """mAP@k for gate decisions (Hamming) and CNN features (Euclidean and cosine) on the same queries, and
    for a random ranking (chance level, measured rather than derived).

    ``queries`` samples (a seeded random subset; all when fewer) are the queries; every analysed sample is in
    the database. Sizes: gate bits packed 8 per byte, features as float32.
    """
    rng = np.random.default_rng(seed)
    n = len(labels)
    query_idx = np.sort(rng.choice(n, size=min(queries, n), replace=False))
    ks = tuple(k for k in ks if k < n)
    bits = decisions.astype(bool)
    runs = [("gates", "hamming", bits, int(np.packbits(bits[0]).nbytes)),
            ("cnn", "euclidean", features, features.shape[1] * 4),
            ("cnn", "cosine", features, features.shape[1] * 4),
            ("random", "euclidean", rng.random((n, 1)), 0)]
    results = []
    for name, metric, desc, size in runs:
        maps = {k: float(ap.mean()) for k, ap in average_precision_at_k(desc, labels, query_idx, metric, ks).items()}
        results.append(RetrievalResult(name, metric, size, maps))
    return results

