"""`nas4dyn evaluate` — accuracy, exits, gates, realized MACs and latency of an exported model on a data split."""
from __future__ import annotations

import argparse
from typing import Any

from nas4dyn.cli.flags import POSITIVE
from nas4dyn.export.evaluation import evaluate_export


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluate an exported model on a data split",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("export_dir", metavar="EXPORT_DIR", help="directory written by `nas4dyn export`")
    p.add_argument("--data", required=True, help="fashion-mnist, synthetic, or an ImageFolder directory")
    p.add_argument("--data-root", help="directory holding the dataset files")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--batch-size", type=POSITIVE, default=64, help="batch size of the batched pass and its latency")
    p.add_argument("--limit", type=POSITIVE, help="evaluate a fixed-seed random subset of this many images")
    p.add_argument("--latency-samples", type=POSITIVE, default=200, help="images timed (batch 1 and batched)")
    p.add_argument("--repeats", type=POSITIVE, default=5, help="timed passes (the median counts)")
    p.add_argument("--threads", type=POSITIVE, default=1, help="torch threads")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="ImageFolder: leave unreadable image files out (counted in a warning) instead of stopping")
    p.set_defaults(run=run)


def table(result: dict[str, Any], batch_size: int) -> str:
    lines = [f"{result['split']} split of {result['data']}: {result['samples']} images, "
             f"accuracy {result['accuracy']:.4f}", "", f"{'exit':<10} {'share':>8} {'images':>8} {'accuracy':>9}"]
    for name, rate, count, acc in zip(result["exit_names"], result["exit_rates"], result["exit_counts"],
                                      result["exit_accuracy"]):
        lines.append(f"{name:<10} {rate:>8.3f} {count:>8d} {'-' if acc is None else f'{acc:.4f}':>9}")
    if result["gate_rates"]:
        lines += ["", f"{'gated block':<12} {'share on':>8}"]
        lines += [f"{name:<12} {rate:>8.3f}" for name, rate in result["gate_rates"].items()]
    lat1, latb = result["latency_batch1"], result[f"latency_batch{batch_size}"]
    lines += [
        "",
        f"realized mean MACs: {result['macs_realized_batch1'] / 1e6:.3f} M at batch 1 "
        f"({result['macs_realized_batch1_samples']} images), "
        f"{result[f'macs_realized_batch{batch_size}'] / 1e6:.3f} M at batch {batch_size}",
        f"latency: {lat1['ms_per_sample']:.3f} ms per image at batch 1; {latb['ms_per_batch']:.3f} ms per batch of "
        f"{batch_size} ({latb['ms_per_sample']:.3f} ms per image); {lat1['threads']} thread(s), median of "
        f"{len(lat1['repeats_ms_per_sample'])} passes",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    result = evaluate_export(args.export_dir, args.data, args.split, args.data_root, args.batch_size, args.limit,
                             args.latency_samples, args.repeats, args.threads, args.skip_unreadable)
    print(table(result, args.batch_size))
    print(f"\nwrote {args.export_dir}/{result['file']} (card.json keeps the export's own figures)")
    return 0
