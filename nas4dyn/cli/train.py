"""`nas4dyn train` — train a dynamic once-for-all supernet: every phase, one command, resumable, torchrun-ready."""
from __future__ import annotations

import argparse
import logging
import os
import sys

import torch

from nas4dyn.cli.flags import NON_NEGATIVE
from nas4dyn.train.config import AUTO_DEFAULT_MIN_IMAGES, PRESET_CHOICES


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a supernet (progressive shrinking, then the dynamic phase)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train a supernet through full network -> elastic kernel -> depth -> width -> dynamic "
                    "(exits and gates). Multi-process: torchrun --nproc_per_node=K -m nas4dyn train ...",
    )
    p.add_argument("--space", required=True, help="built-in space name or space file")
    p.add_argument("--data", required=True, help="fashion-mnist, synthetic, or an ImageFolder directory")
    p.add_argument("--out", required=True, help="run directory (supernet.pt, space.json, train_metrics.json, tb/)")
    p.add_argument("--preset", default="auto", choices=PRESET_CHOICES,
                   help=f"training schedule preset; auto: default from {AUTO_DEFAULT_MIN_IMAGES} training images on, "
                        "else quick")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, subnet sampling and data order")
    p.add_argument("--config", help="YAML file of config keys overriding the preset")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. batch_size=128 or phases.width.epochs=2 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt")
    p.add_argument("--data-root", help="folder with the Fashion-MNIST IDX files (default: Debian's location)")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="ImageFolder: leave unreadable image files out (counted in a warning) instead of stopping")
    p.add_argument("--threads", type=NON_NEGATIVE, default=0,
                   help="torch threads per process (0: CPU cores divided by the processes on this node)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="compute device")
    p.set_defaults(run=run)


def _threads(requested: int) -> int:
    if requested > 0:
        return requested
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, usable_cores() // local)


def usable_cores() -> int:
    """The cores this process may run on (taskset, a container's cpuset), not the machine's: more threads
    than cores spin against each other (20x slower steps seen with 2 threads pinned to 1 core)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run(args: argparse.Namespace) -> int:
    # Imported here so `nas4dyn --help` stays fast.
    from nas4dyn.data import load_data
    from nas4dyn.errors import DataError
    from nas4dyn.io import check_writable
    from search_spaces.space import load_space
    from nas4dyn.train.config import build_config, resolve_preset
    from nas4dyn.train.distributed import init_distributed, shutdown
    from nas4dyn.train.trainer import Trainer, summary_table
    from nas4dyn.train.verdict import loud

    preset = args.preset
    config = build_config("default" if preset == "auto" else preset, args.config, args.set)  # bad input: before work
    check_writable(args.out)
    space = load_space(args.space)
    torch.set_num_threads(_threads(args.threads))
    if preset == "auto":
        train_images = len(load_data(args.data, data_root=args.data_root, augment=False,
                                     skip_unreadable=args.skip_unreadable).train)
        preset = resolve_preset(preset, train_images)
        logging.getLogger(__name__).info("--preset auto: %s (%d training images)", preset, train_images)
        config = build_config(preset, args.config, args.set)
    bundle = load_data(args.data, data_root=args.data_root, augment=any(config.augments(p) for p in config.phases),
                       erasing=config.random_erasing, skip_unreadable=args.skip_unreadable)
    if bundle.info.num_classes < 2:
        raise DataError(f"--data {args.data}: {bundle.info.num_classes} class ({', '.join(bundle.info.classes)}); "
                        "training needs at least 2 classes, one sub-folder of images each")
    space = space.with_data(bundle.info.channels, bundle.info.num_classes)
    env = init_distributed(args.device)
    if not env.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # one copy of progress logs, from rank 0
    try:
        metrics = Trainer(space, bundle, config, args.out, seed=args.seed, env=env, resume=args.resume,
                          preset=preset).run()
    finally:
        shutdown(env)
    if env.is_main:
        print(summary_table(metrics))
        print(f"wrote {args.out}/supernet.pt, space.json, train_metrics.json, tb/")
        for warning in metrics.get("warnings", []):
            print(loud(warning["message"]), file=sys.stderr)
    return 0
