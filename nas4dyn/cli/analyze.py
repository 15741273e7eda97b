"""`nas4dyn analyze gates` — what a dynamic model's gates learned: class gating patterns against a class
hierarchy, and gate vectors as compact retrieval descriptors next to the CNN's features."""
from __future__ import annotations

import argparse

from nas4dyn.cli.flags import POSITIVE

# Every `nas4dyn` call builds all verbs' parsers: torch, scipy and matplotlib are imported in `run` only.
PERMUTATIONS = 999  # the analysis refuses fewer (p-value resolution 0.001)
SPLITS = ("test", "val", "train")  # train is read without augmentation


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="analyse a trained dynamic model (gating-pattern semantics)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    what = p.add_subparsers(dest="what", metavar="WHAT", parser_class=type(p))
    what.required = True
    g = what.add_parser("gates", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                        help="class gating patterns vs a class hierarchy; gate vectors as retrieval descriptors")
    g.add_argument("--model", required=True, metavar="EXPORT_DIR",
                   help="export directory from `nas4dyn export` (model.ts, card.json)")
    g.add_argument("--data", required=True, help="fashion-mnist, synthetic, or an ImageFolder directory")
    g.add_argument("--data-root", help="folder holding the Fashion-MNIST IDX files (default: Debian's location)")
    g.add_argument("--split", choices=SPLITS, default="test")
    g.add_argument("--hierarchy", metavar="FILE.json",
                   help='class hierarchy {"groups": {"name": [classes] or {sub-groups}}}; built in for Fashion-MNIST')
    g.add_argument("--max-samples", type=POSITIVE, help="analyse a seeded random subset of this many samples")
    g.add_argument("--queries", type=POSITIVE, default=1000, help="retrieval queries (seeded subset of the samples)")
    g.add_argument("--k", type=POSITIVE, nargs="+", default=[10, 100], help="retrieval depths for mAP@k")
    g.add_argument("--permutations", type=int, default=PERMUTATIONS, help="Mantel test permutations")
    g.add_argument("--batch-size", type=POSITIVE, default=256)
    g.add_argument("--seed", type=int, default=0, help="seed of the sample subset, queries and permutations")
    g.add_argument("--out", required=True, metavar="REPORT_DIR")
    g.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from nas4dyn.analyze import ExportedProbe, analyze_gates, builtin_hierarchy, load_hierarchy, write_report
    from nas4dyn.data import make_loader
    from nas4dyn.export.card import read_card
    from nas4dyn.export.measure import unnormalised
    from nas4dyn.export.pipeline import _check_data_fits, load_split
    from nas4dyn.export.torchscript import load_exported

    from nas4dyn.io import check_writable

    check_writable(args.out)
    card = read_card(args.model)
    model = load_exported(args.model)
    # the data exactly as `nas4dyn evaluate` reads it (synthetic data regenerated to the model's shape)
    info = {"channels": model.channels, "num_classes": model.num_classes,
            "resolution": card.get("input", {}).get("data_resolution") or model.resolution}
    dataset, bundle = load_split(args.data, args.split, info, args.data_root)
    _check_data_fits(bundle.info, int(model.channels), int(model.num_classes), args.data)
    classes = bundle.info.classes
    hierarchy = load_hierarchy(args.hierarchy, classes) if args.hierarchy else builtin_hierarchy(classes)
    loader = make_loader(dataset, args.batch_size, seed=args.seed, limit=args.max_samples)
    batches = unnormalised(loader, bundle.info.mean, bundle.info.std)  # the model normalises [0, 1] images
    analysis = analyze_gates(ExportedProbe(model), batches, classes, hierarchy, tuple(args.k), args.queries,
                             args.permutations, args.seed)
    analysis.meta = {"model": str(args.model), "model_accuracy": card.get("accuracy"), "data": args.data,
                     "split": args.split, "max_samples": args.max_samples, "seed": args.seed}
    report = write_report(analysis, args.out)
    print(f"wrote {report}")
    for name, c in analysis.correlations.items():
        text = f"{c.rho:+.3f}  (Mantel p = {c.p_value:.4f})" if c.rho == c.rho else "undefined (constant distances)"
        print(f"  {name:<14} Spearman vs hierarchy {text}")
    for r in analysis.retrieval:
        maps = "  ".join(f"mAP@{k} {v:.3f}" for k, v in r.map_at_k.items())
        print(f"  retrieval {r.descriptor:>6}/{r.metric:<9} {r.bytes_per_sample:>5} B/sample  {maps}")
    return 0
