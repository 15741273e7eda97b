"""Does gating follow semantics? Class hierarchies and the Mantel test of distance matrices against them.

A hierarchy is a tree of named groups whose leaves are the data's classes, written as JSON::

    {"groups": {"tops": ["T-shirt/top", "Shirt"], "footwear": ["Sandal", "Sneaker"], "bags": ["Bag"]}}

A group maps to a list of class names or to a dict of sub-groups (any depth). The semantic distance of two
classes is their path length in the tree: 2 within one group, 4 across top-level groups of a flat hierarchy.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from scipy.stats import permutation_test, rankdata, spearmanr

from nas4dyn.analyze.distances import upper_triangle
from nas4dyn.data import FASHION_MNIST_CLASSES
from nas4dyn.errors import ConfigError

MIN_PERMUTATIONS = 999  # p-values resolve to 0.001
_FORMAT_HINT = 'expected {"groups": {"group name": ["class", ...] or {sub-groups}, ...}}'

FASHION_MNIST_HIERARCHY: dict[str, Any] = {
    "groups": {
        "tops": ["T-shirt/top", "Pullover", "Coat", "Shirt", "Dress"],
        "footwear": ["Sandal", "Sneaker", "Ankle boot"],
        "trousers": ["Trouser"],
        "bags": ["Bag"],
    }
}


@dataclass(frozen=True)
class Hierarchy:
    """Classes placed in a tree of named groups: ``paths[class]`` lists the group names from the root."""

    paths: dict[str, tuple[str, ...]]
    source: str

    @classmethod
    def from_dict(cls, data: Any, classes: Sequence[str], source: str) -> "Hierarchy":
        """Parse and check a hierarchy: every class of the data exactly once, nothing else.

        Raises:
            ConfigError: one line naming the bad entry and the fix.
        """
        if not isinstance(data, dict) or not isinstance(data.get("groups"), dict):
            raise ConfigError(f"{source}: no top-level \"groups\" object; {_FORMAT_HINT}")
        paths: dict[str, tuple[str, ...]] = {}
        known = set(classes)

        def walk(node: Any, prefix: tuple[str, ...]) -> None:
            if isinstance(node, dict):
                for name, child in node.items():
                    walk(child, prefix + (str(name),))
                return
            if not isinstance(node, list) or not all(isinstance(c, str) for c in node):
                raise ConfigError(f"{source}: group {'/'.join(prefix)!r} must be a list of class names or an "
                                  f"object of sub-groups, got {json.dumps(node)[:80]}")
            for name in node:
                if name not in known:
                    raise ConfigError(f"{source}: class {name!r} (group {'/'.join(prefix)!r}) is not in the data; "
                                      f"use the data's class names: {', '.join(classes)}")
                if name in paths:
                    raise ConfigError(f"{source}: class {name!r} is placed twice ({'/'.join(paths[name])!r} and "
                                      f"{'/'.join(prefix)!r}); place each class once")
                paths[name] = prefix

        walk(data["groups"], ())
        missing = [c for c in classes if c not in paths]
        if missing:
            raise ConfigError(f"{source}: classes {missing} are not placed in any group; add them "
                              "(a one-class group is fine)")
        return cls(paths, source)

    def distances(self, classes: Sequence[str]) -> np.ndarray:
        """C x C tree path lengths between the classes' leaves."""
        leaves = [self.paths[c] + (c,) for c in classes]
        out = np.zeros((len(classes), len(classes)))
        for i, a in enumerate(leaves):
            for j, b in enumerate(leaves[:i]):
                common = next((n for n, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                out[i, j] = out[j, i] = len(a) + len(b) - 2 * common
        return out

    def order(self, classes: Sequence[str]) -> list[int]:
        """Class indices in tree order (groups as written), so that groups form blocks in plots."""
        rank = {c: i for i, c in enumerate(self.paths)}
        return sorted(range(len(classes)), key=lambda i: rank[classes[i]])

    def group_of(self, name: str) -> str:
        """The top-level group of a class."""
        return self.paths[name][0] if self.paths[name] else name


def builtin_hierarchy(classes: Sequence[str]) -> Optional[Hierarchy]:
    """The built-in hierarchy for these classes (Fashion-MNIST's), or None."""
    if tuple(classes) == FASHION_MNIST_CLASSES:
        return Hierarchy.from_dict(FASHION_MNIST_HIERARCHY, classes, "built-in Fashion-MNIST hierarchy")
    return None


def load_hierarchy(path: str | Path, classes: Sequence[str]) -> Hierarchy:
    """A hierarchy JSON file checked against the data's classes.

    Raises:
        ConfigError: unreadable file, invalid JSON or a bad entry.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"hierarchy file {path} does not exist; pass a JSON file, {_FORMAT_HINT}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({str(exc).splitlines()[0]}); {_FORMAT_HINT}") from None
    return Hierarchy.from_dict(data, classes, str(path))


def spearman_ceiling(reference: np.ndarray) -> float:
    """The highest Spearman rho a distance without ties can reach against ``reference``.

    A hierarchy has few distinct distances (two for a flat one), so its class pairs are heavily tied; a
    continuous distance that orders every pair perfectly by level still ranks within a level, and reaches only
    this value (about 0.79 for the built-in Fashion-MNIST hierarchy). Binary-pattern distances can tie too
    and so may exceed it.
    """
    ref = upper_triangle(reference)
    return float(spearmanr(rankdata(ref, method="ordinal"), ref).statistic)


def check_permutations(permutations: int) -> None:
    """Raises ConfigError when ``permutations`` is below :data:`MIN_PERMUTATIONS`."""
    if permutations < MIN_PERMUTATIONS:
        raise ConfigError(f"permutations={permutations} is too few for a p-value resolution of 0.001; "
                          f"use >= {MIN_PERMUTATIONS}")


@dataclass(frozen=True)
class Correlation:
    """Spearman's rho over class pairs and its one-sided Mantel permutation p-value (NaN when undefined)."""

    rho: float
    p_value: float
    permutations: int


def mantel(distances: np.ndarray, reference: np.ndarray, permutations: int = MIN_PERMUTATIONS,
           seed: int = 0) -> Correlation:
    """Spearman correlation of two C x C distance matrices over the upper triangle, with a Mantel p-value.

    The null distribution permutes the class labels of ``distances`` (rows and columns together), which keeps
    each matrix's internal structure — pairs sharing a class are not independent, so a plain Spearman p-value
    would be too small. The alternative is one-sided: distances grow with the reference distance.

    Raises:
        ConfigError: fewer than :data:`MIN_PERMUTATIONS` permutations.
    """
    check_permutations(permutations)
    ref = upper_triangle(reference)
    if np.ptp(ref) == 0 or not np.all(np.isfinite(distances)) or np.ptp(upper_triangle(distances)) == 0:
        return Correlation(float("nan"), float("nan"), permutations)  # a constant ranks nothing

    def statistic(perm: np.ndarray) -> float:
        return float(spearmanr(upper_triangle(distances[np.ix_(perm, perm)]), ref).statistic)

    result = permutation_test((np.arange(len(distances)),), statistic, permutation_type="pairings",
                              vectorized=False, n_resamples=permutations, alternative="greater",
                              rng=np.random.default_rng(seed))
    # few classes have fewer distinct relabellings than requested: scipy then enumerates them all (exact test)
    return Correlation(float(result.statistic), float(result.pvalue), len(result.null_distribution))
