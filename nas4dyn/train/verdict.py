"""The verdict on a finished run: a largest subnet that ends near chance accuracy learned nothing, and the user
must hear it (a run that exits 0 with garbage is the worst failure)."""
from __future__ import annotations

from typing import Any, Optional

NEAR_CHANCE_POINTS = 0.10  # within 10 points of chance accuracy


def near_chance(max_val_acc: float, num_classes: int, total_steps: int, steps_per_epoch: int,
                train_images: int, preset: Optional[str]) -> Optional[dict[str, Any]]:
    """A warning record (``kind``, figures, ``message`` naming the likely cause and the fix) when the largest
    subnet's final validation accuracy is within 10 points of chance (1 / classes), else None."""
    chance = 1.0 / num_classes
    if max_val_acc >= chance + NEAR_CHANCE_POINTS:
        return None
    fix = ("train longer: --preset default" if preset != "default" else "train longer")
    message = (
        f"the largest subnet ends at {100 * max_val_acc:.1f}% validation accuracy, within "
        f"{100 * NEAR_CHANCE_POINTS:.0f} points of chance ({100 * chance:.1f}% for {num_classes} classes): the "
        f"supernet learned (almost) nothing. Likely cause: too few optimizer steps ({total_steps} in all, "
        f"{steps_per_epoch} per epoch of {train_images} training images) or a learning rate that does not fit "
        f"this data. Fix: {fix}, or raise the phases' floors (--set phases.full.min_steps=2000), or the epochs "
        "(--set phases.full.epochs=N); check that the class folders hold the right images.")
    return {"kind": "near_chance", "max_val_acc": max_val_acc, "chance": chance, "total_steps": total_steps,
            "message": message}


def loud(message: str) -> str:
    """``message`` framed so that it stands out of a log."""
    bar = "!" * 100
    return f"{bar}\nWARNING: {message}\n{bar}"
