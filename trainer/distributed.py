"""Data-parallel helpers for the one training loop: rank and world, DDP, cross-worker reductions, the epoch hook.

No Ray here: Ray Train (trainer/workers.py) creates the process group ("nccl" on GPUs, "gloo" on CPUs) and installs
the epoch hook; these helpers only talk `torch.distributed`. Outside a process group (one worker, the default)
every helper is a no-op, so the single-process path runs exactly as it always has.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_distributed() -> bool:
    """True inside a process group of two or more workers (a one-worker Ray Train run trains like one process)."""
    return world_size() > 1


def is_primary() -> bool:
    """Rank 0 owns the run folder: it alone reads and writes checkpoints, models and reports."""
    return rank() == 0


def current_shard() -> tuple[int, int] | None:
    """(rank, world) for the batch sources when training data-parallel, else None (no sharding)."""
    return (rank(), world_size()) if is_distributed() else None


# ---- pure index math ------------------------------------------------------------------------------------------------


def shard_indices(order: torch.Tensor, rank: int, world: int, pad: bool = True) -> torch.Tensor:
    """Rank `rank`'s strided slice order[rank::world] of one global epoch order.

    Every rank draws the same global order from the shared seeded generator, so the union of the shards is the
    global order: whatever distribution the sampler gives (class-balanced, progressive, ...) holds for the global
    batch, exactly as with one worker. With `pad` the order is first wrapped around to a multiple of `world` (as
    torch's DistributedSampler does), so every rank takes the same number of steps and DDP's collectives line up.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside 0..{world - 1}")
    if pad and len(order) % world:
        extra = world - len(order) % world
        order = torch.cat([order, order[:extra].repeat(-(-extra // max(len(order), 1)))[:extra]])
    return order[rank::world]


def shard_epoch(order: torch.Tensor, generator: torch.Generator | None, rank: int, world: int):
    """This rank's part of one epoch: (indices, augmentation generator).

    Training (a generator given): padded equal shards, and a per-rank augmentation generator seeded by one draw
    from the shared generator, so ranks augment independently while the shared generator stays in lockstep on every
    rank (rank 0's saved generator state resumes all of them). Evaluation (no generator): each item exactly once.
    """
    if generator is None:
        return shard_indices(order, rank, world, pad=False), None
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return shard_indices(order, rank, world), torch.Generator().manual_seed(seed + rank)


# ---- collectives ----------------------------------------------------------------------------------------------------


def broadcast_object(obj):
    """Rank 0's object on every rank (checkpoint state: only rank 0 reads the run folder)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj) -> list:
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sums(values: dict[str, float], seen: int) -> tuple[dict[str, float], int]:
    """Sum per-worker loss totals and image counts, so the epoch record describes the global batch stream."""
    if not is_distributed():
        return values, seen
    keys = sorted(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    flat = torch.tensor([values[k] for k in keys] + [float(seen)], dtype=torch.float64, device=device)
    dist.all_reduce(flat)
    return dict(zip(keys, flat[:-1].tolist())), int(flat[-1].item())


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's (B, ...) tensor in rank order; B must match (the MoCo key batch of one step)."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def gather_split(logits: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor):
    """Each rank's predictions on its shard of a split, merged on every rank back into id order."""
    parts = [p for p in all_gather_objects((logits, labels, ids)) if len(p[2])]  # a rank may get no items
    logits, labels, ids = (torch.cat([p[i] for p in parts]) for i in range(3))
    order = torch.argsort(ids, stable=True)
    return logits[order], labels[order], ids[order]


def broadcast_module_state(module: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank before eval or save.

    Parameters need no copy: DDP keeps them equal (same start, same averaged gradients, same optimizer).
    """
    if not is_distributed():
        return
    for tensor in module.buffers():
        dist.broadcast(tensor.data, src=0)


def read_rows_sharded(read: Callable[[torch.Tensor], torch.Tensor], num_rows: int) -> torch.Tensor:
    """Every row, each rank reading only its contiguous block of ids (chunk-friendly), then shared with all ranks."""
    lo, hi = rank() * num_rows // world_size(), (rank() + 1) * num_rows // world_size()
    return torch.cat(all_gather_objects(read(torch.arange(lo, hi))))


# ---- DDP and the epoch hook -----------------------------------------------------------------------------------------


class _LossModule(nn.Module):
    """The stage's trainable parts and its loss as one module, so DDP sees the forward that produces the loss."""

    def __init__(self, model: nn.Module, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch, progress: float):
        return self.loss_fn(batch, progress)


def data_parallel_loss(model: nn.Module, loss_fn, sync_batchnorm: bool = False):
    """`loss_fn` run through DistributedDataParallel, so backward all-reduces (averages) gradients across ranks.

    BatchNorm: per-worker batch statistics by default (as the official MoCo and SSD code, and Goyal et al. 2017);
    `sync_batchnorm` switches to torch's SyncBatchNorm, which normalises over the global batch but needs CUDA.
    Buffers are not broadcast every step (`broadcast_buffers=False`): the MoCo queue is kept identical on every rank
    by enqueueing all-gathered keys, and BatchNorm running statistics are copied from rank 0 at each epoch's end.
    """
    if sync_batchnorm:
        if not torch.cuda.is_available():
            raise ValueError("distributed.sync_batchnorm needs CUDA (torch's SyncBatchNorm is GPU-only); set it false")
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device = next((p.device for p in model.parameters() if p.requires_grad), torch.device("cpu"))
    ddp = nn.parallel.DistributedDataParallel(
        _LossModule(model, loss_fn), device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False)
    return ddp


@dataclass(frozen=True)
class WorkerHooks:
    """What a data-parallel runner (Ray Train) asks of `fit`: BatchNorm choice and a call after each epoch's save."""

    sync_batchnorm: bool = False
    after_epoch: Callable[[str, Path, dict], None] | None = None  # (stage, checkpoint file, epoch record)


_HOOKS: ContextVar[WorkerHooks | None] = ContextVar("ltd_worker_hooks", default=None)


def worker_hooks() -> WorkerHooks:
    return _HOOKS.get() or WorkerHooks()


@contextlib.contextmanager
def installed_hooks(hooks: WorkerHooks) -> Iterator[None]:
    """Scope `hooks` to one worker's run (a context variable: nothing leaks into other runs or threads)."""
    token = _HOOKS.set(hooks)
    try:
        yield
    finally:
        _HOOKS.reset(token)
