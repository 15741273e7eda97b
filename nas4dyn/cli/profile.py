"""`nas4dyn profile` — measure a space's latency table on this machine and validate its predictor.

Remote targets (a phone, a Jetson, another server): install nas4dyn there, run `nas4dyn profile` on that
device, and copy the JSON back to the machine that searches (`nas4dyn search --latency-table lut.json`).
Loading a table measured elsewhere warns that the device fingerprint differs; that is expected then.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from nas4dyn.cost.settings import CLOCKS, STATISTICS, ProfileSettings
from nas4dyn.io import check_writable
from search_spaces.space import load_space

EPILOG = """\
The table records the device fingerprint (CPU model or GPU name, torch version, threads, batch size, dtype).
Remote targets: run `nas4dyn profile` on the target device itself and copy the JSON to the machine that
searches; using a table on another device warns, which is then expected.
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
        "on this machine; fit a correction on random subnets timed end to end as exported (TorchScript, frozen); "
        "optionally validate it.",
        epilog=EPILOG,
        formatter_class=lambda prog: argparse.ArgumentDefaultsHelpFormatter(prog, width=110),
    )
    p.add_argument("--space", required=True, help="built-in space name or path to a space file")
    p.add_argument("--device", default=d.device, choices=["cpu", "cuda"], help="device to time on")
    p.add_argument("--out", required=True, help="latency table JSON to write")
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


def run(args: argparse.Namespace) -> int:
    from nas4dyn.cost.profiler import profile_space  # heavy (torch): imported only when the verb runs

    out = Path(args.out)
    check_writable(out, directory=False)
    space = load_space(args.space)
    settings = ProfileSettings(device=args.device, threads=args.threads, batch_size=args.batch_size,
                               repeats=args.repeats, calibrate=args.calibrate, validate=args.validate,
                               statistic=args.statistic, clock=args.clock, seed=args.seed)
    table = profile_space(space, settings)
    table.save(out)
    fp = table.fingerprint
    a, b = table.correction
    print(f"profiled {space.name} on {fp['device_name']} ({fp['device']}, {fp['threads']} threads, "
          f"batch {fp['batch_size']}, torch {fp['torch']}) in {table.settings['seconds']:.0f} s")
    print(f"{sum(len(v) for v in table.levels.values())} table entries; correction: ms = {a:.3f} * sum + {b:.3f}")
    for title, scores in (("calibration", table.calibration), ("validation (held out)", table.validation or {})):
        if scores:
            print(title + ":")
            for kind in ("static", "dynamic"):
                if kind in scores:
                    print(_accuracy_line(kind, scores[kind]))
    print(f"wrote {out}")
    return 0
