"""TorchScript export: ``model.ts`` keeps the data-dependent control flow (exits, gates) and needs only torch
(:mod:`supernet.scripting`: scripted and frozen).
"""
from __future__ import annotations

from pathlib import Path

import torch

from nas4dyn.errors import CheckpointError
from nas4dyn.io import atomic_write
from nas4dyn.export.runtime import ExportedModel
from supernet.scripting import freeze_scripted, quiet_jit_deprecation

MODEL_FILE = "model.ts"


# What users and nas4dyn read off a loaded model.ts; freezing drops every other attribute and method.
PUBLIC = ("forward_with_exits", "forward_all", "gate_decisions", "penultimate", "channels", "resolution", "num_classes",
          "thresholds", "exit_names", "gate_blocks", "gate_kinds", "gate_sizes")


def script_model(model: ExportedModel) -> torch.jit.ScriptModule:
    """The exported model scripted and frozen (:func:`supernet.scripting.freeze_scripted`), keeping the public
    methods and attributes. A frozen model cannot be trained further; fine-tune the supernet or
    ``net.extract(arch)`` instead."""
    return freeze_scripted(model, PUBLIC)


def save_torchscript(model: ExportedModel | torch.jit.ScriptModule, path: str | Path) -> torch.jit.ScriptModule:
    """Script ``model`` (unless it already is) and write it atomically to ``path``; returns the scripted module."""
    scripted = model if isinstance(model, torch.jit.ScriptModule) else script_model(model)
    with quiet_jit_deprecation():
        atomic_write(path, lambda f: torch.jit.save(scripted, f))
    return scripted


def load_exported(path: str | Path) -> torch.jit.ScriptModule:
    """The exported model of an export directory (its ``model.ts``), or of a ``.ts`` file, in eval mode.

    Raises:
        CheckpointError: no ``model.ts`` there, or the file cannot be loaded.
    """
    path = Path(path)
    file = path / MODEL_FILE if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"{path}: no {MODEL_FILE} here; create one with `nas4dyn export --out {path}`")
    try:
        with quiet_jit_deprecation():
            return torch.jit.load(str(file), map_location="cpu").eval()
    except Exception as exc:  # torch raises RuntimeError and others for damaged archives
        raise CheckpointError(f"{file}: cannot load TorchScript model ({type(exc).__name__}); the file is "
                              "truncated or corrupt — export again") from None
