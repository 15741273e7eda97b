"""Helpers shared by the benchmark scripts: a machine description and section-wise BENCHMARKS.md updates."""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import fcntl
import os
import re
import signal
from pathlib import Path
from typing import Iterator

import torch

from nas4dyn.cost.latency import device_name
from nas4dyn.io import atomic_write_text


def machine_line(threads: int) -> str:
    return (f"{device_name('cpu')}, {os.cpu_count()} cores, {threads} torch threads, torch {torch.__version__}, "
            f"{datetime.date.today().isoformat()}")


def replace_section(path: Path, title: str, body: str) -> None:
    """Replace (or append) the ``## title`` section of a Markdown file, leaving other sections alone."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: block + "\n", text, count=1) if pattern.search(text) else text.rstrip() + "\n\n" + block
    atomic_write_text(path, text)


@contextlib.contextmanager
def timing_cpu(lock: str | None, cpu: int | None) -> Iterator[None]:
    """Hold ``lock`` (an flock on that file; None: no lock) and run the calling thread on ``cpu`` (None: where
    it ran) for the duration: the set-up runs elsewhere, only the timing occupies the shared measurement core."""
    before = os.sched_getaffinity(0)
    with open(lock, "a") if lock else contextlib.nullcontext() as held:
        if held:
            fcntl.flock(held, fcntl.LOCK_EX)
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        try:
            yield
        finally:
            os.sched_setaffinity(0, before)


def end_with_parent() -> None:
    """Process-pool initializer: the worker gets SIGTERM when the process that started it dies (Linux's
    PR_SET_PDEATHSIG), so a killed benchmark does not leave its workers running their jobs to the end."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # no Linux libc: the workers outlive a killed parent, as before
        pass
