"""torchrun / DDP support: process group setup, gradient all-reduce, rank-sharded data with a resumable position.

Launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) training joins a process group — gloo on CPU,
nccl on GPU. Each rank reads its own shard of every epoch. Sandwich steps run several forward/backward passes
over different subnets, which leaves different parameters unused per pass; instead of DDP's bucketed hooks
the accumulated gradients are all-reduced once per step (:func:`sync_gradients`) — one collective, and the
same parameters have gradients on every rank because all ranks sample the same subnets.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler

from nas4dyn.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank, world size, and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the torchrun process group if there is one; pick the device (``auto``: CUDA when available).

    Raises:
        ConfigError: ``cuda`` requested but not available.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device {device!r}: use auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here; use --device cpu")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        log.debug("joined process group: rank %d of %d (%s)", rank, world, dist.get_backend())
    return DistEnv(rank, world, local_rank, dev)


def shutdown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def _float_buffers(net: torch.nn.Module) -> list[torch.Tensor]:
    return [b for b in net.buffers() if b.is_floating_point()]


def sync_gradients(net: torch.nn.Module, env: DistEnv, loss: float = 0.0) -> float:
    """Average the accumulated gradients, the floating buffers (BN statistics) and this step's ``loss`` over all
    ranks; returns the mean loss.

    Buffers are averaged too: each rank's BN sees only its shard, and ranks must stay identical. The loss rides
    in the same all-reduce so that every rank decides alike whether the step diverged (a rank stopping alone
    would leave the others waiting in the next collective).
    """
    if not env.distributed:
        return loss
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    tensors = grads + _float_buffers(net)
    flat = torch.cat([t.reshape(-1) for t in tensors] + [torch.tensor([loss], device=env.device)])
    dist.all_reduce(flat)
    flat /= env.world_size
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return float(flat[-1])


def broadcast_state(net: torch.nn.Module, env: DistEnv) -> None:
    """Make every rank hold rank 0's parameters and buffers."""
    if env.distributed:
        for t in list(net.parameters()) + list(net.buffers()):
            dist.broadcast(t.data, src=0)


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. the checkpoint that only rank 0 reads)."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=env.device if env.device.type == "cuda" else None)
    return box[0]


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def all_sum(values: list[float], env: DistEnv) -> list[float]:
    """Element-wise sum of ``values`` over all ranks."""
    if not env.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.tolist()


def state_checksum(net: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer's bytes: equal on all ranks iff they hold identical weights."""
    h = hashlib.sha256()
    for name, t in net.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class ShardedBatches:
    """An endless, resumable stream of this rank's batches.

    Epoch ``e`` is a ``DistributedSampler`` permutation seeded by (seed, e); each rank takes its shard and
    cuts it into batches. ``position`` counts the batches consumed so far (the same on every rank), so a
    checkpoint can resume the stream exactly where it stopped.
    """

    def __init__(self, dataset: Dataset, global_batch: int, seed: int, env: DistEnv, position: int = 0):
        if global_batch % env.world_size:
            raise ConfigError(
                f"batch_size: {global_batch} is not divisible by the {env.world_size} ranks; "
                f"use a multiple of {env.world_size}"
            )
        self.sampler = DistributedSampler(dataset, env.world_size, env.rank, shuffle=True, seed=seed, drop_last=True)
        self.batch = global_batch // env.world_size
        self.steps_per_epoch = len(self.sampler) // self.batch
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"batch_size: {global_batch} is larger than the training set shard ({len(self.sampler)} images "
                "per rank); use a smaller batch"
            )
        self.dataset = dataset
        self.position = position
        self._iter: Optional[Iterator] = None

    def _epoch_iter(self) -> Iterator:
        epoch, offset = divmod(self.position, self.steps_per_epoch)
        self.sampler.set_epoch(epoch)
        batches = list(BatchSampler(self.sampler, self.batch, drop_last=True))[offset:]
        # A private generator: creating a loader iterator draws a seed from it, never from the global RNG,
        # so resuming (which creates an extra iterator) leaves the augmentation random stream unchanged.
        loader = DataLoader(self.dataset, batch_sampler=batches, generator=torch.Generator())
        return iter(loader)

    def use(self, dataset: Dataset) -> None:
        """Read ``dataset`` from now on: the same images in the same order (e.g. the training set without
        augmentation), continuing at the current position."""
        if dataset is not self.dataset:
            self.dataset, self._iter = dataset, None

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._iter is None or self.position % self.steps_per_epoch == 0:
            self._iter = self._epoch_iter()
        x, y = next(self._iter)
        self.position += 1
        return x, y
