"""Benchmark: a user's own small dataset — `nas4dyn train` with a preset on a generated ImageFolder of a few
thousand images, then test accuracy of the max and min subnets (after BN recalibration) and the exit rates.

The ImageFolder is written from Fashion-MNIST (``--images`` training images, balanced over the 10 classes, and
a 1000-image ``test/`` folder, as grayscale PNGs), so it is real data of the size of a typical custom dataset.

Usage: python scripts/bench_small_data.py --preset quick|default [--images 3000] [--out /tmp/small] [--write]
With --write the result replaces this preset's row block in the "Training (small ImageFolder)" section of
docs/BENCHMARKS.md (the other preset's block is kept).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image

import nas4dyn
from benchlib import machine_line, replace_section
from nas4dyn.data import load_data, load_fashion_mnist, make_loader
from nas4dyn.train.bn import recalibrate_bn
from nas4dyn.train.evaluation import accuracy_and_rates

TITLE = "Training (small ImageFolder)"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md"


def write_folder(root: Path, images: int, test_images: int = 1000) -> None:
    """``root/train`` and ``root/test`` in ImageFolder layout, balanced over the classes (kept when present)."""
    if (root / "test").is_dir():
        return
    splits = load_fashion_mnist()
    for split, n in (("train", images), ("test", test_images)):
        x, y = splits[split]
        for c in range(10):
            (root / split / f"class{c}").mkdir(parents=True, exist_ok=True)
            for i in (y == c).nonzero().flatten()[: n // 10].tolist():
                Image.fromarray(x[i, 0].numpy(), mode="L").save(root / split / f"class{c}" / f"{i}.png")  # uint8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", required=True, choices=["quick", "default"])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--space", default="fmnist")
    ap.add_argument("--out", type=Path, default=Path("runs/small-data"))
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    data_dir, run = args.out / f"data{args.images}", args.out / f"{args.preset}{args.images}"
    write_folder(data_dir, args.images)
    cmd = ["nas4dyn", "train", "--space", args.space, "--data", str(data_dir), "--out", str(run), "--preset", args.preset]
    load_before, tic = os.getloadavg()[0], time.perf_counter()
    if not (run / "supernet.pt").is_file():
        subprocess.run([sys.executable, "-m", *cmd], check=True)
    wall, load_after = time.perf_counter() - tic, os.getloadavg()[0]

    torch.set_num_threads(2)
    metrics = json.loads((run / "train_metrics.json").read_text())
    net = nas4dyn.load_supernet(run)
    data = load_data(str(data_dir), augment=False)
    recal = make_loader(data.train_eval, 500, seed=0, limit=2000)
    test = make_loader(data.test, 500)
    acc = {}
    for label, arch in (("max", net.space.max_arch()), ("min", net.space.min_arch())):
        recalibrate_bn(net, arch, recal, 2000)
        acc[label] = accuracy_and_rates(net, test)["val_acc"]
    steps = " / ".join(str(p["steps"]) for p in metrics["phases"])
    exits = " ".join(f"{r:.2f}" for r in metrics["phases"][-1]["exit_rates"])
    warned = "; ".join(w["kind"] for w in metrics.get("warnings", [])) or "none"
    row = (f"| {args.preset} | {len(data.train)} / {len(data.val)} / {len(data.test)} | {steps} | "
           f"{metrics['total_wall_time_s'] / 60:.1f} min (load {load_before:.1f} → {load_after:.1f}) | "
           f"{100 * acc['max']:.2f}% | {100 * acc['min']:.2f}% | {exits} | {warned} |")
    print(row)
    if args.write:
        text = DOCS.read_text()
        match = re.search(rf"^## {re.escape(TITLE)}\n.*?(?=^## |\Z)", text, re.S | re.M)
        rows = [r for r in (match.group(0).splitlines() if match else []) if r.startswith("| quick") or r.startswith("| default")]
        rows = [r for r in rows if not r.startswith(f"| {args.preset} ")] + [row]
        body = "\n".join([
            f"Command: `python scripts/bench_small_data.py --preset quick|default --images {args.images} --write` "
            f"(runs `nas4dyn train --space {args.space} --data DIR --preset P`) — {machine_line(2)}",
            "",
            f"DIR: {args.images} Fashion-MNIST training images as PNGs in class folders (10% of them held out for "
            "validation) and a 1000-image `test/` folder. Accuracies on `test/` after BN recalibration; wall time "
            "of the phases (incl. evaluation) with the 1-min load average before → after (above ~2, other jobs "
            "shared the 2 cores). Steps per phase: full / kernel / depth / width / dynamic.",
            "",
            "| preset | train / val / test images | steps per phase | training time | max subnet test | "
            "min subnet test | exit rates (dynamic probe, val) | warnings |",
            "|---|---|---|---|---|---|---|---|",
            *sorted(rows, key=lambda r: not r.startswith("| quick")),
        ])
        replace_section(DOCS, TITLE, body)
    print(f"whole command {wall / 60:.1f} min")


if __name__ == "__main__":
    main()
