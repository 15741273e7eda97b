"""Settings of a latency profile; kept free of heavy imports so the CLI can show their defaults quickly."""
from __future__ import annotations

from dataclasses import dataclass

# re-exported: the CLI lists their keys. RUNTIMES: what a table times — the frozen TorchScript pieces of
# `nas4dyn export`'s model.ts, or the ONNX pieces of its model.onnx run by onnxruntime.
from nas4dyn.cost.timing import CLOCKS, RUNTIMES, STATISTICS  # noqa: F401
from nas4dyn.errors import ConfigError


@dataclass
class ProfileSettings:
    """How and how much to measure.

    ``repeats``: timed calls per item; ``burst``: timed calls per item per round; ``channel_levels``:
    active-filter levels measured per channel-gated block (0 .. all, evenly spaced); ``calibrate``: random
    subnets (each timed static and on one dynamic path) that fit the correction; ``validate``: held-out
    random subnets, likewise; ``statistic``: a key of ``STATISTICS``; ``clock``: a key of ``CLOCKS``;
    ``runtime``: a key of ``RUNTIMES``.
    """

    device: str = "cpu"
    threads: int = 1
    batch_size: int = 1
    repeats: int = 150
    burst: int = 5
    channel_levels: int = 5
    calibrate: int = 40
    validate: int = 0
    statistic: str = "median"
    clock: str = "wall"
    seed: int = 0
    runtime: str = "torchscript"

    def check(self) -> None:
        """Raises ConfigError naming the first bad setting and its allowed values."""
        import torch  # only here: importing torch would slow down every CLI start

        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"--device {self.device!r}: use cpu or cuda")
        if self.statistic not in STATISTICS:
            raise ConfigError(f"--statistic {self.statistic!r}: use one of {sorted(STATISTICS)}")
        if self.clock not in CLOCKS:
            raise ConfigError(f"--clock {self.clock!r}: use one of {sorted(CLOCKS)}")
        if self.clock == "cpu" and (self.device != "cpu" or self.threads != 1):
            raise ConfigError("--clock cpu: measures the calling thread only, so it needs --device cpu --threads 1; "
                              "use --clock wall otherwise")
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"--runtime {self.runtime!r}: use one of {', '.join(RUNTIMES)}")
        if self.runtime == "onnxruntime":
            if self.device != "cpu":
                raise ConfigError("--runtime onnxruntime: tables time onnxruntime's CPU provider; use --device cpu")
            try:
                import onnxruntime  # noqa: F401
            except ImportError:
                raise ConfigError("--runtime onnxruntime: onnxruntime is not installed; pip install onnxruntime") from None
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is visible here; use --device cpu")
        for name, minimum in (("threads", 1), ("batch_size", 1), ("repeats", 1), ("burst", 1),
                              ("channel_levels", 2), ("calibrate", 2), ("validate", 0)):
            value = getattr(self, name)
            if value < minimum:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} {value}: must be an integer >= {minimum}")
