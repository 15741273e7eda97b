"""Benchmark: path-equivalent overhead and speed-up over the frozen static twin of exported dynamic models, made
by this code and by an older checkout of nas4dyn (``--baseline-code``), timed in one process, interleaved.

Exported models are standalone TorchScript, so the older code only exports (in a subprocess, from the same
calibrated supernet weights) and both generations run side by side here. Variants: bench_export's exits, channel
gates (one gate per filter), channel gates in groups of each ``--groups`` size (this code only; the trained
gater's rows averaged per group, see ``gater.group``), and width gates where the space offers them.

Speed-up = frozen static twin ÷ dynamic (batch 1, ``--samples`` images, models taking turns image by image,
median of ``--repeats`` passes); MACs realized per image (FlopCounterMode); path-equivalent overhead as in
scripts/path_overhead.py on the first ``--path-samples`` images, at batch 1 and ``--batch``, old and new models
alternating pass by pass (median of ``--repeats`` per-pass ratios).

Usage: python scripts/bench_before_after.py [--run DIR | --space fmnist] --baseline-code DIR [--groups 8,16]
       [--samples 100] [--path-samples 32] [--repeats 5] [--batch 32]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import nas4dyn  # noqa: E402
from bench_export import Twin, backbone, calibrate_exits, calibrate_gates, net_and_images, timed_passes  # noqa: E402
from path_overhead import check_twins, path_overhead, path_twins  # noqa: E402
from nas4dyn.api import save_supernet  # noqa: E402
from nas4dyn.export.measure import realized_macs  # noqa: E402
from nas4dyn.export.torchscript import load_exported, save_torchscript  # noqa: E402
from nas4dyn.train.sampling import gated  # noqa: E402
from search_spaces.arch import ExitChoice  # noqa: E402
from supernet.network import Supernet  # noqa: E402

# Run by the older code: export each arch of a JSON file from a supernet.pt written by this code (the space's
# newer keys dropped).
_BASELINE_EXPORT = """
import json, sys
from pathlib import Path
import torch
import nas4dyn
from nas4dyn.export.torchscript import save_torchscript
from search_spaces.arch import Arch
from search_spaces.space import space_from_dict
from supernet.network import Supernet
blob = torch.load(sys.argv[1], weights_only=True)
blob["space"]["gater"].pop("group", None)
net = Supernet(space_from_dict(blob["space"]))
net.load_state_dict(blob["state_dict"])
net.eval()
for name, arch in json.loads(Path(sys.argv[2]).read_text()).items():
    save_torchscript(nas4dyn.export_subnet(net, Arch.from_dict(arch), blob["data"]), Path(sys.argv[3]) / f"{name}.ts")
"""


def grouped(net: Supernet, group: int) -> Supernet:
    """The same supernet weights with channel gates in groups of ``group`` filters."""
    space = dataclasses.replace(net.space, gater=dataclasses.replace(net.space.gater, group=group))
    out = Supernet(space)
    out.load_state_dict(net.state_dict())
    return out.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", default="fmnist")
    ap.add_argument("--run", help="a trained run directory (default: an untrained supernet of --space)")
    ap.add_argument("--baseline-code", required=True, help="a checkout of the older nas4dyn to compare with")
    ap.add_argument("--groups", default="8,16", help="gate group sizes to add (comma-separated; '' for none)")
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--path-samples", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    load_start = os.getloadavg()[0]
    net, val, test, mean, std, source = net_and_images(args.space, args.run, 1000, args.samples)
    space = net.space
    info = {"mean": mean, "std": std}
    norm = (val - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    base = backbone(space)
    exits = tuple(ExitChoice(s, b, 1.0) for s, b in space.exits.positions if b == 1)[:2]
    variants = {"exits": calibrate_exits(net, dataclasses.replace(base, exits=exits), norm, 0.4),
                "channel gates": gated(space, base, "channel")}
    if gated(space, base, "width") != base:
        variants["width gates"] = gated(space, base, "width")
    calibrate_gates(net, variants, norm)
    nets = {name: net for name in variants}
    for g in (int(v) for v in args.groups.split(",") if v):
        name = f"channel gates (groups of {g})"
        variants[name], nets[name] = variants["channel gates"], grouped(net, g)

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        save_supernet(tmp / "supernet.pt", net, info)
        old_names = [n for n in variants if "groups" not in n]
        (tmp / "archs.json").write_text(json.dumps({n.replace(" ", "_"): variants[n].to_dict() for n in old_names}))
        (tmp / "old").mkdir()
        env = dict(os.environ, PYTHONPATH=str(Path(args.baseline_code).resolve()))
        subprocess.run([sys.executable, "-c", _BASELINE_EXPORT, str(tmp / "supernet.pt"), str(tmp / "archs.json"),
                        str(tmp / "old")], check=True, env=env, cwd=args.baseline_code)
        models = {}
        for name, arch in variants.items():
            save_torchscript(nas4dyn.export_subnet(nets[name], arch, info), tmp / "new.ts")
            models[name] = load_exported(tmp / "new.ts")
        for name in old_names:
            models[f"{name} (before)"] = load_exported(tmp / "old" / f"{name.replace(' ', '_')}.ts")
        twin = Twin(space, base, mean, std).copy_from(net.extract(base).eval())
        models["twin (frozen)"] = torch.jit.freeze(torch.jit.script(twin))
        macs = {name: realized_macs(m, test, 1) for name, m in models.items()}
        times = timed_passes(models, test, args.repeats)
        few = test[: args.path_samples]
        overhead: dict[str, list] = {}
        for name, arch in variants.items():
            index, twins = path_twins(nets[name], arch, mean, std, few)
            pair = [name] + ([f"{name} (before)"] if name in old_names else [])
            for model in pair:
                check_twins(models[model], index, twins, few)
            per_pass: dict[str, list] = {m: [[], []] for m in pair}
            for _ in range(args.repeats):  # old and new alternate pass by pass
                for model in pair:
                    for j, b in enumerate((1, args.batch)):
                        per_pass[model][j].append(path_overhead(models[model], index, twins, few, 1, b))
            for model, (ones, manys) in per_pass.items():
                overhead[model] = [len(twins), statistics.median(o.ratio for o in ones),
                                   (max(o.ratio for o in ones) - min(o.ratio for o in ones)),
                                   statistics.median(o.dynamic_ms for o in ones), statistics.median(o.twins_ms for o in ones),
                                   statistics.median(o.ratio for o in manys)]
    load_end = os.getloadavg()[0]
    med = {k: statistics.median((v.mean(1) * 1e3).tolist()) for k, v in times.items()}
    tw = "twin (frozen)"
    print(f"{source} images; 1-minute load {load_start:.2f} at the start, {load_end:.2f} at the end")
    print(f"| model | MMACs/img | ms/img b1 | MACs ÷ twin | speed-up over twin | distinct paths | path overhead b1 "
          f"| (spread) | ms/img dynamic / twins (path) | path overhead b{args.batch} |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in models:
        row = f"| {name} | {macs[name] / 1e6:.2f} | {med[name]:.3f} | {macs[name] / macs[tw]:.2f} | {med[tw] / med[name]:.3f} |"
        if name in overhead:
            paths, one, spread, dyn, twn, many = overhead[name]
            row += f" {paths} | **{one:.3f}** | {spread:.3f} | {dyn:.3f} / {twn:.3f} | {many:.3f} |"
        else:
            row += " | | | | |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
