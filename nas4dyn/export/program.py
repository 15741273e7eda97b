"""``torch.export`` of static subnets: ``model.pt2``, an ExportedProgram with a dynamic batch dimension.

``torch.export`` traces a graph ahead of time; it cannot carry the data-dependent control flow of exits and
gates (which samples continue, which filters run), so dynamic archs are exported with TorchScript only.
"""
from __future__ import annotations

from pathlib import Path

import torch

from nas4dyn.errors import ConfigError
from nas4dyn.export.runtime import ExportedModel
from nas4dyn.io import atomic_write
from search_spaces.arch import Arch

PROGRAM_FILE = "model.pt2"


def check_exportable(arch: Arch) -> None:
    """Raises:
        ConfigError: ``arch`` has exits, gates or routed stages, which ``torch.export`` cannot express.
    """
    if arch.is_dynamic:
        raise ConfigError("--format export: torch.export cannot carry the data-dependent exits, gates and routes "
                          "of this arch; drop 'export' (model.ts carries them) or export arch.without_dynamic()")


def save_program(model: ExportedModel, example: torch.Tensor, path: str | Path) -> Path:
    """Export ``model`` (a static subnet) with ``torch.export`` and write ``path`` atomically."""
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    program = torch.export.export(model.eval(), (example,), dynamic_shapes={"x": {0: batch}})
    atomic_write(path, lambda f: torch.export.save(program, f))
    return Path(path)


def load_program(path: str | Path) -> torch.nn.Module:
    """The callable module of a saved ``model.pt2`` (float images in [0, 1] -> logits)."""
    path = Path(path)
    return torch.export.load(str(path / PROGRAM_FILE if path.is_dir() else path)).module()
