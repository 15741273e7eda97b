"""`nas4dyn analyze gates` — what a dynamic model's gates learned: class gating patterns against a class
hierarchy, and gate vectors as compact retrieval descriptors next to the CNN's features."""
from __future__ import annotations

import argparse
from typing import Any

from nas4dyn.errors import ConfigError, DataError

# Every `nas4dyn` call builds all verbs' parsers: torch, scipy and matplotlib are imported in `run` only.
PERMUTATIONS = 999  # the analysis refuses fewer (p-value resolution 0.001)
SPLITS = {"test": "test", "val": "val", "train": "train_eval"}  # train without augmentation


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="analyse a trained dynamic model (gating-pattern semantics)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    what = p.add_subparsers(dest="what", metavar="WHAT", parser_class=type(p))
    what.required = True
    g = what.add_parser("gates", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                        help="class gating patterns vs a class hierarchy; gate vectors as retrieval descriptors")
    g.add_argument("--model", required=True, metavar="EXPORT_DIR", help="export directory (model.ts) or .ts file")
    g.add_argument("--data", required=True, help="fashion-mnist, synthetic, or an ImageFolder directory")
    g.add_argument("--data-root", help="folder holding the Fashion-MNIST IDX files (default: Debian's location)")
    g.add_argument("--split", choices=sorted(SPLITS), default="test")
    g.add_argument("--hierarchy", metavar="FILE.json",
                   help='class hierarchy {"groups": {"name": [classes] or {sub-groups}}}; built in for Fashion-MNIST')
    g.add_argument("--max-samples", type=int, help="analyse a seeded random subset of this many samples")
    g.add_argument("--queries", type=int, default=1000, help="retrieval queries (seeded subset of the samples)")
    g.add_argument("--k", type=int, nargs="+", default=[10, 100], help="retrieval depths for mAP@k")
    g.add_argument("--permutations", type=int, default=PERMUTATIONS, help="Mantel test permutations")
    g.add_argument("--batch-size", type=int, default=256)
    g.add_argument("--seed", type=int, default=0, help="seed of the sample subset, queries and permutations")
    g.add_argument("--out", required=True, metavar="REPORT_DIR")
    g.set_defaults(run=run)


def unit_images(ds: Any) -> Any:
    """The same samples as float images in [0, 1]: an exported model normalises its input itself."""
    import torch
    from torch.utils.data import Subset
    from torchvision.transforms import v2

    from nas4dyn.data import TensorImageDataset

    if isinstance(ds, Subset):
        return Subset(unit_images(ds.dataset), ds.indices)
    if isinstance(ds, TensorImageDataset):
        return TensorImageDataset(ds.images, ds.labels, v2.ToDtype(torch.float32, scale=True))
    raise DataError(f"cannot read raw images from a {type(ds).__name__}; use fashion-mnist, synthetic or a folder")


def run(args: argparse.Namespace) -> int:
    from nas4dyn.analyze import ExportedProbe, analyze_gates, builtin_hierarchy, load_hierarchy, write_report
    from nas4dyn.data import load_data, make_loader
    from nas4dyn.export.torchscript import load_exported

    for flag in ("max_samples", "queries", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} {value}: must be a positive integer")
    model = load_exported(args.model)
    bundle = load_data(args.data, data_root=args.data_root, augment=False)
    info = bundle.info
    if int(model.channels) != info.channels or int(model.num_classes) != info.num_classes:
        raise DataError(f"--data {args.data}: {info.channels}-channel images of {info.num_classes} classes, but the "
                        f"model takes {int(model.channels)} channels and has {int(model.num_classes)} classes; "
                        "use the data the model was trained on")
    hierarchy = load_hierarchy(args.hierarchy, info.classes) if args.hierarchy else builtin_hierarchy(info.classes)
    dataset = unit_images(getattr(bundle, SPLITS[args.split]))
    loader = make_loader(dataset, args.batch_size, seed=args.seed, limit=args.max_samples)
    analysis = analyze_gates(ExportedProbe(model), loader, info.classes, hierarchy, tuple(args.k), args.queries,
                             args.permutations, args.seed)
    analysis.meta = {"model": str(args.model), "data": args.data, "split": args.split,
                     "max_samples": args.max_samples, "seed": args.seed}
    report = write_report(analysis, args.out)
    print(f"wrote {report}")
    for name, c in analysis.correlations.items():
        print(f"  {name:<14} Spearman vs hierarchy {c.rho:+.3f}  (Mantel p = {c.p_value:.4f})")
    for r in analysis.retrieval:
        maps = "  ".join(f"mAP@{k} {v:.3f}" for k, v in r.map_at_k.items())
        print(f"  retrieval {r.descriptor:>6}/{r.metric:<9} {r.bytes_per_sample:>5} B/sample  {maps}")
    return 0
