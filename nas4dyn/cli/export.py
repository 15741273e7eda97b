"""`nas4dyn export` — a chosen subnet of a run as a standalone dynamic model (model.ts, ONNX, card.json)."""
from __future__ import annotations

import argparse
from typing import Optional

from nas4dyn.cli.flags import NON_NEGATIVE, POSITIVE
from nas4dyn.export.pipeline import DEFAULT_FORMATS, FORMATS, ExportOptions, export_run, parse_formats


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a subnet as a standalone dynamic model that really skips work",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", dest="run_dir", required=True, metavar="RUN_DIR", help="run directory holding supernet.pt")
    p.add_argument("--arch", required=True, metavar="SEARCH_DIR/pareto.json#INDEX|ARCH.json",
                   help="the subnet: an entry of a search's pareto.json, or an arch JSON file")
    p.add_argument("--out", required=True, metavar="EXPORT_DIR", help="directory to write (replaced when complete)")
    p.add_argument("--format", help=f"comma-separated, from {','.join(FORMATS)} (model.ts is always written; export: "
                        f"torch.export's model.pt2, static archs only; default: {','.join(DEFAULT_FORMATS)}, "
                        "leaving ONNX out with a warning when a gate of the arch has no ONNX form)")
    p.add_argument("--latency-table", metavar="LUT.json", help="latency table from `nas4dyn profile`; fills "
                   "latency_ms_predicted in the card and times the export in the table's runtime (an onnxruntime "
                   "table: model.onnx; --format onnx alone needs one, --format torchscript a torchscript one)")
    p.add_argument("--data", help="data for the card's test figures (default: the run's dataset)")
    p.add_argument("--data-root", help="directory holding the dataset files")
    p.add_argument("--bn-images", type=NON_NEGATIVE, default=2000,
                   help="training images to recalibrate BatchNorm statistics for the subnet (0: keep the stored ones)")
    p.add_argument("--batch-size", type=POSITIVE, default=64, help="batch size for accuracy and rates")
    p.add_argument("--latency-samples", type=POSITIVE, default=200, help="test images timed one by one (batch 1)")
    p.add_argument("--repeats", type=POSITIVE, default=5, help="timed passes over those images (each image's median "
                   "counts, or the latency table's statistic)")
    p.add_argument("--threads", type=POSITIVE, help="torch threads while measuring (default: the latency table's, "
                   "else 1)")
    p.set_defaults(run=run)


def deployed_runtime(text: Optional[str]) -> Optional[str]:
    """The runtime a ``--format`` list deploys with: onnxruntime when it names onnx without torchscript,
    torchscript when it does not name onnx, None (the latency table's) when it names both or is not given."""
    if text is None:
        return None
    named = {f.strip().lower() for f in text.split(",")}
    if "onnx" not in named:
        return "torchscript"
    return None if "torchscript" in named else "onnxruntime"


def run(args: argparse.Namespace) -> int:
    options = ExportOptions(
        formats=parse_formats(args.format) if args.format else None, data=args.data, data_root=args.data_root,
        bn_images=args.bn_images,
        batch_size=args.batch_size, latency_samples=args.latency_samples, latency_repeats=args.repeats,
        latency_table=args.latency_table, threads=args.threads, runtime=deployed_runtime(args.format),
    )
    card = export_run(args.run_dir, args.arch, args.out, options)
    rates = " ".join(f"{name}={rate:.2f}" for name, rate in zip(card["exits"], card.get("exit_rates", [])))
    print(f"exported to {args.out}: {', '.join(card['files'])}")
    print(f"  test accuracy {card['accuracy']:.4f} on {card['samples']} images; exits {rates}")
    if "macs_expected" in card:
        print(f"  MACs: max {card['macs_max'] / 1e6:.2f} M, expected {card['macs_expected'] / 1e6:.2f} M, "
              f"realized at batch 1 {card['macs_realized_batch1'] / 1e6:.2f} M")
    predicted = (f" (predicted {card['latency_ms_predicted']:.3f} ms, {100 * card['latency_relative_error']:+.1f}%; "
                 f"{card['latency']['statistic']}, {card['latency']['threads']} thread(s))"
                 if "latency_ms_predicted" in card else "")
    print(f"  latency at batch 1: {card['latency_ms']:.3f} ms per image{predicted}")
    return 0
