"""Latency measurement of exported models: one model alone, or several interleaved in rounds."""
from __future__ import annotations

import pytest
import torch

from nas4dyn.errors import DataError
from nas4dyn.export.measure import measure_latencies, measure_latency


class CountingModel(torch.nn.Module):
    """Records the batch sizes it is called with, in call order, into a log shared by several models."""

    def __init__(self, name: str, log: list):
        super().__init__()
        self.name, self.log = name, log

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append((self.name, len(x)))
        return x


def test_interleaved_rounds_time_every_model_on_every_image():
    log: list = []
    models = [CountingModel(name, log) for name in "abc"]
    images = torch.zeros(7, 1, 4, 4)
    results = measure_latencies(models, images, batch_size=2, repeats=3, warmup=1, seed=0)
    assert [r.samples for r in results] == [7, 7, 7]
    assert all(len(r.repeats_ms_per_sample) == 3 and r.ms_per_sample > 0 for r in results)
    # 4 rounds (1 untimed), each a whole pass per model over batches of 2, 2, 2 and 1 images, never split
    passes = [log[i : i + 4] for i in range(0, len(log), 4)]
    assert len(passes) == 4 * 3
    assert all(len({name for name, _ in p}) == 1 and [n for _, n in p] == [2, 2, 2, 1] for p in passes)
    orders = ["".join(p[0][0] for p in passes[r * 3 : r * 3 + 3]) for r in range(4)]
    assert all(sorted(o) == list("abc") for o in orders)
    assert len(set(orders)) > 1  # the order is shuffled between rounds


def test_one_model_is_measure_latency():
    model = torch.nn.Identity()
    images = torch.zeros(5, 1, 4, 4)
    lat = measure_latency(model, images, 1, repeats=2, statistic="min", clock="cpu")
    assert (lat.samples, lat.batch_size, lat.statistic, lat.clock) == (5, 1, "min", "cpu")
    assert len(lat.repeats_ms_per_sample) == 2


def test_no_images_is_a_data_error():
    with pytest.raises(DataError):
        measure_latencies([torch.nn.Identity()], torch.zeros(0, 1, 4, 4))
