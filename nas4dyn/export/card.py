"""The model card (``card.json``): what an exported model is, what it costs and how well it does."""
from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from nas4dyn.errors import CheckpointError

CARD_FILE = "card.json"
CARD_FORMAT = "nas4dyn-card/1"


def versions() -> dict[str, str]:
    """Versions of everything that produced or runs the export."""
    import nas4dyn

    out = {"nas4dyn": nas4dyn.__version__, "torch": torch.__version__, "python": platform.python_version()}
    for name in ("onnx", "onnxruntime"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "not installed"
    return out


def build_card(*, arch: Mapping[str, Any], data_info: Mapping[str, Any], mean: list[float], std: list[float],
               resolution: int, channels: int, thresholds: list[float], exit_names: list[str],
               stats: Optional[Mapping[str, Any]], latency: Optional[Mapping[str, Any]],
               cost: Optional[Mapping[str, Any]], latency_predicted: Optional[float], files: list[str],
               bn_images: int) -> dict[str, Any]:
    """The card. Fields whose source is missing (no data, no cost model) are left out, never guessed."""
    card: dict[str, Any] = {"format": CARD_FORMAT}
    if stats is not None:
        card["accuracy"] = stats["accuracy"]
        card["accuracy_split"] = "test"
        card["samples"] = stats["samples"]
    if cost is not None:
        card["macs_max"] = cost["macs_max"]
        card["macs_min"] = cost["macs_min"]
        card["macs_expected"] = cost["macs_expected"]
    if latency is not None:
        card["latency_ms"] = latency["ms_per_sample"]
        card["latency"] = dict(latency)
    if latency_predicted is not None:
        card["latency_ms_predicted"] = latency_predicted
    if stats is not None:
        card["exit_rates"] = stats["exit_rates"]
        card["gate_rates"] = stats["gate_rates"]
    card["exits"] = exit_names
    card["thresholds"] = thresholds
    card["input"] = {"mean": mean, "std": std, "resolution": resolution, "channels": channels, "range": [0.0, 1.0],
                     "data_resolution": data_info.get("resolution")}
    card["dataset"] = {k: data_info[k] for k in ("dataset", "num_classes", "classes") if k in data_info}
    card["bn_recalibration_images"] = bn_images
    card["files"] = files
    card["arch"] = dict(arch)
    card["versions"] = versions()
    card["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return card


def read_card(export_dir: str | Path) -> dict[str, Any]:
    """The card of an export directory.

    Raises:
        CheckpointError: missing or unreadable card.
    """
    path = Path(export_dir) / CARD_FILE
    if not path.is_file():
        raise CheckpointError(f"{export_dir}: no {CARD_FILE} here; create the export with `nas4dyn export --out {export_dir}`")
    try:
        card = json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); export again") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise CheckpointError(f"{path}: not a nas4dyn model card (expected format {CARD_FORMAT})")
    return card
