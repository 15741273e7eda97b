"""Building and loading supernets; the layout of a run directory's ``supernet.pt``."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from nas4dyn.errors import CheckpointError
from nas4dyn.io import atomic_torch_save, safe_torch_load
from search_spaces.space import SearchSpace, load_space, space_from_dict
from supernet.network import Supernet

SUPERNET_FORMAT = "nas4dyn-supernet/1"


def build_supernet(space: SearchSpace | str) -> Supernet:
    """A freshly initialised :class:`Supernet` of ``space`` (a space object, built-in name or file path)."""
    return Supernet(load_space(space) if isinstance(space, str) else space)


def save_supernet(path: str | Path, net: Supernet, data_info: dict[str, Any]) -> None:
    """Write ``supernet.pt``: weights, the space and the data description (input normalisation, classes),
    loadable with ``torch.load(..., weights_only=True)``."""
    atomic_torch_save(
        {
            "format": SUPERNET_FORMAT,
            "space": net.space.to_dict(),
            "data": dict(data_info),
            "state_dict": net.state_dict(),
        },
        path,
    )


def load_supernet_file(path: str | Path) -> tuple[Supernet, dict[str, Any]]:
    """(supernet in eval mode, data description) from a ``supernet.pt`` file.

    Raises:
        CheckpointError: missing, corrupt, or not a nas4dyn supernet file.
    """
    blob = safe_torch_load(path)
    if not isinstance(blob, dict) or blob.get("format") != SUPERNET_FORMAT:
        raise CheckpointError(f"{path}: not a nas4dyn supernet file (expected format {SUPERNET_FORMAT})")
    net = Supernet(space_from_dict(blob["space"], str(path)))
    try:
        net.load_state_dict(blob["state_dict"])
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:200]  # torch's message spans lines; ours is one
        raise CheckpointError(f"{path}: weights do not fit the space stored with them (written by another "
                              f"nas4dyn version? train it again): {detail}") from None
    return net.eval(), blob.get("data", {})


def load_supernet(run_dir: str | Path) -> Supernet:
    """The trained supernet of a run directory (``RUN_DIR/supernet.pt``), in eval mode; its data description
    (input normalisation, classes) is attached as ``net.data_info``.

    Raises:
        CheckpointError: the run directory has no readable supernet.
    """
    run_dir = Path(run_dir)
    path = run_dir / "supernet.pt" if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: no supernet.pt here; train one with `nas4dyn train --out {run_dir}`")
    net, data_info = load_supernet_file(path)
    net.data_info = data_info
    return net
