"""Gathering Python objects across processes (Lightning DDP), a no-op in a single process.

Object collectives work with every backend (gloo on CPU, NCCL on GPU), so CPU tensors held for exact
metrics or bank building never need to be moved to a GPU to be gathered.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch.distributed as dist

T = TypeVar("T")


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def gather_to_zero(obj: T) -> list[T] | None:
    """Every process's ``obj`` on rank 0 (in rank order); ``None`` on the other ranks."""
    if world_size() == 1:
        return [obj]
    gathered: list[Any] | None = [None] * world_size() if rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def all_gather(obj: T) -> list[T]:
    """Every process's ``obj`` on every process, in rank order."""
    if world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_from_zero(obj: T) -> T:
    """Rank 0's ``obj`` on every process."""
    if world_size() == 1:
        return obj
    holder: list[Any] = [obj if rank() == 0 else None]  # rank 0's object on every process after this
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
