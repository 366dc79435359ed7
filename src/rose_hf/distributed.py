"""Data-parallel pruning over ``torch.distributed`` (launch with ``torchrun``; any backend).

Every rank holds the model and the same calibration list. Rank ``r`` of ``w`` runs batches
``r, r + w, ...`` through each block; the ``X^T X`` sums and token counts are all-reduced, so every
rank sees the Hessian of all batches; each module is pruned on one rank (round robin) and its new
weight broadcast. ``RosePruner`` does this by itself whenever a process group is initialised.

A single process is a ``World`` of size 1 whose collectives do nothing, so the pipeline calls them
unconditionally and never asks whether it is distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place in the job: ``rank`` of ``size`` (``size == 1``: not distributed)."""

    rank: int = 0
    size: int = 1

    @property
    def lead(self) -> bool:
        """Whether this is rank 0, the one that warns and writes."""
        return self.rank == 0

    def owner(self, index: int) -> int:
        """The rank that prunes the ``index``-th module."""
        return index % self.size

    def share(self, items: list[Any]) -> list[Any]:
        """This rank's share of the calibration batches."""
        if self.size > 1 and len(items) < self.size:
            raise ValueError(
                f"{len(items)} calibration batches cannot be shared by {self.size} processes; pass at least one "
                "batch per process."
            )
        return items[self.rank :: self.size]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all ranks, in place; returned for convenience."""
        if self.size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_tensor(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Overwrite ``tensor`` on every rank with rank ``src``'s values."""
        if self.size > 1:
            dist.broadcast(tensor, src=src)
        return tensor

    def broadcast_object(self, value: Any, src: int) -> Any:
        """Rank ``src``'s picklable ``value`` on every rank."""
        if self.size == 1:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=src)
        return holder[0]

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's picklable ``value``, in rank order, on every rank."""
        if self.size == 1:
            return [value]
        holder: list[Any] = [None] * self.size
        dist.all_gather_object(holder, value)
        return holder


def current_world() -> World:
    """The default process group, or a single-process world when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def local_cuda_device(world: World) -> torch.device:
    """The GPU a rank should use under ``torchrun`` (``LOCAL_RANK``), else GPU ``rank % count``."""
    local = int(os.environ.get("LOCAL_RANK", world.rank))
    return torch.device("cuda", local % max(1, torch.cuda.device_count()))
