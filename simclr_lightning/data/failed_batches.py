"""A batch that one process of a distributed run could not load, and the agreement that stops
every process at the same batch because of it.

A process that raises alone leaves the others waiting in the next collective: nothing can be
saved, and the run hangs until the backend's timeout. Instead, the loader hands on a
:class:`FailedBatch`, and before a batch is used every process learns, through one all-reduce
of a host integer (a gloo group: hosts wait for each other, never for the GPU), whether some
process holds one. Then all of them raise
:class:`~simclr_lightning.errors.CorruptImageStop` before using that batch, and
:class:`~simclr_lightning.callbacks.Preemption` saves the last finished step, as it does in
one process. A failed training batch is not trained on: a resumed run reads it again.

The training loader catches the error its iterator raises (:class:`CatchFailedBatches`).
Evaluation loaders (validation, test, the kNN bank) cannot carry such an iterator, since
Lightning rebuilds them from their arguments to add its ``DistributedSampler``, and the kNN
callbacks rebuild them again; so their dataset hands on a :class:`FailedSample`
(:class:`CatchFailedSamples`) and their ``collate_fn`` makes the batch a
:class:`FailedBatch` (:class:`CollateOrFail`), both of which survive a rebuild.

Prediction has no per-batch agreement: Lightning does not pad its shards
(``UnrepeatedDistributedSamplerWrapper``), so one process may have a batch more than another,
which would wait alone in it; and there is no step to save. A prediction batch that could not
be read raises its error in the process that read it, and the processes agree once, at the
end of predict: the others then raise :class:`~simclr_lightning.errors.CorruptImageStop`
naming the file, so no process exits as if the run had succeeded with a shard missing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, default_collate

from simclr_lightning.distributed import HostGroup
from simclr_lightning.errors import CorruptImageError, CorruptImageStop, SettingError

# how long the process whose prediction batch failed waits for the others to finish theirs
PREDICT_WAIT = timedelta(days=1)


class FailedBatch:
    """Stands in a loader's output for a batch whose loading raised ``error``."""

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


class FailedSample(FailedBatch):
    """Stands in a dataset's output for a sample whose loading raised ``error``."""


class CatchFailedSamples(Dataset):
    """``dataset`` with a :class:`FailedSample` where reading a sample raised
    :class:`CorruptImageError`; other attributes are the dataset's own."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except CorruptImageError as err:
            return FailedSample(err)

    def __getattr__(self, name: str) -> Any:
        # Not the dataset's dunders: the loader would fetch through a Subset's __getitems__
        # around this catch; nor "dataset" itself before it is set (unpickling).
        if name.startswith("__") or name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


class CollateOrFail:
    """A ``collate_fn``: the batch of the first :class:`FailedSample` among ``samples`` as a
    :class:`FailedBatch`, else ``collate(samples)``."""

    def __init__(self, collate: Callable[[list[Any]], Any] | None = None) -> None:
        self.collate = collate or default_collate

    def __call__(self, samples: list[Any]) -> Any:
        for sample in samples:
            if isinstance(sample, FailedSample):
                return FailedBatch(sample.error)
        return self.collate(samples)


class StopTogether:
    """The per-step agreement of :mod:`this module <simclr_lightning.data.failed_batches>`."""

    def __init__(self, timeout: timedelta | None = None) -> None:
        self._group = HostGroup(timeout)

    def check(self, batch: Any, trainer: L.Trainer) -> None:
        """Raise :class:`CorruptImageStop` in every process when any process holds a
        :class:`FailedBatch`; call it in every process for every batch of a loader whose
        shards are padded to one length, so that each process has as many batches (this
        library's training sampler, Lightning's for validation and test; not for predict)."""
        failed = isinstance(batch, FailedBatch)
        if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            if failed:
                raise batch.error
            return
        self.agree(batch.error if failed else None, trainer)

    def ready(self) -> None:
        """Make the group now, while every process is at the same point (its connections
        then tell at once of a process that died later, where a group made later would wait
        for it)."""
        self._group.get()

    def agree(self, error: BaseException | None, trainer: L.Trainer) -> None:
        """Raise in every process when any process brings an ``error``: a file it could not
        read is :class:`CorruptImageStop` naming it, any other failure stops the others with
        its message. Every process must call it at the same point."""
        group = self._group.get()
        flag = torch.tensor([int(error is not None)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        if not int(flag[0]):
            return
        found: list[Any] = [None] * dist.get_world_size()
        mine = None
        if isinstance(error, CorruptImageError):
            mine = (trainer.global_rank, error.path, error.reason)
        elif error is not None:
            mine = (trainer.global_rank, None, f"{type(error).__name__}: {error}")
        dist.all_gather_object(found, mine, group=group)
        rank, path, reason = next(f for f in found if f is not None)
        if path is None:
            message = f"process {rank} of {trainer.world_size} failed: {reason}"
            raise (SettingError if reason.startswith("SettingError") else RuntimeError)(message)
        if rank != trainer.global_rank:
            reason = f"{reason}; read by process {rank} of {trainer.world_size}"
        raise CorruptImageStop(path, reason)


class AgreesAfterPredict:
    """A data module's agreement at the end of a distributed ``predict`` over image files:
    the process whose batch failed joins it at once (``on_exception``), the others when
    they have predicted their whole shard (``teardown``); then all of them fail, naming the
    file. Its gloo group waits as long as the others take (a process group's timeout, 30
    minutes by default, would end the wait before an ImageNet-size shard is done)."""

    trainer: L.Trainer | None
    reads_image_files: bool

    def _agrees_after_predict(self) -> bool:
        trainer = self.trainer
        distributed = dist.is_available() and dist.is_initialized()
        if not (distributed and trainer is not None and trainer.world_size > 1):
            return False
        return self.reads_image_files and trainer.state.fn == "predict"

    def _predict_agreement(self) -> StopTogether:
        if "_after_predict" not in self.__dict__:
            self._after_predict = StopTogether(timeout=PREDICT_WAIT)
        return self._after_predict

    def setup_predict_agreement(self, stage: str) -> None:
        """Call in ``setup``: every process is there."""
        self._agreed = False
        if stage == "predict" and self._agrees_after_predict():
            self._predict_agreement().ready()

    def refuse_empty_shards(self, n_images: int, what: str) -> None:
        """Refuse a ``predict`` of fewer images than processes: Lightning's sampler leaves a
        process no image and fails there with a bare assertion while the others wait in a
        collective, a hang a SIGTERM did not end. Every process raises at once."""
        world = self.trainer.world_size if self.trainer is not None else 1
        if n_images < world:
            most = max(n_images, 1)
            raise SettingError(
                f"{what} holds {n_images} image(s) for {world} processes, and each predicts "
                f"its own share: one would have none; predict on at most {most} device(s) "
                f"(--trainer.devices {most})"
            )

    def on_exception(self, exception: BaseException) -> None:
        # The process that failed (whatever the error: the others would wait for it); its
        # own error goes on. Once: not again for a failure of the agreement itself.
        if getattr(self, "_agreed", True) or not self._agrees_after_predict():
            return
        self._agreed = True
        try:
            self._predict_agreement().agree(exception, self.trainer)
        except Exception:  # noqa: BLE001 (the agreement's own raise, or a peer gone)
            pass

    def teardown(self, stage: str) -> None:
        if stage == "predict" and not getattr(self, "_agreed", True):
            self._agreed = True
            if self._agrees_after_predict():
                self._predict_agreement().agree(None, self.trainer)


class ChecksBatches(AgreesAfterPredict):
    """The data module's side of :class:`StopTogether`: which of its batches every process
    checks together, and where (a mixin of :class:`~simclr_lightning.data.SimCLRDataModule`,
    which provides the attributes below)."""

    trainer: L.Trainer | None
    reads_image_files: bool
    device_store: Any
    on_device: bool
    _stop_together: StopTogether

    @property
    def stops_together(self) -> bool:
        """Whether training batches read files under DDP: the loader then hands on a batch it
        could not read, and every process checks each batch together."""
        distributed = self.trainer is not None and self.trainer.world_size > 1
        return self.reads_image_files and self.device_store is None and distributed

    @property
    def evaluation_stops_together(self) -> bool:
        """Whether evaluation batches read files under DDP (they never live on the device)."""
        distributed = self.trainer is not None and self.trainer.world_size > 1
        return self.reads_image_files and distributed

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # unpadded shards: no agreement (see the module); a stand-in trainer may lack the flag
        if getattr(self.trainer, "predicting", False):
            if isinstance(batch, FailedBatch):
                raise batch.error
            return batch
        training = self.trainer.training
        # views made on the device: checked after the transfer, once decoded there
        if not (training and self.on_device):
            self.check_batch(batch, training=training)
        return batch

    def check_batch(self, batch, training: bool = False) -> None:
        """Under DDP, stop every process together at a batch one of them could not read.
        Every process calls it for every batch of one of this module's padded loaders:
        Lightning's training, validation and test loops through :meth:`on_before_batch_transfer`
        (training batches whose views are made on the device through
        ``on_after_batch_transfer``, once decoded), the kNN callbacks for the bank; not
        predict's loop, whose shards may differ in length."""
        if self.stops_together if training else self.evaluation_stops_together:
            self._stop_together.check(batch, self.trainer)
