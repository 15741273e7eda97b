"""Class-to-class distance matrices: from gating patterns, and from the CNN-descriptor baseline.

Gate distances follow the seed paper: Hamming and Jaccard on the binary class patterns, cosine on the
activation rates. The baseline describes each class by its mean penultimate CNN feature vector.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy.spatial.distance import pdist, squareform

# name -> (descriptor kind, scipy metric); the descriptor kind selects the class descriptor it applies to
METRICS: dict[str, tuple[str, str]] = {
    "gates_hamming": ("patterns", "hamming"),
    "gates_jaccard": ("patterns", "jaccard"),
    "gates_cosine": ("rates", "cosine"),
    "cnn_euclidean": ("features", "euclidean"),
    "cnn_cosine": ("features", "cosine"),
}


def class_distances(patterns: np.ndarray, rates: np.ndarray, features: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric of :data:`METRICS` as a C x C matrix.

    Args:
        patterns: C x G binary class patterns.
        rates: C x G gate activation rates.
        features: C x D mean penultimate features.

    A cosine distance involving an all-zero vector is undefined and comes out as NaN; the semantic analysis
    then reports the correlation as undefined instead of inventing a value.
    """
    descriptors = {"patterns": patterns.astype(bool), "rates": rates, "features": features}
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # 0/0 of zero vectors: NaN is the honest answer
        for name, (kind, metric) in METRICS.items():
            out[name] = squareform(pdist(descriptors[kind], metric))
    return out


def upper_triangle(matrix: np.ndarray) -> np.ndarray:
    """The strictly upper triangle of a square matrix as a flat vector (each class pair once)."""
    return matrix[np.triu_indices(len(matrix), k=1)]
