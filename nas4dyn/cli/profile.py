"""`nas4dyn profile` — measure a space's latency table on this machine and validate its predictor.

Remote targets (a phone, a Jetson, another server): run `nas4dyn profile` on that device if nas4dyn installs
there; otherwise write a profiling bundle (`--bundle DIR`), run its `run.py` on the device (only torch needed,
or for `--runtime onnxruntime` only onnxruntime and numpy),
and import the timings (`--import timings.json --out lut.json`). Copy the table to the machine that searches
(`nas4dyn search --latency-table lut.json`); loading a table measured elsewhere warns that the device
fingerprint differs, which is expected then.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from nas4dyn.cost.settings import CLOCKS, RUNTIMES, STATISTICS, ProfileSettings
from nas4dyn.errors import ConfigError
from nas4dyn.io import check_writable
from search_spaces.space import load_space

EPILOG = """\
The table records the device fingerprint (CPU model or GPU name, runtime and its version, threads, batch size,
dtype). --runtime onnxruntime times the ONNX pieces of `export --format onnx`'s model.onnx with onnxruntime's
CPU provider (--threads intra-op threads, one inter-op thread, sequential execution).
Remote targets: run `nas4dyn profile` on the target device itself, or, where nas4dyn does not install:
  nas4dyn profile --space NAME --bundle DIR     (here; copy DIR to the device)
  python DIR/run.py --out timings.json          (on the device; needs only torch, or onnxruntime + numpy)
  nas4dyn profile --import timings.json --out lut.json   (here)
and copy the JSON to the machine that searches; using a table on another device warns, which is expected.
On a dedicated device the defaults (wall clock, median) are right. On a machine shared with other jobs the
median measures the contention: use `--threads 1 --clock cpu --statistic min` (CPU time of the timing thread,
least disturbed call), which leaves out the time other jobs hold the core.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = ProfileSettings()
    p = sub.add_parser(
        "profile",
        help="measure a latency table on this device (and validate the predictor)",
        description="Time every distinct block configuration, gate state, exit head, gater and stem of a space "
        "on this machine; fit a correction on random subnets timed end to end as exported (TorchScript, frozen, or "
        "ONNX in onnxruntime); "
        "optionally validate it.",
        epilog=EPILOG,
        formatter_class=lambda prog: argparse.ArgumentDefaultsHelpFormatter(prog, width=110),
    )
    p.add_argument("--space", help="built-in space name or path to a space file (with --import: checked against "
                   "the timings' space)")
    p.add_argument("--device", default=d.device, choices=["cpu", "cuda"], help="device to time on")
    p.add_argument("--out", help="latency table JSON to write")
    p.add_argument("--runtime", choices=RUNTIMES, help=f"runtime the table times (the model format deployed: "
                   f"model.ts or model.onnx); default {RUNTIMES[0]} (with --import: check the timings are of it)")
    p.add_argument("--bundle", metavar="DIR", help="write a profiling bundle for a device without nas4dyn instead "
                   "of timing here (with --import: check the timings are of this bundle)")
    p.add_argument("--import", dest="import_timings", metavar="TIMINGS.json",
                   help="build the table from the timings a bundle's run.py wrote on the device")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads, pinned while timing")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="batch size the table describes")
    p.add_argument("--repeats", type=int, default=d.repeats, help="timed calls per measured item")
    p.add_argument("--calibrate", type=int, default=d.calibrate,
                   help="random subnets (static + one dynamic path each) that fit the correction")
    p.add_argument("--validate", type=int, default=d.validate, metavar="K",
                   help="held-out random subnets (static + one dynamic path each) timed end to end")
    p.add_argument("--statistic", default=d.statistic, choices=sorted(STATISTICS),
                   help="summary of each item's timed calls")
    p.add_argument("--clock", default=d.clock, choices=sorted(CLOCKS),
                   help="wall clock, or CPU time of the timing thread (needs --threads 1 on cpu)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the random subnets")
    p.set_defaults(run=run)


def _accuracy_line(name: str, acc: dict) -> str:
    return (f"  {name:<8} n={acc['n']:<4} within ±10%: {100 * acc['within_10pct']:5.1f}%   "
            f"MAPE {acc['mape_pct']:5.2f}%   worst {acc['worst_pct']:6.2f}%")


def _write_bundle(args: argparse.Namespace, settings: ProfileSettings) -> int:
    from nas4dyn.cost.bundle import RUN_FILE, write_bundle

    if args.out:
        raise ConfigError("--bundle DIR writes a bundle, not a table: drop --out, run DIR/run.py on the device, "
                          "then `nas4dyn profile --import timings.json --out lut.json`")
    check_writable(args.bundle, "--bundle")
    manifest = write_bundle(load_space(args.space), settings, args.bundle, args.runtime)
    print(f"wrote bundle {args.bundle} ({len(manifest['items'])} items, {len(manifest['modules'])} pieces, "
          f"runtime {manifest['runtime']})")
    print(f"on the device: python {Path(args.bundle) / RUN_FILE} --out timings.json --threads {args.threads}")
    print("back here:     nas4dyn profile --import timings.json --out lut.json")
    return 0


def run(args: argparse.Namespace) -> int:
    # heavy (torch): imported only when the verb runs
    from nas4dyn.cost.bundle import import_timings
    from nas4dyn.cost.latency import LatencyModel
    from nas4dyn.cost.profiler import profile_space

    if args.out is None and not (args.bundle and not args.import_timings):
        raise ConfigError("--out LUT.json is required (the latency table to write)")
    if args.space is None and not args.import_timings:
        raise ConfigError("--space NAME is required (the space to profile)")
    settings = ProfileSettings(device=args.device, threads=args.threads, batch_size=args.batch_size,
                               repeats=args.repeats, calibrate=args.calibrate, validate=args.validate,
                               statistic=args.statistic, clock=args.clock, seed=args.seed,
                               runtime=args.runtime or RUNTIMES[0])
    if args.bundle and not args.import_timings:
        return _write_bundle(args, settings)
    out = Path(args.out)
    check_writable(out, directory=False)
    if args.import_timings:
        space = load_space(args.space) if args.space else None
        table = import_timings(args.import_timings, space.name if space else None, args.runtime, args.bundle)
        if space is not None:
            LatencyModel(table).check_space(space)
        verb = "imported timings of"
    else:
        table = profile_space(load_space(args.space), settings)
        verb = "profiled"
    table.save(out)
    fp = table.fingerprint
    a, b = table.correction
    package = "torch" if table.runtime == "torchscript" else "onnxruntime"
    print(f"{verb} {table.space.name} on {fp['device_name']} ({fp['device']}, {table.runtime}, "
          f"{fp['threads']} threads, batch {fp['batch_size']}, {package} {fp.get(package)}) "
          f"in {table.settings['seconds']:.0f} s")
    print(f"{sum(len(v) for v in table.levels.values())} table entries; correction: ms = {a:.3f} * sum + {b:.3f}, "
          f"exit tests x{table.exit_scale:.2f}")
    for title, scores in (("calibration", table.calibration), ("validation (held out)", table.validation or {})):
        if scores:
            print(title + ":")
            for kind in ("static", "dynamic"):
                if kind in scores:
                    print(_accuracy_line(kind, scores[kind]))
    print(f"wrote {out}")
    return 0
