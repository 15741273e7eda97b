"""Where a gated export's time beyond its static path goes, timed: the per-image decision work of channel, width and
DFS gates, each piece timed alone at the image's own inputs, beside the gap (dynamic − path twins) it explains.

For each mechanism (bench_overhead's calibrated variant of bench_export's backbone) the export is timed at batch 1
against the frozen static twins of each image's path (scripts/path_overhead.py), and in the same rounds, image by
image, the pieces the export adds, each scripted and frozen as the export is and fed the tensors it meets in the
export (captured from the eager subnet, which computes the same values):
- channel gates: the gater (its convs and MLP), the open-filter decision (:meth:`SubNet.open_filters`), and per
  gated block the three weight gathers of ``run_filters`` (w1 and b1 by output filter, w2 by input channel);
- width gates: per gated block the head and its host read (``WidthGatedBlock.choose_one``);
- DFS gates: per gated block the head and its host read (as ``StaticBlock.forward`` at batch 1).
"rest" is the gap the pieces leave: the interpreter's branch selection, calls and whatever the pieces cost less
alone than inside the model. Medians over ``--repeats`` rounds of the per-image means.

Usage: python scripts/bench_decision_cost.py [--run DIR | --space fmnist] [--kinds channel,width,dfs]
       [--images 32] [--repeats 20] [--lock /work/out/core1.lock --timing-cpu 1]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import nas4dyn  # noqa: E402
from bench_overhead import calibrated, twin_tolerance  # noqa: E402
from benchlib import machine_line, timing_cpu  # noqa: E402
from nas4dyn.export.torchscript import load_exported, save_torchscript  # noqa: E402
from path_overhead import check_twins, path_twins  # noqa: E402
from supernet.dynamic.width import WidthGatedBlock  # noqa: E402
from supernet.scripting import freeze_scripted  # noqa: E402
from supernet.static_blocks import StaticBasicBlock  # noqa: E402
from supernet.subnet import SubNet, resize  # noqa: E402


class WidthDecision(nn.Module):
    def __init__(self, block: WidthGatedBlock):
        super().__init__()
        self.block = block

    def forward(self, h: torch.Tensor) -> int:
        return self.block.choose_one(h)


class DFSDecision(nn.Module):
    def __init__(self, gate: nn.Module):
        super().__init__()
        self.gate = gate

    def forward(self, h: torch.Tensor) -> int:
        return int(self.gate.one_sample_logits(h).argmax())


class Gater(nn.Module):
    def __init__(self, gater: nn.Module):
        super().__init__()
        self.gater = gater

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gater(x)


class OpenFilters(nn.Module):
    def __init__(self, subnet: SubNet):
        super().__init__()
        self.subnet = subnet

    def forward(self, gates: torch.Tensor) -> list[torch.Tensor]:
        return self.subnet.open_filters(gates)


class Gathers(nn.Module):
    """The weight gathers of ``StaticBasicBlock.run_filters`` for the open filters ``keep``."""

    def __init__(self, block: StaticBasicBlock):
        super().__init__()
        self.w1, self.b1, self.w2 = block.w1, block.b1, block.w2

    def forward(self, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.w1.index_select(0, keep), self.b1.index_select(0, keep), self.w2.index_select(1, keep)


Piece = tuple[str, Callable[..., Any], tuple]  # (name, frozen module, its input for this image)


@torch.no_grad()
def pieces_per_image(kind: str, subnet: SubNet, images: torch.Tensor) -> list[list[Piece]]:
    """For each image (normalised, batch 1), the decision pieces the export runs for it, with their inputs."""
    frozen: dict[int, Callable] = {}

    def script(key: nn.Module, wrap: Callable[[], nn.Module]) -> Callable:
        if id(key) not in frozen:
            frozen[id(key)] = freeze_scripted(wrap().eval(), ())
        return frozen[id(key)]

    seen: list[list[tuple[nn.Module, torch.Tensor]]] = []  # per image: (block, its input) in the order run
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen[-1].append((mod, args[0])))
             for seg in subnet.segments for m in seg.blocks]
    try:
        for i in range(len(images)):
            seen.append([])
            subnet(images[i : i + 1])
    finally:  # before scripting: TorchScript would try to compile the hooks
        for h in hooks:
            h.remove()
    out = []
    for i, inputs in enumerate(seen):
        pieces: list[Piece] = []
        if kind == "channel gates":
            x = resize(images[i : i + 1], subnet.resolution)  # the gater's input (SubNet._prepare)
            gates = subnet.gater(x)
            pieces.append(("gater", script(subnet.gater, lambda: Gater(subnet.gater)), (x,)))
            pieces.append(("open_filters", script(subnet, lambda: OpenFilters(subnet)), (gates,)))
            keeps = subnet.open_filters(gates)
            left = int(subnet.forward_with_exits(images[i : i + 1])[1])
            # Slotted blocks run through run_kept, which the hooks do not see; every block before the exit runs.
            for blk in (b for seg in subnet.segments[: left + 1] for b in seg.blocks):
                if getattr(blk, "keep_slot", -1) >= 0:
                    if not isinstance(blk, StaticBasicBlock):
                        raise SystemExit(f"channel gates: gathers timed for basic blocks only, not {type(blk)}")
                    pieces.append(("weight gathers", script(blk, lambda: Gathers(blk)), (keeps[blk.keep_slot],)))
        for blk, h in inputs:
            if kind == "width gates" and isinstance(blk, WidthGatedBlock):
                pieces.append(("width head + host read", script(blk, lambda: WidthDecision(blk)), (h,)))
            elif kind == "dfs gates" and getattr(blk, "dfs_gate", None) is not None:
                pieces.append(("DFS head + host read", script(blk, lambda: DFSDecision(blk.dfs_gate)), (h,)))
        out.append(pieces)
    return out


def _timed(fn: Callable, *args: Any) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


@torch.no_grad()
def time_rounds(dynamic: Callable, index: list[int], twins: list, images: torch.Tensor,
                pieces: list[list[Piece]], repeats: int) -> dict[str, list[float]]:
    """Per round, ms per image of the dynamic model, of the twins and of each piece name (summed over its calls)."""
    names = list(dict.fromkeys(name for p in pieces for name, _, _ in p))
    for _ in range(3):  # warm-up: TorchScript optimises a graph after its first calls
        for i in range(len(images)):
            dynamic(images[i : i + 1]), twins[index[i]](images[i : i + 1])
            for _, fn, args in pieces[i]:
                fn(*args)
    rounds: dict[str, list[float]] = {k: [] for k in ["dynamic", "twins", *names]}
    for _ in range(repeats):
        total = dict.fromkeys(rounds, 0.0)
        for i in range(len(images)):
            x = images[i : i + 1]
            total["dynamic"] += _timed(dynamic, x)
            total["twins"] += _timed(twins[index[i]], x)
            for name, fn, args in pieces[i]:
                total[name] += _timed(fn, *args)
        for k, v in total.items():
            rounds[k].append(v * 1e3 / len(images))
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
    norm = (test - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    built = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            exported = nas4dyn.export_subnet(net, variants[kind], {"mean": mean, "std": std})
            save_torchscript(exported, Path(tmp) / "m.ts")
            dynamic = load_exported(Path(tmp) / "m.ts")
            index, twins = path_twins(net, variants[kind], mean, std, test)
            check_twins(dynamic, index, twins, test, twin_tolerance(kind))
            built[kind] = dynamic, index, twins, pieces_per_image(kind, exported.subnet, norm)
    print(f"{net.space.name}, {weights}; {source} images; {machine_line(1)}; {args.images} images, "
          f"{args.repeats} rounds on CPU {args.timing_cpu}")
    print("| mechanism | dynamic ms/img | twins ms/img | gap ms/img | piece: calls/img, ms/img (µs/call) "
          "| rest ms/img |")
    print("|---|---|---|---|---|---|")
    with timing_cpu(args.lock, args.timing_cpu):
        for kind, (dynamic, index, twins, pieces) in built.items():
            rounds = time_rounds(dynamic, index, twins, test, pieces, args.repeats)
            med = {k: statistics.median(v) for k, v in rounds.items()}
            gap = statistics.median(d - t for d, t in zip(rounds["dynamic"], rounds["twins"]))
            parts = []
            for name in list(rounds)[2:]:
                calls = sum(1 for p in pieces for n, _, _ in p if n == name) / len(pieces)
                parts.append(f"{name}: {calls:.1f}, {med[name]:.3f} ({med[name] / calls * 1e3:.1f})")
            rest = gap - sum(med[name] for name in list(rounds)[2:])
            print(f"| {kind} | {med['dynamic']:.3f} | {med['twins']:.3f} | {gap:.3f} | {'; '.join(parts)} "
                  f"| {rest:.3f} |", flush=True)


if __name__ == "__main__":
    main()
