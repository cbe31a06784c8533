"""A training batch that one process of a distributed run could not load, and the agreement
that stops every process at the same step because of it.

A process that raises alone leaves the others waiting in the next collective: nothing can be
saved, and the run hangs until the backend's timeout. Instead, the training loader hands on a
:class:`FailedBatch`, and before a batch is used every process learns, through one all-reduce
of a host integer (a gloo group: hosts wait for each other, never for the GPU), whether some
process holds one. Then all of them raise
:class:`~simclr_lightning.errors.CorruptImageStop` before training that step, and
:class:`~simclr_lightning.callbacks.Preemption` saves the last finished step, as it does in
one process. The failed batch is not trained on: a resumed run reads it again.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
import torch.distributed as dist

from simclr_lightning.errors import CorruptImageError, CorruptImageStop


class FailedBatch:
    """Stands in a training loader's output for a batch whose loading raised ``error``."""

    def __init__(self, error: CorruptImageError) -> None:
        self.error = error

    def __repr__(self) -> str:
        return f"FailedBatch({self.error.path!r})"


class CatchFailedBatches:
    """A loader's iterator that yields a :class:`FailedBatch` where loading a batch raised
    :class:`CorruptImageError` (from a worker too), and goes on with the next batch."""

    def __init__(self, iterator: Iterator[Any]) -> None:
        self.iterator = iterator

    def __iter__(self) -> CatchFailedBatches:
        return self

    def __next__(self) -> Any:
        try:
            return next(self.iterator)
        except CorruptImageError as err:
            return FailedBatch(err)


class StopTogether:
    """The per-step agreement of :mod:`this module <simclr_lightning.data.failed_batches>`."""

    def __init__(self) -> None:
        self._group: Any = None

    def check(self, batch: Any, trainer: L.Trainer) -> None:
        """Raise :class:`CorruptImageStop` in every process when any process holds a
        :class:`FailedBatch`; call it in every process for every training batch."""
        failed = isinstance(batch, FailedBatch)
        if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            if failed:
                raise batch.error
            return
        group = self.group()
        flag = torch.tensor([int(failed)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        if not int(flag[0]):
            return
        found: list[Any] = [None] * dist.get_world_size()
        mine = (trainer.global_rank, batch.error.path, batch.error.reason) if failed else None
        dist.all_gather_object(found, mine, group=group)
        rank, path, reason = next(f for f in found if f is not None)
        if rank != trainer.global_rank:
            reason = f"{reason}; read by process {rank} of {trainer.world_size}"
        raise CorruptImageStop(path, reason)

    def group(self) -> Any:
        """A gloo group, made on first use (every process reaches it at the same step)."""
        if self._group is None:
            gloo = dist.get_backend() == "gloo"
            self._group = dist.group.WORLD if gloo else dist.new_group(backend="gloo")
        return self._group
