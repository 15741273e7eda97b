"""Direct before / after timing of exported models of one arch at batch 1 (e.g. the ``--save`` outputs of
scripts/bench_overhead.py from two checkouts): each timed image runs through every model in turn, in a random
order per image, so drift of the machine hits all of them alike. Reported per model: ms per image and the median
over reps of its time ÷ the first model's, [interquartile range]. The models must give bit-identical logits on the
images (checked first). Pass a model twice for a control: the spread of two identical models is the noise floor.

Usage: python scripts/bench_ab.py MODEL.ts MODEL.ts [...] [--space fmnist] [--images 32] [--reps 100]
       [--lock /work/out/core1.lock --timing-cpu 1]
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import nas4dyn  # noqa: E402
from bench_export import load_images  # noqa: E402
from benchlib import machine_line, timing_cpu  # noqa: E402
from nas4dyn.export.torchscript import load_exported  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="exported model.ts files of one arch; the first is the reference")
    ap.add_argument("--space", default="fmnist", help="the space whose test images are timed (as bench_overhead)")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--lock", help="a lock file to hold (flock) while timing")
    ap.add_argument("--timing-cpu", type=int, help="the CPU to pin the timing to")
    args = ap.parse_args()
    torch.set_num_threads(1)
    _, test, _, _, source = load_images(nas4dyn.load_space(args.space), 10, args.images)
    models = [load_exported(p) for p in args.models]
    labels = [f"{i}: {Path(p).parent.name}/{Path(p).name}" for i, p in enumerate(args.models)]
    order = random.Random(0)
    with torch.no_grad(), timing_cpu(args.lock, args.timing_cpu):
        reference = models[0](test)
        for label, m in zip(labels, models):
            assert torch.equal(m(test), reference), f"{label} gives other logits than {labels[0]}"
        for _ in range(3):  # warm-up: TorchScript optimises a graph after its first calls
            for i in range(len(test)):
                for m in models:
                    m(test[i : i + 1])
        load = os.getloadavg()[0]
        ms: list[list[float]] = [[] for _ in models]
        for _ in range(args.reps):
            total = [0.0] * len(models)
            for i in range(len(test)):
                turn = list(range(len(models)))
                order.shuffle(turn)
                for j in turn:
                    start = time.perf_counter()
                    models[j](test[i : i + 1])
                    total[j] += time.perf_counter() - start
            for j, t in enumerate(total):
                ms[j].append(t * 1e3 / len(test))
    print(f"{args.space} ({source} images), {machine_line(1)}, CPU {args.timing_cpu}; {args.reps} reps x "
          f"{len(test)} images at batch 1; 1-minute load {load:.2f} -> {os.getloadavg()[0]:.2f}")
    for label, times in zip(labels, ms):
        ratios = [a / b for a, b in zip(times, ms[0])]
        q = statistics.quantiles(ratios, n=4)
        print(f"  {label:50s} ms/img {statistics.median(times):.3f}   ÷ model 0: {statistics.median(ratios):.4f} "
              f"[{q[0]:.4f}-{q[2]:.4f}]")


if __name__ == "__main__":
    main()
