"""Helpers shared by the benchmark scripts: a machine description and section-wise BENCHMARKS.md updates."""
from __future__ import annotations

import datetime
import os
import re
from pathlib import Path

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
