"""The main job on the embedded default, as `make demo` runs it: Fashion-MNIST, quick preset,
train -> profile -> search -> export (a dynamic subnet and its static twin) -> evaluate, then one summary.

The exported subnet is dynamic: the most accurate Pareto member whose expected latency is at most 70% of the
most accurate static subnet's, within 1 point of its accuracy (both as the search measured them on
validation images). When no member qualifies the demo says so and names what it exported instead. The
static twin (the same backbone without exits and gates) is exported too, to show what the dynamic parts buy.

Every step is the real CLI verb. Steps whose outputs already exist are skipped, so an interrupted demo
resumes where it stopped (training itself resumes from its checkpoint).

Usage: python scripts/demo.py [--out demo_out] [--trials 12]
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from search_spaces.arch import Arch

LATENCY_SHARE = 0.70  # the dynamic member's expected latency, at most this share of the static reference's
ACCURACY_POINTS = 0.01  # ... and its accuracy at most this far below


def run(step: str, args: list[str], done: Path | None) -> float:
    """Run one `nas4dyn` verb (skipped when ``done`` exists); returns its wall time in seconds."""
    if done is not None and done.exists():
        print(f"== {step}: already done ({done})", flush=True)
        return 0.0
    print(f"== {step}: nas4dyn {' '.join(args)}", flush=True)
    start = time.perf_counter()
    code = subprocess.call([sys.executable, "-m", "nas4dyn", *args])
    if code != 0:
        raise SystemExit(f"demo: `nas4dyn {args[0]}` failed with exit code {code}")
    return time.perf_counter() - start


def best_static(trials_csv: Path) -> Optional[dict[str, Any]]:
    """The most accurate completed static trial of the search (``arch``, ``accuracy``, ``latency_ms``)."""
    with trials_csv.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["state"] == "COMPLETE" and r["arch"] and r["latency_ms"]]
    static = [{"arch": json.loads(r["arch"]), "accuracy": float(r["accuracy"]), "latency_ms": float(r["latency_ms"])}
              for r in rows if not Arch.from_dict(json.loads(r["arch"])).is_dynamic]
    return max(static, key=lambda r: r["accuracy"], default=None)


def pick_dynamic(pareto: list[dict[str, Any]], static: Optional[dict[str, Any]]) -> tuple[int, str]:
    """(index into the front, why it was picked): the most accurate dynamic member within the latency share and
    the accuracy points of ``static``; failing that, said plainly, the next best thing."""
    dynamic = [i for i, e in enumerate(pareto) if Arch.from_dict(e["arch"]).is_dynamic]
    acc = {i: pareto[i]["metrics"]["accuracy"] for i in range(len(pareto))}
    lat = {i: pareto[i]["metrics"]["latency_ms"] for i in range(len(pareto))}
    most_accurate = max(range(len(pareto)), key=acc.__getitem__)
    if static is None:
        pick = max(dynamic, key=acc.__getitem__) if dynamic else most_accurate
        return pick, "NO static subnet finished in the search, so there is no reference: exported the most accurate " \
                     + ("dynamic front member" if dynamic else "front member (the front holds no dynamic subnet)")
    ref = f"the most accurate static subnet ({100 * static['accuracy']:.2f}% val, {static['latency_ms']:.3f} ms)"
    fast = [i for i in dynamic if lat[i] <= LATENCY_SHARE * static["latency_ms"]]
    good = [i for i in fast if acc[i] >= static["accuracy"] - ACCURACY_POINTS]
    if good:
        return max(good, key=acc.__getitem__), (f"most accurate dynamic front member with <= {LATENCY_SHARE:.0%} of "
                                                f"the latency of {ref}, within {100 * ACCURACY_POINTS:.0f} point")
    if fast:
        return max(fast, key=acc.__getitem__), (f"NONE qualifies: no dynamic front member within "
                                                f"{100 * ACCURACY_POINTS:.0f} point of {ref} at <= {LATENCY_SHARE:.0%} "
                                                "of its latency; exported instead the most accurate dynamic member "
                                                "at that latency (it loses more accuracy)")
    if dynamic:
        return max(dynamic, key=acc.__getitem__), (f"NONE qualifies: no dynamic front member at <= {LATENCY_SHARE:.0%}"
                                                   f" of the latency of {ref}; exported instead the most accurate "
                                                   "dynamic member (it saves less)")
    return most_accurate, "NONE qualifies: the front holds no dynamic subnet; exported its most accurate (static) member"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_out", help="folder for every output")
    ap.add_argument("--trials", type=int, default=12, help="search trials")
    ap.add_argument("--space", default="fmnist")
    args = ap.parse_args()
    out = Path(args.out)
    run_dir, lut, search, export = out / "run", out / "lut.json", out / "search", out / "export"
    static_export = out / "export_static"
    times = {
        "train": run("train", ["train", "--space", args.space, "--data", "fashion-mnist", "--out", str(run_dir),
                               "--preset", "quick"] + (["--resume"] if (run_dir / "checkpoint.pt").exists() else []),
                     run_dir / "supernet.pt"),
        "profile": run("profile", ["profile", "--space", args.space, "--device", "cpu", "--out", str(lut),
                                   "--repeats", "10", "--calibrate", "8", "--validate", "8"], lut),
        "search": run("search", ["search", "--run", str(run_dir), "--out", str(search),
                                 "--objectives", "accuracy:max,latency_ms:min", "--latency-table", str(lut),
                                 "--trials", str(args.trials), "--sampler", "nsga2", "--seed", "0",
                                 "--val-images", "2000", "--bn-images", "1000"], None),
    }
    pareto = json.loads((search / "pareto.json").read_text())
    best, why = pick_dynamic(pareto, best_static(search / "trials.csv"))
    twin_file = out / "static_twin_arch.json"
    twin_file.write_text(json.dumps(Arch.from_dict(pareto[best]["arch"]).without_dynamic().to_dict()))
    export_args = ["--latency-table", str(lut), "--latency-samples", "100"]
    times["export"] = run("export", ["export", "--run", str(run_dir), "--arch", f"{search / 'pareto.json'}#{best}",
                                     "--out", str(export), *export_args], None)
    times["export static twin"] = run("export static twin", ["export", "--run", str(run_dir), "--arch", str(twin_file),
                                                             "--out", str(static_export), "--format", "torchscript",
                                                             *export_args], None)
    times["evaluate"] = run("evaluate", ["evaluate", str(export), "--data", "fashion-mnist", "--split", "test",
                                         "--latency-samples", "100"], None)
    summary(out, run_dir, pareto, best, why, times)


def _fmt(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "n/a"


def summary(out: Path, run_dir: Path, pareto: list[dict[str, Any]], best: int, why: str, times: dict[str, float]) -> None:
    """The summary table, read off train_metrics.json and the two cards (latencies: the cards' own figures)."""
    metrics = json.loads((run_dir / "train_metrics.json").read_text())
    card = json.loads((out / "export" / "card.json").read_text())
    twin = json.loads((out / "export_static" / "card.json").read_text())
    final_phase = metrics["phases"][-1] if isinstance(metrics.get("phases"), list) else {}
    measured, predicted, twin_ms = card.get("latency_ms"), card.get("latency_ms_predicted"), twin.get("latency_ms")
    error = (f"{100 * (predicted - measured) / measured:+.1f}%"
             if isinstance(measured, float) and isinstance(predicted, float) else "n/a")
    speedup = f"{twin_ms / measured:.2f}x" if isinstance(measured, float) and isinstance(twin_ms, float) else "n/a"
    statistic = (card.get("latency_predicted_table") or {}).get("settings", {}).get("statistic", "see card.json")
    gates = card.get("gate_rates") or {}
    rows = [
        ("supernet max / min subnet (val acc, last phase)",
         f"{_fmt(final_phase.get('max_val_acc'), 4)} / {_fmt(final_phase.get('min_val_acc'), 4)}"),
        ("Pareto front size", len(pareto)),
        ("exported", f"front member #{best}: {why}"),
        ("test accuracy: dynamic / static twin", f"{_fmt(card.get('accuracy'), 4)} / {_fmt(twin.get('accuracy'), 4)}"),
        ("batch-1 latency ms (measured): dynamic / static twin", f"{_fmt(measured)} / {_fmt(twin_ms)}  (speed-up {speedup})"),
        ("dynamic latency ms: predicted / measured (error)", f"{_fmt(predicted)} / {_fmt(measured)}  ({error}; "
                                                             f"statistic: {statistic})"),
        ("MACs M: dynamic expected / static twin",
         f"{card.get('macs_expected', 0) / 1e6:.2f} / {twin.get('macs_max', 0) / 1e6:.2f}"),
        ("exit rates (test; last = final classifier)", " ".join(f"{r:.2f}" for r in card.get("exit_rates", []))),
        ("gate rates (test; share of units on)", " ".join(f"{k} {v:.2f}" for k, v in gates.items()) or "no gates"),
    ] + [(f"time: {k} (s)", f"{v:.0f}") for k, v in times.items()]
    width = max(len(k) for k, _ in rows)
    print("\nnas4dyn demo summary")
    print("-" * (width + 40))
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print(f"\noutputs in {out}/: run/ (supernet), lut.json, search/ (pareto.json, trials.csv, pareto.png), "
          "export/ (the dynamic subnet: model.ts, model.onnx, card.json), export_static/ (its static twin)")


if __name__ == "__main__":
    main()
