"""Benchmark: the seed papers' mechanisms on a trained `fmnist_dynamic_all` supernet, each against the same
subnet without it — accuracy, realized MACs, measured latency, and whether the exported model's saving in time
follows its saving in MACs.

One backbone (every stage at full depth, 5x5 kernels in the first two stages, full widths, 28 x 28), with on
every block that allows it: channel gates (GaterNet), skip gates, EMG gates (EMGNet), DFS gates (skip / int8 /
fp32), and the same DFS gates forced to int8 on every input (the int8 path as it is, whatever the trained
gates prefer); and CIGT routing with the most paths per stage. For each: test accuracy of the supernet's dynamic eval
(after BN recalibration), decision rates (share of gates on; DFS: mean BitOPs relative to fp32 and the share
of each option; routers: share of samples per path), realized MACs per image of the exported TorchScript model
(FlopCounterMode at batch 1; for DFS the cost model's count, because FlopCounterMode does not see quantized
convolutions — int8 multiply-adds are counted as MACs and their BitOPs reported beside), and its latency at
batch 1 (median of interleaved passes over the same test images). Ratio = (static ms ÷ dynamic ms) ÷ (static
MACs ÷ dynamic MACs), the export issue's measure; goal >= 0.8 for routing and EMG gates.

Usage: python scripts/bench_mechanisms.py --run RUN_DIR [--threads 1] [--repeats 5] [--samples 200] [--write]
(RUN_DIR: `nas4dyn train --space fmnist_dynamic_all --data fashion-mnist --preset quick --out RUN_DIR`).
With --write the table replaces the "Dynamic mechanisms" section of docs/BENCHMARKS.md.

       python scripts/bench_mechanisms.py --run RUN_DIR --front OUT [--backbones 16] [--gated-every 2]
              [--lock FILE --timing-cpu 1]
(any trained run): the measured accuracy-latency front by mechanism, see scripts/mechanism_front.py;
OUT/front_timed.json, OUT/front.png and a Markdown table on stdout.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import nas4dyn  # noqa: E402
from bench_export import backbone, load_images, timed_passes  # noqa: E402
from benchlib import machine_line, replace_section, timing_cpu  # noqa: E402
from mechanism_front import front_table, measure_front, plot_front  # noqa: E402
from nas4dyn.api import load_supernet_file  # noqa: E402
from nas4dyn.data import load_data, make_loader  # noqa: E402
from nas4dyn.export.measure import realized_macs  # noqa: E402
from nas4dyn.export.torchscript import load_exported, save_torchscript  # noqa: E402
from search_spaces.arch import Arch  # noqa: E402
from supernet.dynamic.dfs import DFS_OPTIONS, DFS_RELATIVE_COST, DFSGate  # noqa: E402
from nas4dyn.train.bn import recalibrate_bn  # noqa: E402
from nas4dyn.train.evaluation import accuracy_and_rates  # noqa: E402
from nas4dyn.train.sampling import gated  # noqa: E402

SPACE = "fmnist_dynamic_all"
GOALS = {"routing": 0.8, "emg gates": 0.8}


def variants(space) -> dict[str, Arch]:
    base = backbone(space)  # the export benchmark's backbone, in this space
    out = {"static": base}
    for kind in ("channel", "skip", "emg", "dfs"):
        out[f"{kind} gates"] = gated(space, base, kind)
    out["dfs gates forced to int8"] = out["dfs gates"]
    out["routing"] = dataclasses.replace(base, paths=tuple(max(st.paths) for st in space.stages))
    return out


@torch.no_grad()
def forced_int8(net):
    """A copy of ``net`` whose DFS gates choose int8 for every input: the int8 path's accuracy and latency
    as they are, whatever the trained gates prefer."""
    net = copy.deepcopy(net)
    for gate in (m for m in net.modules() if isinstance(m, DFSGate)):
        gate.fc2.weight.zero_()
        gate.fc2.bias.copy_(torch.tensor([-10.0, 10.0, -10.0]))
    return net


@torch.no_grad()
def dfs_option_shares(net, arch: Arch, loader) -> list[float]:
    """Share of (sample, DFS block) decisions taking each option (skip, int8, fp32), in eval mode."""
    net.set_active(arch)
    net.eval()
    costs = torch.tensor(DFS_RELATIVE_COST)
    counts = torch.zeros(len(DFS_OPTIONS))
    for x, _ in loader:
        net.forward_all(x)
        for t in net.gate_trace:
            if t.kind == "dfs":  # the trace holds each sample's chosen option as its relative cost
                chosen = (t.values[:, None] - costs[None]).abs().argmin(1)
                counts += torch.bincount(chosen, minlength=len(DFS_OPTIONS)).float()
    return (counts / counts.sum().clamp_min(1)).tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a trained fmnist_dynamic_all run directory (--front: any run)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5, help="timing rounds (passes over the timed images)")
    ap.add_argument("--samples", type=int, default=200, help="test images timed at batch 1")
    ap.add_argument("--write", action="store_true", help="write the table into docs/BENCHMARKS.md")
    front = ap.add_argument_group("the measured front by mechanism (--front)")
    front.add_argument("--front", type=Path, metavar="OUT", help="measure the front of any trained run into OUT")
    front.add_argument("--backbones", type=int, default=16, help="static backbones over the MAC range")
    front.add_argument("--gated-every", type=int, default=2, help="gate variants on every k-th backbone")
    front.add_argument("--val-images", type=int, default=2000, help="validation images for exit thresholds")
    front.add_argument("--bn-images", type=int, default=1000)
    front.add_argument("--seed", type=int, default=0)
    front.add_argument("--lock", help="flock this file while timing (a shared measurement core)")
    front.add_argument("--timing-cpu", type=int, help="time on this CPU only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.front:
        return front_mode(args)
    load_start = os.getloadavg()[0]
    net, info = load_supernet_file(Path(args.run) / "supernet.pt")
    if net.space.name != SPACE:
        raise SystemExit(f"--run {args.run}: a {net.space.name} supernet; this benchmark needs {SPACE}")
    data = load_data("fashion-mnist", augment=False)
    recal = make_loader(data.train_eval, 500, seed=0, limit=2000)
    test_loader = make_loader(data.test, 500)
    _, timed, _, _, _ = load_images(net.space, 10, args.samples)
    archs = variants(net.space)

    rows, models = {}, {}
    int8_net = forced_int8(net)
    trained_net = net
    with tempfile.TemporaryDirectory() as tmp:
        for name, arch in archs.items():
            net = int8_net if name.endswith("int8") else trained_net
            recalibrate_bn(net, arch, recal, 2000)
            net.set_active(arch)
            stats = accuracy_and_rates(net, test_loader)
            path = Path(tmp) / f"{name.replace(' ', '_')}.ts"
            save_torchscript(nas4dyn.export_subnet(net, arch, info), path)
            models[name] = load_exported(path)
            if name.startswith("dfs"):  # FlopCounterMode cannot see the int8 convs: take the cost model's count
                macs = nas4dyn.count_macs(net, arch, make_loader(data.test, 500, limit=args.samples)).macs_expected
                stats["dfs_options"] = dfs_option_shares(net, arch, make_loader(data.test, 500, limit=2000))
            else:
                macs = realized_macs(models[name], timed, 1)
            rows[name] = {"arch": arch.to_dict(), "macs": macs, **stats}
        times = timed_passes(models, timed, args.repeats)
    load_end = os.getloadavg()[0]
    for name, t in times.items():
        rows[name]["ms"] = statistics.median((t.mean(1) * 1e3).tolist())
        rows[name]["ms_best"] = float(t.min(0).values.mean() * 1e3)

    base = rows["static"]
    cmd = (f"python scripts/bench_mechanisms.py --run {args.run} --threads {args.threads} --repeats {args.repeats} "
           f"--samples {args.samples}{' --write' if args.write else ''}")
    lines = [
        f"Command: `{cmd}` — {machine_line(args.threads)}; 1-minute load average {load_start:.1f} at the start, "
        f"{load_end:.1f} at the end.",
        "",
        f"Backbone: {SPACE} depths {list(archs['static'].depths)}, kernels 5/5/3, full widths, 28 x 28; accuracy on the "
        f"{len(data.test)} Fashion-MNIST test images (supernet dynamic eval = the exported model, by the export "
        f"tests); MACs and latency of the exported TorchScript model on {args.samples} test images at batch 1, "
        f"median of {args.repeats} interleaved passes.",
        "",
        "| mechanism | test acc | Δ acc vs static | decisions | MMACs/img | ms/img | MAC reduction | speed-up | "
        "speed-up ÷ MAC reduction | goal |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        if r["gate_rates"]:
            decisions = f"gates on {statistics.mean(r['gate_rates'].values()):.2f}"
        elif r["path_rates"]:
            decisions = "paths " + "; ".join(f"{k}: " + "/".join(f"{s:.2f}" for s in v) for k, v in r["path_rates"].items())
        else:
            decisions = "—"
        if "dfs_options" in r:
            decisions = ("BitOPs " + decisions.removeprefix("gates on ") + " of fp32; skip/int8/fp32 "
                         + "/".join(f"{s:.2f}" for s in r["dfs_options"]))
        mac_red, speed = base["macs"] / r["macs"], base["ms"] / r["ms"]
        ratio = speed / mac_red
        goal = GOALS.get(name)
        verdict = "—" if goal is None else (f"≥ {goal} met" if ratio >= goal else f"≥ {goal} NOT met")
        lines.append(f"| {name} | {100 * r['val_acc']:.2f}% | {100 * (r['val_acc'] - base['val_acc']):+.2f} | "
                     f"{decisions} | {r['macs'] / 1e6:.2f} | {r['ms']:.3f} | {mac_red:.2f}× | {speed:.2f}× | "
                     f"{math.floor(ratio * 1000) / 1000:.3f} | {verdict} |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.run) / "bench_mechanisms.json"
    out.write_text(json.dumps(rows, indent=1, default=str))
    if args.write:
        replace_section(Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md", "Dynamic mechanisms", table)


def front_mode(args: argparse.Namespace) -> None:
    load_start = os.getloadavg()[0]
    rows = measure_front(Path(args.run), args.front, args.backbones, args.gated_every, args.val_images,
                         args.bn_images, args.samples, args.repeats, args.seed, timing_cpu(args.lock, args.timing_cpu))
    plot_front(rows, args.front / "front.png", f"{Path(args.run).name}: test accuracy vs measured latency")
    cmd = (f"python scripts/bench_mechanisms.py --run {args.run} --front {args.front} --backbones {args.backbones} "
           f"--gated-every {args.gated_every} --val-images {args.val_images} --bn-images {args.bn_images} "
           f"--samples {args.samples} --repeats {args.repeats} --threads {args.threads}"
           + (f" --lock {args.lock}" if args.lock else "") + (f" --timing-cpu {args.timing_cpu}" if args.timing_cpu is not None else ""))
    print(f"Command: `{cmd}` — {machine_line(args.threads)}; 1-minute load average {load_start:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end; {len(rows)} subnets, {args.samples} test images at batch 1, "
          f"{args.repeats} interleaved rounds.\n")
    print("\n".join(front_table(rows)))


if __name__ == "__main__":
    main()
