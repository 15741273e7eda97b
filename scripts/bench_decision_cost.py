"""Where a gated export's time beyond its static path goes, in place: each image's export is timed beside the same
export with its decision heads replaced by the image's own decisions as constants ("decided"), and beside the
frozen static twin of its path (scripts/path_overhead.py).

- dynamic − decided: what computing the decisions costs inside the model — channel gates: the gater (its convs
  and MLP); width and DFS gates: each gated block's head MLP (its pooling sum, two matmuls, the ReLU).
- decided − twin: what running a decided path costs beyond the static path — channel gates: the open-filter
  decision (:meth:`SubNet.open_filters`: compare, cumsum, gathers, one host read) and the 27 weight gathers of
  the narrowed convs; width and DFS gates: each head's argmax and host read, and the branch selection.
The decided models are the export's own code (scripted and frozen as it is); only the decision modules are
swapped for constants of the same shape, so the rest runs the same ops. Mechanisms: bench_overhead's calibrated
variants of bench_export's backbone. Timing at batch 1, per image the three models in a shuffled order, each
called twice and timed the second time, so that its weights are in cache as a deployed model's are (each path
model holds its own frozen copy: 2.7 MB each on fmnist, ~65 models against a 32 MB L3 cache). Medians over
``--repeats`` rounds of the per-image means. This harness times every model ~1.5x slower than bench_overhead
does (docs/BENCHMARKS.md, session 17; cause not found): read the split, not the absolute times.

Usage: python scripts/bench_decision_cost.py [--run DIR | --space fmnist] [--kinds channel,width,dfs]
       [--images 32] [--repeats 20] [--lock /work/out/core1.lock --timing-cpu 1]
"""
from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import nas4dyn  # noqa: E402
from bench_overhead import calibrated, twin_tolerance  # noqa: E402
from benchlib import machine_line, timing_cpu  # noqa: E402
from path_overhead import check_twins, path_twins, timed  # noqa: E402
from nas4dyn.export.runtime import ExportedModel  # noqa: E402
from supernet.dynamic.width import WidthGatedBlock  # noqa: E402
from supernet.scripting import freeze_scripted  # noqa: E402
from supernet.subnet import resize  # noqa: E402


class ConstantGate(nn.Module):
    """Stands in for a gate head (skip / width / DFS) or the global gater: returns ``logits`` (1 x options) for
    any input, through every method the export calls on them."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("value", logits.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value.expand(x.shape[0], -1)

    @torch.jit.export
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.value.expand(x.shape[0], -1)

    @torch.jit.export
    def one_sample_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.value


@torch.no_grad()
def decided(exported: ExportedModel, kind: str, image: torch.Tensor) -> nn.Module:
    """A copy of ``exported`` whose decision modules return what they return for ``image`` (in [0, 1])."""
    model = copy.deepcopy(exported)
    sub = model.subnet
    x = resize((image - model.mean) / model.std, sub.resolution)
    if kind == "channel gates":
        sub.gater = ConstantGate(sub.gater(x))
        return model
    heads = []  # (block, attribute holding its head)
    for seg in sub.segments:
        for blk in seg.blocks:
            if kind == "width gates" and isinstance(blk, WidthGatedBlock):
                heads.append((blk, "gate"))
            elif kind == "dfs gates" and getattr(blk, "dfs_gate", None) is not None:
                heads.append((blk, "dfs_gate"))
    seen: dict[nn.Module, torch.Tensor] = {}

    def record(mod: nn.Module, args: tuple) -> None:  # returns None: a pre-hook's result would replace the input
        seen.setdefault(mod, args[0])

    hooks = [blk.register_forward_pre_hook(record) for blk, _ in heads]
    try:
        sub(x)
    finally:  # before scripting: TorchScript would try to compile the hooks
        for h in hooks:
            h.remove()
    for blk, attr in heads:
        if blk in seen:  # blocks the image does not reach keep their heads: they do not run
            setattr(blk, attr, ConstantGate(getattr(blk, attr).one_sample_logits(seen[blk])))
    return model


@torch.no_grad()
def time_rounds(models: dict[str, list], index: list[int], images: torch.Tensor, repeats: int
                ) -> dict[str, list[float]]:
    """Per round, ms per image of each kind of model (``models[name][index[i]]`` runs image i)."""
    order = random.Random(0)
    for _ in range(3):  # warm-up: TorchScript optimises a graph after its first calls
        for i in range(len(images)):
            for name in models:
                models[name][index[i]](images[i : i + 1])
    rounds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        total = dict.fromkeys(models, 0.0)
        for i in range(len(images)):
            names = list(models)
            order.shuffle(names)
            for name in names:
                model, x = models[name][index[i]], images[i : i + 1]
                model(x)  # untimed: its weights in cache, as a deployed model's are (see the module docstring)
                total[name] += timed(model, x)
        for name, t in total.items():
            rounds[name].append(t * 1e3 / len(images))
    return rounds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", default="fmnist", help="the space (with --run: the run's)")
    ap.add_argument("--run", help="a trained run directory (default: an untrained supernet of --space)")
    ap.add_argument("--kinds", default="channel,width,dfs", help="gate kinds, comma-separated")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--lock", help="a lock file to hold (flock) while timing")
    ap.add_argument("--timing-cpu", type=int, help="the CPU to pin the timing to")
    args = ap.parse_args()
    kinds = [f"{k} gates" for k in args.kinds.split(",")]
    unknown = [k for k in kinds if k not in ("channel gates", "width gates", "dfs gates")]
    if unknown:
        raise SystemExit(f"--kinds: {', '.join(unknown)} not timed here (channel, width, dfs)")
    torch.set_num_threads(1)
    net, variants, test, mean, std, weights, source = calibrated(args.space, args.run, 1000, args.images)
    built = {}
    for kind in kinds:
        exported = nas4dyn.export_subnet(net, variants[kind], {"mean": mean, "std": std})
        dynamic = freeze_scripted(exported, ())
        index, twins = path_twins(net, variants[kind], mean, std, test)
        check_twins(dynamic, index, twins, test, twin_tolerance(kind))
        first = {t: index.index(t) for t in range(len(twins))}  # one image per path decides its decided model
        fixed = [freeze_scripted(decided(exported, kind, test[first[t]]), ()) for t in range(len(twins))]
        check_twins(dynamic, index, fixed, test, twin_tolerance(kind))
        built[kind] = {"dynamic": [dynamic] * len(twins), "decided": fixed, "twin": twins}, index
        print(f"{kind}: {len(twins)} distinct paths", flush=True)
    print(f"{net.space.name}, {weights}; {source} images; {machine_line(1)}; {args.images} images, "
          f"{args.repeats} rounds on CPU {args.timing_cpu}")
    print("| mechanism | dynamic ms/img | decided ms/img | twin ms/img | deciding (dynamic − decided) "
          "| running decided (decided − twin) | overhead (dynamic ÷ twin) |")
    print("|---|---|---|---|---|---|---|")
    with timing_cpu(args.lock, args.timing_cpu):
        for kind, (models, index) in built.items():
            rounds = time_rounds(models, index, test, args.repeats)
            med = {k: statistics.median(v) for k, v in rounds.items()}
            deciding = statistics.median(d - f for d, f in zip(rounds["dynamic"], rounds["decided"]))
            running = statistics.median(f - t for f, t in zip(rounds["decided"], rounds["twin"]))
            ratio = statistics.median(d / t for d, t in zip(rounds["dynamic"], rounds["twin"]))
            print(f"| {kind} | {med['dynamic']:.3f} | {med['decided']:.3f} | {med['twin']:.3f} | {deciding:.3f} "
                  f"| {running:.3f} | {ratio:.3f} |", flush=True)


if __name__ == "__main__":
    main()
