"""Small helpers for running hwprune under ``torch.distributed`` (DistributedDataParallel).

Everything here is a no-op in a single process: ``is_distributed()`` is true only when a
default process group is initialised with more than one rank (and not inside ``local()``).

The rule the pruners follow (see docs/distributed.md): every decision a method takes from
rank-local numbers (masks from weight magnitudes, PSP's keep flags, ADMM's Z/U, DARB's block
sizes) is replaced by rank 0's with a broadcast right after it is taken, so every rank holds
the same pruner state whatever its floating-point arithmetic did. Those broadcasts are
collectives: every rank must call the same pruner verbs in the same order, as a DDP training
loop does anyway.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import ConfigError, HwpruneError

__all__ = ["is_distributed", "rank", "world_size", "is_main", "local", "broadcast_tensors",
           "broadcast_object", "all_reduce_sum", "main_only", "init_from_env", "shutdown",
           "wrap_ddp", "shard"]

T = TypeVar("T")
_local_depth = 0


def is_distributed() -> bool:
    """Whether collectives apply: a default process group with more than one rank, outside
    ``local()``."""
    return (_local_depth == 0 and dist.is_available() and dist.is_initialized()
            and dist.get_world_size() > 1)


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0, or a single process: the one that writes files."""
    return rank() == 0


@contextlib.contextmanager
def local() -> Iterator[None]:
    """Inside this block hwprune does no collectives, e.g. to build or evaluate a pruner on
    one rank only (a collective that the other ranks never join would hang)."""
    global _local_depth
    _local_depth += 1
    try:
        yield
    finally:
        _local_depth -= 1


def _wire_dtype(t: Tensor) -> torch.dtype:
    # bool travels as uint8 (same size; not every backend reduces or sends bool)
    return torch.uint8 if t.dtype == torch.bool else t.dtype


@torch.no_grad()
def broadcast_tensors(tensors: Sequence[Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values (one flat broadcast per
    dtype and device). Parameters are written through ``detach()``: no autograd record."""
    if not is_distributed():
        return
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((_wire_dtype(t), t.device), []).append(t.detach())
    for (dtype, _), ts in groups.items():  # the same order on every rank
        flat = torch.cat([t.reshape(-1).view(dtype) if t.dtype == torch.bool
                          else t.reshape(-1) for t in ts])
        dist.broadcast(flat, src)
        i = 0
        for t in ts:
            n = t.numel()
            chunk = flat[i:i + n].reshape(t.shape)
            t.copy_(chunk.view(torch.bool) if t.dtype == torch.bool else chunk)
            i += n


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (pickled; for small state, not for weights)."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src)
    return box[0]


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """The sums over the ranks of a few numbers (float64, one collective)."""
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().tolist()


def main_only(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` on rank 0 only; every rank returns its result (broadcast). When ``fn``
    raises, rank 0 re-raises it and the other ranks raise the same ``HwpruneError`` (or an
    ``HwpruneError`` naming the exception), so no rank waits for a rank 0 that gave up."""
    if not is_distributed():
        return fn(*args, **kwargs)
    result, error, raised = None, None, None
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except Exception as e:
            raised = e
            error = e if isinstance(e, HwpruneError) else HwpruneError(
                f"rank 0 failed: {type(e).__name__}: {e}")
    result, error = broadcast_object((result, error))
    if raised is not None:
        raise raised
    if error is not None:
        raise error
    return result


def init_from_env(backend: str = "gloo") -> bool:
    """Initialise the default process group from torchrun's environment (``WORLD_SIZE`` > 1;
    ``RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) unless one exists. ``backend``: ``"gloo"``
    (CPU tensors; the runner trains on the CPU) or ``"nccl"`` (CUDA tensors, one GPU per
    ``LOCAL_RANK``). Returns whether it initialised one."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this PyTorch has no torch.distributed")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def shutdown(timeout_s: float = 60.0) -> None:
    """End the default process group, if one exists: wait for every rank (at most
    ``timeout_s``; gloo), then destroy it. Drop DistributedDataParallel wrappers first. A
    torchrun process that exits with the group (or a DDP reducer) alive can abort while the
    interpreter tears down gloo's threads (SIGABRT, "terminate called without an active
    exception"); bench/distributed/torchrun_exit.py measures how often, with and without this call
    (docs/distributed.md cites the figures)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if dist.get_world_size() > 1:
            if dist.get_backend() == "gloo":  # names a rank that never arrives
                dist.monitored_barrier(timeout=timedelta(seconds=timeout_s))
            else:
                dist.barrier()
    except RuntimeError:
        pass  # a rank that failed or left: its own error is the one to report
    finally:
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module) -> nn.Module | None:
    """``DistributedDataParallel(model)`` when distributed (None otherwise). Wrap after the
    pruner exists, and wrap again whenever the model's parameters change (a new pruner,
    ``finalize()``, ``shrink``): DDP registers the parameters it sees at wrap time."""
    if not is_distributed():
        return None
    device = next(model.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def shard(*tensors: Tensor) -> tuple[Tensor, ...]:
    """This rank's rows ``rank::world_size`` of a global batch (the whole batch in a single
    process). Shards differ in size by at most one row."""
    if not is_distributed():
        return tensors
    n, r, w = len(tensors[0]), rank(), world_size()
    if n < w:
        raise ConfigError(f"a batch of {n} rows cannot be split over {w} ranks; allowed: "
                          f"train.batch_size >= {w} (the batch size is global)")
    return tuple(t[r::w] for t in tensors)
