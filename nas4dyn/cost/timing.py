"""Timing loop of the latency profiler, and the device side of a profiling bundle.

This file needs only the Python standard library and the bundle's runtime — ``torch`` for a TorchScript
bundle, ``onnxruntime`` and ``numpy`` for an ONNX Runtime one (``tqdm`` if installed): ``nas4dyn profile
--bundle DIR`` copies it as ``DIR/run.py``, so a device that cannot install nas4dyn (an ARM board, a Jetson)
times the bundle's pieces with exactly the loop ``nas4dyn profile`` uses here::

    python run.py --out timings.json [--threads T]

Timing: the thread count pinned (torch threads, or an onnxruntime session's intra-op threads with one
inter-op thread and sequential execution), ``torch.inference_mode``, CUDA synchronised around every call. The
machine may be shared, so items are timed in rounds, interleaved in shuffled order: a slow spell of other load
then spreads over all items instead of biasing the ones measured during it. In each round an item gets one
untimed call (its warm-up after the switch) and ``burst`` timed calls; its figure is the median (or, with
``statistic="min"``, the minimum) of all its timed calls.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

# How the timed calls of one item are summarised. The median is the usual choice on a dedicated device; on a
# machine shared with other jobs, preemption inflates long calls more than short ones and the median measures
# the contention, while the minimum (least disturbed call) stays reproducible.
STATISTICS = {"median": statistics.median, "min": min}
# What a timed call's duration is read from: the wall clock, or the CPU time of the calling thread — which
# leaves out the time other jobs hold the core (valid for one thread on the CPU, where the calling thread does
# all the work).
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
BUNDLE_FORMAT = "nas4dyn-bundle/1"
TIMINGS_FORMAT = "nas4dyn-timings/1"
MANIFEST_FILE = "manifest.json"
INPUTS_FILE = "inputs.pt"
ONNX_INPUTS_FILE = "inputs.npz"  # an ONNX Runtime bundle's inputs: arrays t00000, t00001, ... (no pickles)
RUNTIMES = ("torchscript", "onnxruntime")


def runtime_version(runtime: str) -> dict[str, str]:
    """The version of the package that runs the pieces, keyed by its name (torch or onnxruntime)."""
    module = __import__("torch" if runtime == "torchscript" else "onnxruntime")
    return {module.__name__: module.__version__}


def device_name(device: str) -> str:
    """The CPU model (from /proc/cpuinfo) or the GPU name."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: fall back to what platform knows
    return platform.processor() or platform.machine()


def device_fingerprint(device: str, threads: int, batch_size: int, dtype: str = "float32",
                       runtime: str = "torchscript") -> dict[str, Any]:
    """What a latency table was measured on and with (the version of the runtime's package: torch, or
    onnxruntime for an ONNX Runtime table, which needs no torch on the device)."""
    return {
        "device": device,
        "device_name": device_name(device),
        "machine": platform.machine(),
        **runtime_version(runtime),
        "runtime": runtime,
        "threads": threads,
        "batch_size": batch_size,
        "dtype": dtype,
    }


def _progress(iterable: range, enabled: bool) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # a bare device: no progress bar
        return iterable
    return tqdm(iterable, desc="profiling", unit="round", disable=not enabled)


def measure(calls: Sequence[Callable[[], Any]], repeats: int, burst: int, statistic: str, clock: str, seed: int,
            device: str = "cpu", progress: bool = True) -> list[float]:
    """ms of each call (the ``statistic`` of its timed calls), timed in interleaved rounds (module docstring)."""
    sync = __import__("torch").cuda.synchronize if device == "cuda" else (lambda: None)
    read_clock = CLOCKS[clock]
    times: list[list[float]] = [[] for _ in calls]
    order = list(range(len(calls)))
    shuffle = random.Random(seed)
    for _ in _progress(range(math.ceil(repeats / burst)), progress):
        shuffle.shuffle(order)
        for i in order:
            call = calls[i]
            call()
            sync()
            for _ in range(burst):
                start = read_clock()
                call()
                sync()
                times[i].append(read_clock() - start)
    summarize = STATISTICS[statistic]
    return [1e3 * summarize(t) for t in times]


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class OnnxPiece:
    """One ONNX model run by onnxruntime sessions on the CPU provider with ``threads`` intra-op threads, one
    inter-op thread and sequential execution; the sessions are made at the first call (an untimed warm-up).

    Calls take turns over ``SESSIONS`` sessions of the model: a graph with ``If`` nodes (an exported dynamic
    model) runs in one of two speeds per session, fixed when the session is made — the same graph 0.44 or
    0.67-0.73 ms at batch 1 in six sessions of one process (AMD EPYC, fmnist), whatever the memory-pattern,
    arena or optimisation options — so one session's timing is a draw of that mode, and the median over calls
    spread over three sessions times the usual one."""

    SESSIONS = 3

    def __init__(self, model: bytes | str, threads: int):
        self.model, self.threads = model, threads
        self._sessions: list[Any] = []
        self._names: list[str] = []
        self._calls = 0

    def __call__(self, *arrays: Any) -> Any:
        if not self._sessions:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
            opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            self._sessions = [ort.InferenceSession(self.model, opts, providers=["CPUExecutionProvider"])
                              for _ in range(self.SESSIONS)]
            self._names = [i.name for i in self._sessions[0].get_inputs()]
        session = self._sessions[self._calls % self.SESSIONS]
        self._calls += 1
        return session.run(None, dict(zip(self._names, arrays)))


def _torchscript_calls(bundle: Path, manifest: dict[str, Any], threads: int) -> list[Callable[[], Any]]:
    import torch

    device = manifest["settings"]["device"]
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("run.py: the bundle was made for --device cuda but no CUDA device is visible here")
    torch.set_num_threads(threads)
    with warnings.catch_warnings():  # torch.jit is deprecated in favour of torch.export, and says so per load
        warnings.simplefilter("ignore", FutureWarning)
        modules = [torch.jit.load(str(bundle / path), map_location=device) for path in manifest["modules"]]
    tensors = [t.to(device) for t in torch.load(bundle / INPUTS_FILE, map_location="cpu", weights_only=True)]
    return [(lambda m=modules[item["module"]], args=tuple(tensors[i] for i in item["inputs"]): m(*args))
            for item in manifest["items"]]


def _onnxruntime_calls(bundle: Path, manifest: dict[str, Any], threads: int) -> list[Callable[[], Any]]:
    import numpy as np

    pieces = [OnnxPiece(str(bundle / path), threads) for path in manifest["modules"]]
    with np.load(bundle / ONNX_INPUTS_FILE, allow_pickle=False) as data:
        arrays = [data[f"t{i:05d}"] for i in range(len(data.files))]
    return [(lambda m=pieces[item["module"]], args=tuple(arrays[i] for i in item["inputs"]): m(*args))
            for item in manifest["items"]]


def run_bundle(bundle: Path, threads: int, progress: bool = True) -> dict[str, Any]:
    """Time every item of the bundle in ``bundle``; the timings document ``nas4dyn profile --import`` reads."""
    raw = (bundle / MANIFEST_FILE).read_bytes()
    manifest = json.loads(raw)
    if manifest.get("format") != BUNDLE_FORMAT:
        raise SystemExit(f"run.py: {bundle / MANIFEST_FILE} is not a nas4dyn profiling bundle ({BUNDLE_FORMAT})")
    runtime = manifest.get("runtime")
    if runtime not in RUNTIMES:
        raise SystemExit(f"run.py: this bundle is for runtime {runtime!r}; this run.py times {' or '.join(RUNTIMES)}")
    if manifest["settings"]["clock"] == "cpu" and threads != 1:
        raise SystemExit(f"run.py: --threads {threads}: this bundle times with the CPU clock, which sees the calling "
                         "thread only; run it with --threads 1, or make a bundle with `--clock wall`")
    needs = "torch" if runtime == "torchscript" else "onnxruntime and numpy"
    try:
        calls = (_torchscript_calls if runtime == "torchscript" else _onnxruntime_calls)(bundle, manifest, threads)
    except ImportError as exc:
        raise SystemExit(f"run.py: this bundle times {runtime}, which needs {needs} here ({exc}); "
                         f"pip install {needs.replace(' and ', ' ')}") from None
    settings = manifest["settings"]
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if runtime == "torchscript":
            stack.enter_context(__import__("torch").inference_mode())
        ms = measure(calls, settings["repeats"], settings["burst"], settings["statistic"], settings["clock"],
                     settings["seed"], settings["device"], progress)
    return {
        "format": TIMINGS_FORMAT,
        "bundle_id": manifest["bundle_id"],
        "manifest_sha256": digest(raw),
        "manifest": manifest,
        "fingerprint": device_fingerprint(settings["device"], threads, settings["batch_size"], runtime=runtime),
        "seconds": round(time.perf_counter() - started, 1),
        "ms": ms,
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Time this nas4dyn profiling bundle on this device; bring the "
                                 "output back and run `nas4dyn profile --import timings.json --out lut.json`.")
    ap.add_argument("--out", required=True, help="timings JSON to write")
    ap.add_argument("--threads", type=int, default=1, help="threads, pinned while timing (torch threads, or onnxruntime intra-op threads)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.threads < 1:
        raise SystemExit(f"run.py: --threads {args.threads}: must be an integer >= 1")
    out = Path(args.out)
    result = run_bundle(Path(__file__).resolve().parent, args.threads, not args.no_progress)
    fd, tmp = tempfile.mkstemp(dir=out.resolve().parent, prefix=f".{out.name}.")
    with os.fdopen(fd, "w") as f:  # written whole, then renamed: never half a file under the real name
        json.dump(result, f)
    os.replace(tmp, out)
    print(f"timed {len(result['ms'])} items in {result['seconds']:.0f} s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
