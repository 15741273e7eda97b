"""Benchmark: does the exported model turn skipped MACs into saved time? CPU, batch 1, one run.

1. The exported static subnet (``model.ts``) against a hand-written plain PyTorch twin with the same weights:
   the export must cost nothing (ratio <= 1.03).
2. Dynamic subnets of the same backbone — exits only, and each gate kind the space offers on every block that
   allows it (channel, skip, width, EMG, DFS gates; CIGT routing with the most paths) — against the static twin
   scripted and frozen as the exports are (their runtime; freezing folds BatchNorm into the convs): speed-up ÷
   MAC reduction, i.e. (twin latency ÷ mean per-sample latency) ÷ (twin MACs ÷ realized mean MACs). MACs are
   counted with FlopCounterMode on every timed image at batch 1 (it does not see DFS's int8 convs).
3. Path-equivalent overhead of each dynamic subnet (scripts/path_overhead.py): its time ÷ the time of the
   frozen static twins of the paths it takes, at batch 1 and at ``--batch``. Goal at batch 1: <= 1.05 for
   exits, skip and width gates, <= 1.10 for the others.

The backbone is ``--space``'s largest subnet with every block at the middle kernel choice (fmnist: 5/5/3),
at the largest resolution; images are Fashion-MNIST for the one-channel 28 x 28 spaces, synthetic otherwise.
Untrained weights are used (or a trained run with ``--run``); exit thresholds and gate biases are calibrated
on validation images so that a real share of samples exits early or closes gates: each exit's threshold is
set so that ``--exit-share`` of the samples reaching it leave, and each gate's bias (EMG: threshold) so that
it is on for half of the images (channel-, skip-, width- and DFS-gate logits are first scaled so that the
decisions vary per image; a width or DFS gate's options then win about equally often).
Timings: each model runs over the same ``--samples`` test images, the models taking turns image by image, median
over ``--repeats`` passes.

Usage: python scripts/bench_export.py [--space fmnist] [--threads 1] [--repeats 7] [--samples 300]
       [--path-samples 96] [--batch 32] [--write]
With --write the table replaces the "Export" section of docs/BENCHMARKS.md ("Export (SPACE)" for other spaces).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import nas4dyn  # noqa: E402
from benchlib import machine_line, replace_section  # noqa: E402
from path_overhead import check_twins, path_overhead, path_twins  # noqa: E402
from nas4dyn.export.measure import collect, realized_macs, unnormalised  # noqa: E402
from nas4dyn.export.torchscript import load_exported, save_torchscript  # noqa: E402
from search_spaces.arch import Arch, ExitChoice  # noqa: E402
from search_spaces.space import SearchSpace  # noqa: E402
from supernet.dynamic.dfs import DFSGate  # noqa: E402
from supernet.dynamic.emg import EMGGate  # noqa: E402
from supernet.dynamic.gates import SkipGate  # noqa: E402
from supernet.dynamic.width import WidthGate  # noqa: E402
from supernet.network import Supernet  # noqa: E402
from nas4dyn.train.sampling import gated  # noqa: E402


def backbone(space: SearchSpace) -> Arch:
    """Every stage at full depth and width, every block at its stage's middle kernel choice (fmnist: 5/5/3),
    the largest resolution, no exits and no gates."""
    top = space.max_arch()
    kernels = tuple((st.kernels[(len(st.kernels) - 1) // 2],) * d for st, d in zip(space.stages, top.depths))
    return dataclasses.replace(top, kernels=kernels)


# ---- the hand-written twin ----------------------------------------------------------------------------------
class TwinBlock(nn.Module):
    """A residual block written out plainly: conv-BN-ReLU-conv-BN, plus shortcut, ReLU."""

    def __init__(self, cin: int, hidden: int, cout: int, k: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, hidden, k, stride, k // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, cout, k, 1, k // 2, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.shortcut(x) + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class Twin(nn.Module):
    """The static backbone as a plain network: normalise, stem, blocks, classifier head."""

    def __init__(self, space, arch: Arch, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        c = space.stem_channels
        self.stem = nn.Sequential(nn.Conv2d(space.input_channels, c, 3, space.stem_stride, 1, bias=False),
                                  nn.BatchNorm2d(c), nn.ReLU())
        blocks = []
        for blk in arch.blocks():
            st = space.stages[blk.stage]
            blocks.append(TwinBlock(c, blk.width, st.out_channels, blk.kernel, st.stride if blk.block == 0 else 1))
            c = st.out_channels
        self.blocks = nn.Sequential(*blocks)
        hidden = space.head_channels
        self.head = nn.Sequential(nn.Conv2d(c, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU()) if hidden else nn.Sequential()
        self.fc = nn.Linear(hidden or c, space.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem((x - self.mean) / self.std))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.head(h), 1), 1))

    def copy_from(self, sub: nn.Module) -> "Twin":
        """Take the weights of an extracted static subnet (same layers, same order)."""
        src = [m for m in sub.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))]
        dst = [m for m in self.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))]
        assert len(src) == len(dst), (len(src), len(dst))
        for s, d in zip(src, dst):
            d.load_state_dict(s.state_dict())
        return self.eval()


# ---- calibration --------------------------------------------------------------------------------------------
def between(values: torch.Tensor, share: float) -> torch.Tensor:
    """Per column, a value with ``share`` of the rows above it, halfway between two observed values."""
    ordered = values.sort(0).values
    k = min(len(values) - 1, max(1, int(len(values) * (1 - share))))
    return (ordered[k - 1] + ordered[k]) / 2


@torch.no_grad()
def calibrate_exits(net: Supernet, arch: Arch, x: torch.Tensor, share: float) -> Arch:
    """Thresholds such that ``share`` of the samples that reach each exit leave there."""
    net.set_active(arch)
    outs = net.forward_all(x)[:-1]
    alive = torch.ones(len(x), dtype=torch.bool)
    thresholds = []
    for logits in outs:
        conf = torch.softmax(logits, 1).max(1).values
        t = float(between(conf[alive], share))
        thresholds.append(t)
        alive &= conf < t
    return arch.with_thresholds(thresholds)


def _outputs(net: Supernet, arch: Arch, kind: type, x: torch.Tensor, record: Any = None) -> dict[nn.Module, torch.Tensor]:
    """What each ``kind`` module outputs (or ``record(module, inputs, output)`` gives) under ``arch`` on ``x``."""
    seen: dict[nn.Module, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda m, i, o: seen.__setitem__(m, record(m, i, o) if record else o))
             for m in net.modules() if type(m) is kind]
    net.set_active(arch)
    net.forward_all(x)
    for h in hooks:
        h.remove()
    return seen


@torch.no_grad()
def calibrate_gates(net: Supernet, variants: dict[str, Arch], x: torch.Tensor, scale: float = 10.0) -> None:
    """Put each gate's median logit at 0 (on for half of ``x``): the global gater's rows, and the skip and
    width gates (under the ``variants`` holding them) after scaling their logits so that decisions vary per
    image (a width gate's options then win about equally often); the EMG thresholds at each filter's median
    small-kernel response."""
    net.gater.fc2.weight.mul_(scale)
    net.gater.fc2.bias.sub_(between(net.gater(x), 0.5))
    for name, kind in (("skip gates", SkipGate), ("width gates", WidthGate), ("dfs gates", DFSGate)):
        for gate, out in _outputs(net, variants[name], kind, x).items() if name in variants else ():
            out = out.view(len(x), -1)
            gate.fc2.weight.mul_(scale)
            if out.shape[1] == 1:
                gate.fc2.bias.copy_(-between(scale * (out - gate.fc2.bias), 0.5))
            else:  # each option's margin over the options' mean centred: every option wins for some images
                gate.fc2.bias.mul_(scale).sub_(between(scale * (out - out.mean(1, keepdim=True)), 0.5))
    if "emg gates" in variants:
        record = lambda gate, inputs, _: gate.small_response(*inputs).mean(dim=(2, 3))  # noqa: E731
        for gate, response in _outputs(net, variants["emg gates"], EMGGate, x, record).items():
            gate.threshold[: response.shape[1]] = between(response, 0.5)


# ---- measurement --------------------------------------------------------------------------------------------
@torch.no_grad()
def timed_passes(models: dict[str, nn.Module], images: torch.Tensor, repeats: int) -> dict[str, torch.Tensor]:
    """Seconds per image, ``repeats`` x images, for each model at batch 1. Models take turns image by image
    (in a shuffled order), so load from other processes hits every model alike."""
    times = {k: torch.zeros(repeats, len(images), dtype=torch.float64) for k in models}
    singles = [images[i : i + 1] for i in range(len(images))]
    names = list(models)
    order = random.Random(0)
    for model in models.values():  # warm-up
        for x in singles[:20]:
            model(x)
    for r in range(repeats):
        for i, x in enumerate(singles):
            order.shuffle(names)
            for name in names:
                start = time.perf_counter()
                models[name](x)
                times[name][r, i] = time.perf_counter() - start
    return times


@torch.no_grad()
def conv_scaling(sub: nn.Module, share: float = 0.5, calls: int = 200) -> tuple[float, float]:
    """(ms, ms): the block convs of an extracted static subnet at batch 1 with all filters, and with ``share``
    of each block's hidden filters (its first conv's outputs and its second conv's inputs), as a channel gate
    leaves them; 10th percentile of ``calls`` timed calls each, weights gathered outside the timing."""
    x = torch.rand(1, sub.stem[0].in_channels, sub.resolution, sub.resolution)
    h = sub.stem(x)
    full = narrow = 0.0

    def best(fn: Any) -> float:
        fn()
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return sorted(times)[calls // 10] * 1e3

    for blk in (b for seg in sub.segments for b in seg.blocks):
        c1, c2 = blk.conv1, blk.conv2
        mid = c1(h)
        keep = torch.arange(0, c1.out_channels, round(1 / share))
        w1, w2, mid_k = c1.weight.index_select(0, keep), c2.weight.index_select(1, keep), mid.index_select(1, keep)
        full += best(lambda: (c1(h), c2(mid)))
        narrow += best(lambda: (F.conv2d(h, w1, None, c1.stride, c1.padding), F.conv2d(mid_k, w2, None, 1, c2.padding)))
        h = blk(h, torch.zeros(1, 0))
    return full, narrow


def load_images(space: SearchSpace, n_val: int, n_test: int) -> tuple[torch.Tensor, torch.Tensor, list[float], list[float], str]:
    """(calibration images, timed images, mean, std, source) in [0, 1]: Fashion-MNIST if installed and the space
    takes one-channel 28 x 28 images, synthetic images of the space's shape otherwise."""
    from nas4dyn.data import load_data, make_loader
    from nas4dyn.errors import DataError

    res = max(space.resolutions)
    synthetic = {"resolution": res, "channels": space.input_channels, "n_train": 2 * n_val, "n_test": n_test}
    try:
        if (space.input_channels, res) != (1, 28):
            raise DataError("not a Fashion-MNIST-shaped space")
        bundle, source = load_data("fashion-mnist", augment=False), "Fashion-MNIST"
    except DataError:
        bundle, source = load_data("synthetic", augment=False, synthetic=synthetic), "synthetic"
    info = bundle.info
    val, _ = collect(unnormalised(make_loader(bundle.val, 256, limit=n_val), info.mean, info.std), n_val)
    test, _ = collect(unnormalised(make_loader(bundle.test, 256, limit=n_test), info.mean, info.std), n_test)
    return val, test, list(info.mean), list(info.std), source


def net_and_images(space_name: str, run: str | None, n_val: int, n_test: int
                   ) -> tuple[Supernet, torch.Tensor, torch.Tensor, list[float], list[float], str]:
    """(supernet in eval mode, calibration images, timed images, mean, std, image source): the trained run's
    supernet and input normalisation, or an untrained supernet of ``space_name``; images as ``load_images``."""
    if run:
        from nas4dyn.api import load_supernet_file

        net, info = load_supernet_file(Path(run) / "supernet.pt")
    else:
        net, info = nas4dyn.build_supernet(nas4dyn.load_space(space_name)).eval(), None
    val, test, mean, std, source = load_images(net.space, n_val, n_test)
    if info:
        mean, std = list(info["mean"]), list(info["std"])
    return net, val, test, mean, std, source


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", default="fmnist", help="the space whose backbone is exported (with --run: the run's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--samples", type=int, default=300, help="test images timed at batch 1")
    ap.add_argument("--exit-share", type=float, default=0.4, help="share of the samples reaching an exit that leave")
    ap.add_argument("--path-samples", type=int, default=96,
                    help="test images (of --samples) whose path twins are built for the path-equivalent overhead")
    ap.add_argument("--batch", type=int, default=32, help="the larger batch size of the path-equivalent overhead")
    ap.add_argument("--run", help="a trained run directory (default: an untrained supernet of --space)")
    ap.add_argument("--write", action="store_true", help="write the table into docs/BENCHMARKS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_start = os.getloadavg()[0]
    net, val, test, mean, std, source = net_and_images(args.space, args.run, 1000, args.samples)
    space = net.space
    base_arch = backbone(space)
    norm = lambda t: (t - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)  # noqa: E731
    info = {"mean": mean, "std": std}

    exits = tuple(ExitChoice(s, b, 1.0) for s, b in space.exits.positions if b == 1)[:2]
    variants = {
        "exits": calibrate_exits(net, dataclasses.replace(base_arch, exits=exits), norm(val), args.exit_share),
        "channel gates": gated(space, base_arch, "channel"),
        "skip gates": gated(space, base_arch, "skip"),
        "width gates": gated(space, base_arch, "width"),
    }
    for kind in ("emg", "dfs"):  # where the space offers them
        if gated(space, base_arch, kind) != base_arch:
            variants[f"{kind} gates"] = gated(space, base_arch, kind)
    if any(len(st.paths) > 1 for st in space.stages):
        variants["routing"] = dataclasses.replace(base_arch, paths=tuple(max(st.paths) for st in space.stages))
    calibrate_gates(net, variants, norm(val))

    with tempfile.TemporaryDirectory() as tmp:
        def exported(arch: Arch, name: str) -> torch.jit.ScriptModule:
            save_torchscript(nas4dyn.export_subnet(net, arch, info), Path(tmp) / f"{name}.ts")
            return load_exported(Path(tmp) / f"{name}.ts")

        twin = Twin(space, base_arch, mean, std).copy_from(net.extract(base_arch).eval())
        models = {"twin": twin, "twin (TorchScript, frozen)": torch.jit.freeze(torch.jit.script(twin)),
                  "static export": exported(base_arch, "static")}
        models.update({name: exported(arch, name.replace(" ", "_")) for name, arch in variants.items()})
        with torch.no_grad():
            assert (twin(test) - models["static export"](test)).abs().max() <= 1e-4, "twin differs from the export"
        macs = {name: realized_macs(model, test, 1) for name, model in models.items()}
        exit_rates = models["exits"].forward_with_exits(test)[1].bincount(minlength=len(exits) + 1).double() / len(test)
        gate_rates = {name: float(models[name].gate_decisions(test).float().mean()) for name in variants
                      if "gates" in name and name != "dfs gates"}
        times = timed_passes(models, test, args.repeats)
        conv_full, conv_half = conv_scaling(net.extract(base_arch).eval())
        few = test[: args.path_samples]
        overhead = {}
        for name, arch in variants.items():
            index, twins = path_twins(net, arch, mean, std, few)
            check_twins(models[name], index, twins, few)
            overhead[name] = [path_overhead(models[name], index, twins, few, args.repeats, b) for b in (1, args.batch)]

    load_end = os.getloadavg()[0]
    print("raw:", {"macs": macs, "overhead": {k: [vars(o) for o in v] for k, v in overhead.items()},
                   "ms": {k: (v.mean(1) * 1e3).tolist() for k, v in times.items()}}, flush=True)
    per_pass = {k: (v.mean(1) * 1e3).tolist() for k, v in times.items()}  # mean ms per image, each pass
    med = {k: statistics.median(v) for k, v in per_pass.items()}
    spread = {k: (max(v) - min(v)) / med[k] for k, v in per_pass.items()}
    # Noise-robust cross-check: each image's fastest pass, averaged over the images.
    floor = {k: float(v.min(0).values.mean() * 1e3) for k, v in times.items()}
    cmd = (f"python scripts/bench_export.py --space {space.name} --threads {args.threads} --repeats {args.repeats} --samples {args.samples} "
           f"--exit-share {args.exit_share} --path-samples {args.path_samples} --batch {args.batch}"
           f"{' --run ' + args.run if args.run else ''}{' --write' if args.write else ''}")
    lines = [
        f"Command: `{cmd}` — {machine_line(args.threads)}",
        "",
        f"Backbone: {space.name} depths {list(base_arch.depths)}, kernels "
        f"{'/'.join(str(ks[0]) for ks in base_arch.kernels)}, full widths, {base_arch.resolution} x "
        f"{base_arch.resolution} input, "
        f"{'trained run ' + args.run if args.run else 'untrained weights'}; {len(test)} {source} test images timed "
        f"one by one (batch 1), median of {args.repeats} interleaved passes; thresholds and gate biases calibrated "
        f"on 1000 validation images. Exit rates {', '.join(f'{r:.2f}' for r in exit_rates.tolist())} "
        f"(exits after blocks {' and '.join(f'{e.stage}.{e.block}' for e in exits)}, then final); share of gates "
        f"on: {', '.join(f'{k.split()[0]} {v:.2f}' for k, v in gate_rates.items())}. The cores were shared with other jobs (1-minute load average "
        f"{load_start:.1f} at the start, {load_end:.1f} at the end): \"pass spread\" is (slowest - fastest pass) ÷ "
        "median, and the last column, each image's fastest pass averaged over the images, is a noise-robust "
        "cross-check of the medians. Realized MACs count every conv and matmul that ran, the gater and the exit "
        "heads included.",
        "",
        "| model | MMACs/img (realized, FlopCounterMode) | ms/img (median of passes) | pass spread | "
        "ms/img (per-image best pass) |",
        "|---|---|---|---|---|",
    ]
    for name in models:
        lines.append(f"| {name} | {macs[name] / 1e6:.2f} | {med[name]:.3f} | {spread[name]:.1%} | {floor[name]:.3f} |")
    static_ratio = med["static export"] / med["twin"]
    base = "twin (TorchScript, frozen)"  # the static reference of the dynamic ratios: same runtime as the exports
    lines += ["", f"Exported static ÷ plain twin: **{math.ceil(static_ratio * 1000) / 1000:.3f}** (goal ≤ 1.03) — "
                  f"{'met' if static_ratio <= 1.03 else 'NOT met'}; ÷ the scripted, frozen twin: "
                  f"{med['static export'] / med[base]:.3f} (per-image best passes: "
                  f"{floor['static export'] / floor['twin']:.3f} and {floor['static export'] / floor[base]:.3f}).", "",
              "Dynamic subnets against the twin scripted and frozen like the exports (so that TorchScript's lower call "
              "overhead and the folded BatchNorms are not counted as "
              "a saving of the dynamic model):", "",
              "| dynamic | MAC reduction (twin ÷ realized) | speed-up (twin ÷ dynamic) | speed-up ÷ MAC reduction | goal "
              "≥ 0.8 (0.9) | same from per-image best passes |",
              "|---|---|---|---|---|---|"]
    for name in variants:
        mac_red, speed = macs[base] / macs[name], med[base] / med[name]
        ratio = speed / mac_red
        verdict = "goal met" if ratio >= 0.9 else ("≥ 0.8 met" if ratio >= 0.8 else "NOT met")
        lines.append(f"| {name} | {mac_red:.2f}× | {speed:.2f}× | **{math.floor(ratio * 1000) / 1000:.3f}** | {verdict} | "
                     f"{math.floor(floor[base] / floor[name] / mac_red * 1000) / 1000:.3f} |")
    lines += ["", f"Path-equivalent overhead: each dynamic model's time ÷ the time of the frozen static twins of the paths "
                  f"it takes (same exit, same open filters / kernel sizes / width / branch, no gater, gate heads, "
                  f"passed exit heads or gathers; scripts/path_overhead.py), on the first {len(few)} test images; "
                  f"batch {args.batch}: per batch, the twins run once per distinct path on that path's images. "
                  "Medians of the per-pass ratios (spread: (largest - smallest) ÷ median). Goal at batch 1: ≤ 1.05 "
                  "for exits, skip and width gates, ≤ 1.10 for the others.", "",
              f"| dynamic | distinct paths | ms/img dynamic (b1) | ms/img twins (b1) | overhead b1 | spread | goal | "
              f"overhead b{args.batch} |",
              "|---|---|---|---|---|---|---|---|"]
    for name, (one, many) in overhead.items():
        goal = 1.05 if name.split()[0] in ("exits", "skip", "width") else 1.10
        lines.append(f"| {name} | {one.paths} | {one.dynamic_ms:.3f} | {one.twins_ms:.3f} | **{one.ratio:.3f}** | "
                     f"{one.spread:.1%} | ≤ {goal:.2f} {'met' if one.ratio <= goal else 'NOT met'} | {many.ratio:.3f} |")
    channel_speed = med[base] / med["channel gates"]
    lines += ["", f"Channel gates at {macs['channel gates'] / macs[base]:.2f}× the static twin's MACs run "
                  f"{channel_speed:.2f}× as fast as it at batch 1 ({'not slower' if channel_speed >= 1 else 'SLOWER'}). "
                  f"The block convs alone take {conv_full:.3f} ms per image with every filter and {conv_half:.3f} ms "
                  f"with half of each block's hidden filters ({conv_half / conv_full:.2f}× the time for 0.5× the "
                  "MACs; 10th percentile of 200 calls each): a narrower conv's time falls less than its MACs at "
                  "batch 1 on this CPU, whatever the gating costs."]
    table = "\n".join(lines)
    print(table)
    if args.write:
        title = "Export" if space.name == "fmnist" else f"Export ({space.name})"
        replace_section(Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md", title, table)


if __name__ == "__main__":
    main()
