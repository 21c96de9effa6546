"""Splitting synthesis across processes started by ``torchrun`` (torch.distributed, gloo on CPU).

Each rank makes a contiguous run of the global batches; class centroids are averaged across ranks
with an all-reduce; the images are gathered in global batch order. Batch seeds depend only on the
global batch index, so label-free pixel methods give the same set on any number of ranks. A
generator (``--generator``) is trained on every rank at once, its gradients averaged each step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist

from dfq_deploy.errors import BadInputError
from dfq_deploy.synthesis.pixel_loop import Batch


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main_rank() -> bool:
    """True in rank 0 and outside torch.distributed: the process that writes files and prints."""
    return not distributed() or dist.get_rank() == 0


@contextlib.contextmanager
def torchrun_process_group(device: str = "cpu") -> Iterator[None]:
    """Within ``torchrun --nproc-per-node N`` (N > 1; RANK and WORLD_SIZE in the environment), join
    the process group torchrun describes and leave it on exit; otherwise do nothing.

    gloo carries the CPU tensors (centroid averages, gathered images); synthesizing on CUDA adds NCCL
    for tensors on the GPU, and each rank takes GPU number LOCAL_RANK. A process group the caller
    already joined is left to the caller.
    """
    if distributed() or "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        yield
        return
    backend = "gloo"
    if torch.device(device).type == "cuda":
        backend = "cpu:gloo,cuda:nccl"
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    with joined_process_group(backend):
        yield


@contextlib.contextmanager
def joined_process_group(backend: str, **init_kwargs) -> Iterator[None]:
    """``dist.init_process_group(backend, **init_kwargs)`` for the duration of the block, then
    ``destroy_process_group`` with its gloo threads really stopped.

    ``torch.distributed.nn.functional`` binds ``group=group.WORLD`` as a default argument when it is
    first imported, and torch imports it lazily (the first ``torch.optim`` optimizer pulls in
    ``torch._dynamo``, which pulls it in). Imported while a group is up, those defaults keep the group
    alive after ``destroy_process_group``, so its gloo worker threads outlive it and, at interpreter
    exit, one of them releasing a finished all-reduce's tensors needs the GIL of a finalizing
    interpreter: ``terminate called without an active exception`` (SIGABRT) in a few percent of runs.
    Importing it before the group exists binds ``None`` instead.
    """
    import torch.distributed.nn  # noqa: F401  (see above: must precede init_process_group)

    dist.init_process_group(backend, **init_kwargs)
    try:
        yield
    finally:
        dist.destroy_process_group()


@dataclasses.dataclass(frozen=True)
class Shard:
    """This process's rank, the world size, and the global batches it makes."""

    rank: int
    world_size: int
    batches: list[Batch]


def shard_batches(batches: list[Batch]) -> Shard:
    """This rank's contiguous share of ``batches`` (all of them without torch.distributed)."""
    if not distributed():
        return Shard(0, 1, batches)
    rank, world = dist.get_rank(), dist.get_world_size()
    if len(batches) < world:
        raise BadInputError(
            f"{len(batches)} batch(es) of images cannot be shared by {world} processes",
            hint="ask for more images, a smaller --batch-size, or fewer processes (torchrun --nproc-per-node)",
        )
    per_rank, extra = divmod(len(batches), world)
    start = rank * per_rank + min(rank, extra)
    return Shard(rank, world, batches[start : start + per_rank + (rank < extra)])


def all_reduce_weighted_mean(
    values: list[torch.Tensor], weight: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Average per-class tensors across ranks, weighting each rank by ``weight`` (K,) (0 = absent).

    Every tensor in ``values`` has the class as its first dimension. Returns the averaged tensors and
    the summed weights; classes no rank has keep weight 0 (and zero values).
    """
    if not distributed():
        return values, weight
    w = weight.to(torch.float64)
    flat = torch.cat([(v.to(torch.float64) * w.view(-1, *[1] * (v.ndim - 1))).flatten() for v in values] + [w])
    dist.all_reduce(flat)
    total = flat[-len(w) :]
    out, offset = [], 0
    safe = total.clamp_min(1e-12)
    for v in values:
        n = v.numel()
        summed = flat[offset : offset + n].view_as(v)
        out.append((summed / safe.view(-1, *[1] * (v.ndim - 1))).to(v.dtype))
        offset += n
    return out, total.to(weight.dtype)


def average_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Replace each parameter's gradient by its mean over ranks, in one all-reduce (no-op in one process).

    Ranks that start from the same weights and apply the same averaged gradients keep the same
    weights: data-parallel training without DistributedDataParallel's wrapper.
    """
    if not distributed():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def gather_in_order(images: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate every rank's images (and labels) in rank order, on every rank."""
    if not distributed():
        return images, labels
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (images.cpu(), None if labels is None else labels.cpu()))
    merged = torch.cat([p[0] for p in parts])
    merged_labels = None if parts[0][1] is None else torch.cat([p[1] for p in parts])
    return merged.to(images.device), merged_labels


def all_reduce_max(value: float) -> float:
    """The largest ``value`` over ranks (used for wall time)."""
    if not distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def all_reduce_mean_scalar(value: float) -> float:
    """The mean of ``value`` over ranks (used for the final loss)."""
    if not distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()
