"""Mixed precision for training: which dtype the forward passes compute in.

``fp32`` computes everything in float32. ``bf16`` runs convolutions and matmuls under
:func:`torch.autocast` in bfloat16 (weights, optimizer state, BatchNorm and losses stay float32). ``auto`` picks
``bf16`` where the device has native bfloat16 arithmetic — a CPU with AMX tiles or AVX512-BF16, a CUDA device
that supports bf16 — and ``fp32`` elsewhere, where emulated bfloat16 would be slower than float32.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

PRECISIONS = ("fp32", "bf16", "auto")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 convolutions natively (faster than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # Private probes, hence looked up defensively; either instruction set makes oneDNN's bf16 convolutions
    # faster than its fp32 ones (measured 1.4-1.5x on AMX and on AVX512-BF16 CPUs).
    probes = (getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return any(probe is not None and probe() for probe in probes)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``fp32`` or ``bf16``: ``auto`` decided for ``device``."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(precision: str, device: torch.device) -> ContextManager:
    """The context that the training forward passes (and their losses) run in."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
