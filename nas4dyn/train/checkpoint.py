"""Training checkpoints: atomic writes, exact resume, and loading with ``weights_only=True``.

A checkpoint records where training stands — the next (phase, step), the data-stream position — and
everything that decides the next steps: weights, optimizer and scheduler state, and every rank's Python,
NumPy and torch RNG states. RNG states are stored as plain lists and tensors so the safe unpickler accepts
them.
"""
from __future__ import annotations

import logging
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nas4dyn.errors import CheckpointError
from nas4dyn.io import atomic_torch_save, safe_torch_load

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "nas4dyn-train-checkpoint/1"
CHECKPOINT_NAME = "checkpoint.pt"
_KEYS = ("space", "config", "seed", "world_size", "phase", "step", "data_position", "model", "optimizer",
         "scheduler", "rng", "metrics")


def capture_rng() -> dict[str, Any]:
    """This process's Python, NumPy and torch (CPU and CUDA) RNG states, as safe-to-load values."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, payload: dict[str, Any]) -> Path:
    """Write ``RUN_DIR/checkpoint.pt`` atomically (temp file, fsync, rename)."""
    missing = [k for k in _KEYS if k not in payload]
    if missing:
        raise ValueError(f"checkpoint payload lacks {missing}")
    path = run_dir / CHECKPOINT_NAME
    atomic_torch_save({"format": CHECKPOINT_FORMAT, **payload}, path)
    log.debug("checkpoint: phase %d step %d -> %s", payload["phase"], payload["step"], path)
    return path


def remove_stale_temp_files(run_dir: Path) -> None:
    """Delete temp files a killed run left behind (the checkpoint itself is never half-written)."""
    for tmp in run_dir.glob(f".{CHECKPOINT_NAME}.*.tmp"):
        tmp.unlink(missing_ok=True)


def load_checkpoint(run_dir: Path, space: dict[str, Any], config: dict[str, Any], seed: int) -> dict[str, Any]:
    """Load and check ``RUN_DIR/checkpoint.pt`` against the space, config and seed of this invocation.

    Raises:
        CheckpointError: truncated or corrupt file, another format, another space, config or seed.
    """
    path = run_dir / CHECKPOINT_NAME
    with warnings.catch_warnings():
        # torch.load falls back to TorchScript probing on a damaged file and warns about it; the
        # CheckpointError below is the one line the user should see.
        warnings.simplefilter("ignore")
        blob = safe_torch_load(path)
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT or any(k not in blob for k in _KEYS):
        raise CheckpointError(f"{path}: not a nas4dyn training checkpoint (expected format {CHECKPOINT_FORMAT})")
    if blob["space"] != space:
        raise CheckpointError(
            f"{path}: checkpoint belongs to space {blob['space'].get('name')!r} (or another version of it), not "
            f"{space.get('name')!r}; resume with the space it was trained on or use a new --out"
        )
    if blob["seed"] != seed:
        raise CheckpointError(f"{path}: checkpoint was trained with --seed {blob['seed']}, not {seed}; "
                              f"resume with --seed {blob['seed']}")
    if blob["config"] != config:
        changed = sorted(k for k in set(config) | set(blob["config"]) if config.get(k) != blob["config"].get(k))
        raise CheckpointError(f"{path}: the training config differs from the checkpoint's in {changed}; resume with "
                              "the same --preset/--config/--set, or use a new --out")
    return blob
