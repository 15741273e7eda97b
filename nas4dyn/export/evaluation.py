"""`nas4dyn evaluate`: an export's model.ts measured on a data split — accuracy, exits, gate rates, realized
MACs and latency — written beside the card (which keeps the export's own figures)."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Optional

import torch

from nas4dyn.export.card import read_card
from nas4dyn.export.measure import decision_stats, measure_latency, realized_macs, unnormalised
from nas4dyn.export.pipeline import _check_data_fits, load_split
from nas4dyn.export.torchscript import load_exported
from nas4dyn.io import atomic_write_json, check_writable


def _short_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def eval_file_name(source: str, split: str, data_root: Optional[str] = None, limit: Optional[int] = None) -> str:
    """``eval_<dataset>_<split>[_limitN].json``: one file per dataset and split, so evaluating on other data
    never replaces earlier results. A directory is named by its folder name and a digest of its absolute path;
    ``--data-root`` adds a digest of its own."""
    if source in ("fashion-mnist", "synthetic"):
        name = source
    else:
        where = Path(source).resolve()
        name = f"{re.sub(r'[^A-Za-z0-9.-]+', '-', where.name) or 'data'}-{_short_digest(str(where))}"
    if data_root:
        name += f"-root{_short_digest(str(Path(data_root).resolve()))}"
    return f"eval_{name}_{split}" + (f"_limit{limit}" if limit else "") + ".json"


def evaluate_export(export_dir: str | Path, source: str, split: str = "test", data_root: Optional[str] = None,
                    batch_size: int = 64, limit: Optional[int] = None, latency_samples: int = 200,
                    latency_repeats: int = 5, threads: Optional[int] = None,
                    skip_unreadable: bool = False) -> dict[str, Any]:
    """Evaluate an export directory's ``model.ts`` on ``split`` of ``source``; writes and returns
    :func:`eval_file_name` (its name in ``result["file"]``): accuracy, exit distribution, gate rates, realized
    mean MACs, latency at batch 1 and at ``batch_size``. The card's own figures (``card.json``) stay as they are.

    Raises:
        CheckpointError, DataError, ConfigError: bad export directory, data or split, or a directory that
        cannot be written.
    """
    from nas4dyn.data import make_loader

    export_dir = Path(export_dir)
    card = read_card(export_dir)
    check_writable(export_dir, "EXPORT_DIR")
    model = load_exported(export_dir)
    if threads:
        torch.set_num_threads(threads)
    info = {"channels": model.channels, "num_classes": model.num_classes,
            "resolution": card.get("input", {}).get("data_resolution") or model.resolution}
    dataset, bundle = load_split(source, split, info, data_root, skip_unreadable)
    _check_data_fits(bundle.info, int(model.channels), int(model.num_classes), source)
    loader = make_loader(dataset, batch_size, limit=limit)
    batches = list(unnormalised(loader, bundle.info.mean, bundle.info.std))
    stats = decision_stats(model, batches, desc=f"{split} split")
    images = torch.cat([x for x, _ in batches])
    timed = images[:latency_samples]
    lat1 = measure_latency(model, timed, 1, latency_repeats)
    whole_batches = batch_size * max(1, -(-latency_samples // batch_size))
    lat_b = measure_latency(model, images[:whole_batches], batch_size, latency_repeats)
    result = {
        "split": split,
        "data": source,
        **stats.to_dict(),
        "exit_names": list(model.exit_names),
        "macs_realized_batch1": realized_macs(model, timed, 1),
        "macs_realized_batch1_samples": len(timed),
        f"macs_realized_batch{batch_size}": realized_macs(model, images, batch_size),
        "latency_batch1": lat1.to_dict(),
        f"latency_batch{batch_size}": lat_b.to_dict(),
        "card_accuracy": card.get("accuracy"),
        "file": eval_file_name(source, split, data_root, limit),
    }
    atomic_write_json(export_dir / result["file"], result)
    return result
