"""Atomic file writes and safe checkpoint loading, shared by training, search and export."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from nas4dyn.errors import CheckpointError, ConfigError


def atomic_write(path: str | Path, write: Callable[[Any], None], binary: bool = True) -> None:
    """Write ``path`` through ``write(fileobj)`` into a temp file in the same folder, fsync, then rename:
    readers see the old file or the whole new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions open() would
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), binary=False)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load(..., weights_only=True)``; a missing, truncated or corrupt file raises CheckpointError.

    Raises:
        CheckpointError: naming the file and what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged files
        raise CheckpointError(
            f"{path}: cannot load checkpoint ({type(exc).__name__}); the file is truncated or corrupt — "
            "delete it and rerun"
        ) from None


def check_writable(path: str | Path, flag: str = "--out", directory: bool = True) -> None:
    """Fail before any work when ``path`` (a directory, or a file with ``directory=False``) cannot be written:
    it is a file where a directory is needed (or the reverse), lies under a file, or its nearest existing
    folder is not writable.

    Raises:
        ConfigError: naming the flag, the path and the fix.
    """
    path = Path(path)
    if path.exists():
        if directory and not path.is_dir():
            raise ConfigError(f"{flag} {path}: is a file, not a directory; choose another {flag}")
        if not directory and path.is_dir():
            raise ConfigError(f"{flag} {path}: is a directory; give a file path such as {path / 'out.json'}")
        folder = path if directory else path.parent
    else:
        folder = path.parent
        while not folder.exists():  # ends: the root exists
            folder = folder.parent
        if not folder.is_dir():
            raise ConfigError(f"{flag} {path}: {folder} is a file, so nothing can be created under it; choose "
                              f"another {flag}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: {folder} is not writable by this user; choose another {flag}")
