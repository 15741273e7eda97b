"""The deployable form of extracted modules: TorchScript, frozen — what ``nas4dyn export`` ships as
``model.ts`` and what the latency profiler times subnets in, so predictions match the exported model.

``torch.jit.script`` is deprecated in recent torch releases (it warns so) but still works; a scripted module
is still the one format that carries Python control flow (exits, gates) and loads with nothing but ``torch``.
Freezing turns weights into constants and folds each BatchNorm into the conv before it (where that conv is not
narrowed per sample), which removes those calls: at batch 1 the per-call cost, not arithmetic, dominates.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, Sequence

import torch


@contextlib.contextmanager
def quiet_jit_deprecation() -> Iterator[None]:
    """Silence torch's deprecation warnings about ``torch.jit`` (one per scripted, saved or loaded module)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*TorchScript.* deprecated", category=DeprecationWarning)
        yield


def freeze_scripted(module: torch.nn.Module, preserved_attrs: Sequence[str] = ()) -> torch.jit.ScriptModule:
    """``torch.jit.script`` of ``module`` in eval mode, frozen for inference; ``preserved_attrs`` names the
    methods and attributes kept besides ``forward`` (freezing drops the others). A frozen module cannot be
    trained further."""
    with quiet_jit_deprecation():
        return torch.jit.freeze(torch.jit.script(module.eval()), preserved_attrs=list(preserved_attrs))
