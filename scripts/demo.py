"""The main job on the embedded default, as `make demo` runs it: Fashion-MNIST, quick preset,
train -> profile -> search -> export -> evaluate, then one summary table.

Every step is the real CLI verb. Steps whose outputs already exist are skipped, so an interrupted demo
resumes where it stopped (training itself resumes from its checkpoint).

Usage: python scripts/demo.py [--out demo_out] [--trials 8]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_out", help="folder for every output")
    ap.add_argument("--trials", type=int, default=8, help="search trials")
    ap.add_argument("--space", default="fmnist")
    args = ap.parse_args()
    out = Path(args.out)
    run_dir, lut, search, export = out / "run", out / "lut.json", out / "search", out / "export"
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
    best = max(range(len(pareto)), key=lambda i: pareto[i]["metrics"]["accuracy"])
    times["export"] = run("export", ["export", "--run", str(run_dir), "--arch", f"{search / 'pareto.json'}#{best}",
                                     "--out", str(export), "--latency-table", str(lut),
                                     "--latency-samples", "100"], None)
    times["evaluate"] = run("evaluate", ["evaluate", str(export), "--data", "fashion-mnist", "--split", "test",
                                         "--latency-samples", "100"], None)

    metrics = json.loads((run_dir / "train_metrics.json").read_text())
    card = json.loads((export / "card.json").read_text())
    final_phase = metrics["phases"][-1] if isinstance(metrics.get("phases"), list) else {}
    rows = [
        ("supernet max subnet (val acc, last phase)", final_phase.get("max_val_acc", "n/a")),
        ("supernet min subnet (val acc, last phase)", final_phase.get("min_val_acc", "n/a")),
        ("Pareto front size", len(pareto)),
        ("exported subnet: test accuracy", card.get("accuracy")),
        ("exported subnet: MACs max / expected (M)",
         f"{card.get('macs_max', 0) / 1e6:.2f} / {card.get('macs_expected', 0) / 1e6:.2f}"),
        ("exported subnet: latency ms measured / predicted",
         " / ".join(f"{v:.3f}" if isinstance(v, float) else "n/a"
                    for v in (card.get("latency_ms"), card.get("latency_ms_predicted")))),
        ("exported subnet: exit rates", card.get("exit_rates")),
    ] + [(f"time: {k} (s)", f"{v:.0f}") for k, v in times.items()]
    width = max(len(k) for k, _ in rows)
    print("\nnas4dyn demo summary")
    print("-" * (width + 40))
    for key, value in rows:
        shown = f"{value:.4f}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {shown}")
    print(f"\noutputs in {out}/: run/ (supernet), lut.json, search/ (pareto.json, trials.csv, pareto.png), export/")


if __name__ == "__main__":
    main()
