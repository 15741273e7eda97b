"""bench_search --heldout (scripts/search_heldout.py): a study's measured front is its non-dominated trials, each
measured again on the validation images no trial saw, once (a rerun reads its cache) — so is the reference
point's smallest subnet — and studies that saw the whole split, or a cache of other settings, are refused."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from nas4dyn.errors import ConfigError
from nas4dyn.search import SearchConfig, run_search
from nas4dyn.search.outputs import completed
from nas4dyn.search.runner import REFERENCE_ATTR
from tests.test_search import load, run_dir  # noqa: F401 (fixture)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import search_heldout  # noqa: E402

OBJECTIVES = "accuracy:max,macs_expected:min"


def test_fronts_remeasured_on_unseen_validation_images_once(run_dir, tmp_path, monkeypatch):
    run_search(SearchConfig(run_dir=str(run_dir), out_dir=str(tmp_path / "s"), objectives=OBJECTIVES, trials=8,
                            sampler="random", seed=1, bn_images=32, val_images=30, progress=False))
    study = load(tmp_path / "s" / "study.db")
    reference = study.user_attrs[REFERENCE_ATTR]
    front = search_heldout.measured_front(study, OBJECTIVES, reference)
    losses = {t.number: (1 - t.user_attrs["metrics"]["accuracy"], t.user_attrs["metrics"]["macs_expected"])
              for t in completed(study)}
    for t in completed(study):
        dominated = any(o[0] <= losses[t.number][0] and o[1] <= losses[t.number][1] and o != losses[t.number]
                        for o in losses.values())
        assert (t in front) == (not dominated)

    calls = []
    real = search_heldout.evaluate_arch_subsets

    def counted(ctx, arch, batches, subsets, exit_budget=1.0):
        calls.append(len(subsets["rest"]))
        return real(ctx, arch, batches, subsets, exit_budget)

    monkeypatch.setattr(search_heldout, "evaluate_arch_subsets", counted)
    cache = tmp_path / "heldout.json"
    hv, images = search_heldout.heldout_hypervolumes(str(run_dir), {"a": study}, OBJECTIVES, reference, 32, 30, cache)
    best = search_heldout.measured_front(study, OBJECTIVES, reference, search_heldout.FRONTS)
    assert set(t.number for t in front) <= set(t.number for t in best)
    assert images == 30 and 0 < len(calls) <= len(best) + 1 and set(calls) == {30} and 0 < hv["a"] <= 1
    measured = len(calls)
    again, _ = search_heldout.heldout_hypervolumes(str(run_dir), {"a": study, "b": study}, OBJECTIVES, reference,
                                                   32, 30, cache)
    assert again == {"a": hv["a"], "b": hv["a"]} and len(calls) == measured  # all from the cache
    with pytest.raises(ConfigError, match="--val-images"):
        search_heldout.heldout_hypervolumes(str(run_dir), {"a": study}, OBJECTIVES, reference, 32, None, cache)
    with pytest.raises(ConfigError, match="another run or settings"):  # not mixed with other measurements
        search_heldout.heldout_hypervolumes(str(run_dir), {"a": study}, OBJECTIVES, reference, 64, 30, cache)
