"""Where a dynamic export's batch-1 time goes beyond the static path it runs: torch.profiler op calls (and self
CPU ms) per image of each gated variant of bench_export's backbone, beside the same for the frozen static twins of
the images' paths (scripts/path_overhead.py). Op counts are robust to machine load; the ms are not.

Usage: python scripts/bench_path_ops.py [--space fmnist] [--run DIR] [--images 24]
       [--kinds channel,skip,width,emg,dfs,routing,exits] [--top 16] [--gate-group 1]
       [--lock /work/out/core1.lock --timing-cpu 1]
The supernet, its weights and the calibrated variants are scripts/bench_overhead.py's (every mechanism on every
space; ``exits``: bench_export's two exits, 40% of the samples reaching each leave).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import nas4dyn  # noqa: E402
from bench_before_after import grouped  # noqa: E402
from benchlib import timing_cpu  # noqa: E402
from bench_overhead import calibrated, twin_tolerance  # noqa: E402
from nas4dyn.export.torchscript import load_exported, save_torchscript  # noqa: E402
from path_overhead import check_twins, path_twins  # noqa: E402


@torch.no_grad()
def per_image_ops(fn, images: torch.Tensor, passes: int = 2) -> dict[str, tuple[float, float]]:
    """op name -> (calls per image, self CPU ms per image) over ``passes`` passes at batch 1."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(passes):
            for i in range(len(images)):
                fn(i, images[i : i + 1])
    n = passes * len(images)
    return {e.key: (e.count / n, e.self_cpu_time_total / n / 1e3) for e in prof.key_averages()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", default="fmnist")
    ap.add_argument("--run", help="a trained run directory (default: an untrained supernet of --space)")
    ap.add_argument("--gate-group", type=int, default=1, help="channel gates in groups of this many filters")
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--kinds", default="channel,skip,width,emg,dfs,routing,exits", help="mechanisms, comma-separated")
    ap.add_argument("--top", type=int, default=16, help="ops listed per kind (by the dynamic model's self time)")
    ap.add_argument("--lock", help="a lock file to hold (flock) while profiling")
    ap.add_argument("--timing-cpu", type=int, help="the CPU to pin the profiling to")
    args = ap.parse_args()
    torch.set_num_threads(1)
    net, variants, test, mean, std, _, _ = calibrated(args.space, args.run, 300, args.images)
    kinds = {k if k in ("exits", "routing") else f"{k} gates" for k in args.kinds.split(",")}
    variants = {name: arch for name, arch in variants.items() if name in kinds}
    if args.gate_group > 1:
        net = grouped(net, args.gate_group)
    built = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, arch in variants.items():
            save_torchscript(nas4dyn.export_subnet(net, arch, {"mean": mean, "std": std}), Path(tmp) / "m.ts")
            dynamic = load_exported(Path(tmp) / "m.ts")
            index, twins = path_twins(net, arch, mean, std, test)
            check_twins(dynamic, index, twins, test, twin_tolerance(name))
            built[name] = dynamic, index, twins
    with timing_cpu(args.lock, args.timing_cpu):
        for name, (dynamic, index, twins) in built.items():
            for _ in range(3):  # warm-up: TorchScript optimises after its first calls
                for i in range(len(test)):
                    dynamic(test[i : i + 1])
                    twins[index[i]](test[i : i + 1])
            ops = {"dynamic": per_image_ops(lambda i, x: dynamic(x), test),
                   "twins": per_image_ops(lambda i, x: twins[index[i]](x), test)}
            totals = {k: sum(ms for _, ms in v.values()) for k, v in ops.items()}
            print(f"== {name}: self CPU ms/img dynamic {totals['dynamic']:.3f}, twins {totals['twins']:.3f}")
            for op in sorted(ops["dynamic"], key=lambda k: -ops["dynamic"][k][1])[: args.top]:
                (dc, dm), (tc, tm) = ops["dynamic"][op], ops["twins"].get(op, (0.0, 0.0))
                print(f"{op:40s} calls/img {dc:5.1f} vs {tc:5.1f}   ms/img {dm:.3f} vs {tm:.3f}")


if __name__ == "__main__":
    main()
