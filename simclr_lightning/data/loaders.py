"""The training loader that a checkpoint can resume in the middle of an epoch."""

from __future__ import annotations

import math
import os
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.data import suggested_max_num_workers
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from simclr_lightning.data.failed_batches import CatchFailedBatches
from simclr_lightning.data.sampler import ResumableSampler, SeededSamples, sample_seed
from simclr_lightning.errors import SettingError
from simclr_lightning.stop_position import epoch_in_progress

MAX_AUTO_WORKERS = 16
_SAID_WORKERS: set[int] = set()  # counts already said: once each, not at every loader


def loader_workers(num_workers: int | None, trainer: L.Trainer | None) -> int:
    """Loader processes per device: ``num_workers``, or what suits this machine."""
    if num_workers is not None:
        return num_workers
    devices = trainer.num_devices if trainer is not None else 1
    chosen = min(MAX_AUTO_WORKERS, suggested_max_num_workers(devices))
    if chosen not in _SAID_WORKERS:
        _SAID_WORKERS.add(chosen)
        rank_zero_info(
            f"simclr-lightning: data.num_workers={chosen} (cores per device minus one, at most "
            f"{MAX_AUTO_WORKERS}); set --data.num_workers to choose"
        )
    return chosen


def check_batch_size(
    n_images: int, batch_size: int, world: int, drop_last: bool, task: str
) -> None:
    """Refuse, before training, a per-device batch the shards cannot fill where the last
    partial batch is dropped, or a pretraining last batch of one image in one process (NT-Xent
    needs two in the global batch; ``classify`` leaves such a batch out instead, see
    :class:`ResumableSampler`)."""
    per_rank = math.ceil(n_images / world)  # DistributedSampler pads to equal shards
    if drop_last and per_rank < batch_size:
        raise SettingError(
            f"data.batch_size={batch_size} is larger than the {per_rank} training "
            f"images each of the {world} process(es) gets ({n_images} in all): lower "
            f"data.batch_size or use more data"
        )
    if not drop_last and task == "pretrain" and world == 1 and per_rank % batch_size == 1:
        raise SettingError(
            f"data.batch_size={batch_size} leaves a last batch of 1 image ({n_images} in "
            f"all), which holds no negative for NT-Xent: set data.drop_last=true or change "
            f"data.batch_size"
        )
    if not drop_last and task == "classify" and per_rank < 2:
        raise SettingError(
            f"data.task='classify' needs at least 2 training images per process to train "
            f"BatchNorm, but each of the {world} process(es) gets {per_rank} ({n_images} in "
            f"all): use more labelled images or fewer processes"
        )


def order_seed(trainer: L.Trainer | None) -> int:
    """The seed of the training order and views: ``seed_everything``'s seed (Lightning's own
    ``DistributedSampler`` takes the same), else a random one from rank 0, shared by all ranks
    (their shards must come from one shuffle). Checkpoints keep it."""
    if "PL_GLOBAL_SEED" in os.environ:
        return int(os.environ["PL_GLOBAL_SEED"])
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    return trainer.strategy.broadcast(seed) if trainer is not None else seed


def training_position(trainer: L.Trainer) -> tuple[int, int]:
    """(epoch, batches of it trained on) at this moment of a fit; at an epoch's end the next
    epoch's start. Read from Lightning's loop counters, not counted in the loader, whose
    fetcher runs a batch ahead of training."""
    batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    # the epoch those batches are of: Lightning's current epoch moves on when it counts the
    # epoch done, which a save after it (a stop in the end-of-epoch validation or kNN pass,
    # max_steps, max_time) comes after
    epoch = max(0, epoch_in_progress(trainer))
    if batches >= trainer.num_training_batches:
        return epoch + 1, 0
    return epoch, batches


def _batches(images: int, batch_size: int, drop_last: bool) -> int:
    return images // batch_size if drop_last else math.ceil(images / batch_size)


def align_resumed_epoch(trainer: L.Trainer) -> int | None:
    """A checkpoint taken in the middle of an epoch and resumed with another global batch
    (another ``data.batch_size`` or number of processes): move Lightning's count of the
    epoch's batches (restored in the checkpoint's batches) to this run's batches of the same
    images, which the data module's loader skips. Otherwise Lightning would end the epoch
    after as many batches as the two counts differ too early (a larger batch: the epoch's
    last images left out) or let the loader run dry first. This run's batches of the epoch
    trained on, or None when nothing changed. Call in ``on_train_start`` (every caller gets
    the same answer: the schedule's and the online probe's)."""
    order = getattr(trainer.datamodule, "train_order", None)
    at = getattr(order, "loop_at", None)
    if at is None or trainer.current_epoch != at[0]:
        return None
    _, was, now = at
    progress = trainer.fit_loop.epoch_loop.batch_progress
    if progress.current.processed == now:  # moved already (or nothing to move)
        return now
    if progress.current.processed != was:
        return None  # not resumed at that point (an end-of-epoch restart, another fit)
    for tracker in (progress.current, progress.total):
        tracker.ready += now - was
        tracker.started += now - was
        tracker.processed += now - was
        tracker.completed += now - was
    if order.resumed_at is not None:  # Lightning counts those images in this run's batches
        order.resumed_at = (*order.resumed_at[:2], now)
    return now


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler`. It has ``state_dict`` and
    ``load_state_dict``, so Lightning counts it as a resumable ("stateful") train loader and
    saves its position; :class:`TrainOrder` applies that position when it builds the loader."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.order: TrainOrder | None = None
        # under DDP: a batch that fails to load becomes a FailedBatch (see failed_batches)
        self.catch_failed = False

    def __iter__(self) -> Any:
        iterator = super().__iter__()
        return CatchFailedBatches(iterator) if self.catch_failed else iterator

    def state_dict(self) -> dict[str, int]:
        return self.order.state_dict() if self.order is not None else {}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if self.order is not None and state:
            self.order.load_state_dict(state)
            self.order.apply(self)


class TrainOrder:
    """The seed and the resume point of the training order, which a data module keeps in its
    checkpointed state. Lightning loads a data module's state before it first builds the train
    loader (which ``estimated_stepping_batches`` does before the loops are restored and the
    loader's own state is loaded), so the loader starts at the right place however early it
    is built."""

    def __init__(self) -> None:
        self.trainer: L.Trainer | None = None
        self.seed: int | None = None
        self.resume: tuple[int, int] | None = None  # (epoch, batches trained on)
        self.global_batch: int | None = None  # images per step over all processes, this run
        self.saved_images: int | None = None  # of the checkpoint's epoch, all processes'
        # (epoch, the checkpoint's batches, this run's batches of the same images): for
        # :func:`align_resumed_epoch`, when the global batch has changed
        self.loop_at: tuple[int, int, int] | None = None
        # (epoch, images skipped at the resume, Lightning's count of batches for them): a
        # later save of that epoch counts its images from there, not in this run's batches
        self.resumed_at: tuple[int, int, int] | None = None

    def state_dict(self) -> dict[str, int]:
        if self.trainer is None and self.seed is not None:
            rank_zero_warn(
                "the training loader was built without a Trainer (dm.train_dataloader() passed "
                "as train_dataloaders): a checkpoint in the middle of an epoch resumes at its "
                "start; pass the data module (datamodule=dm) to resume at the batch"
            )
        if self.trainer is None or self.seed is None:
            return {}
        epoch, batches = training_position(self.trainer)
        state = {"seed": self.seed, "epoch": epoch, "batches": batches}
        if not self.global_batch:
            return state
        images = batches * self.global_batch
        if self.resumed_at is not None and self.resumed_at[0] == epoch and batches:
            _, skipped, counted = self.resumed_at
            images = skipped + (batches - counted) * self.global_batch
        return state | {"images": images}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state:
            self.seed, self.resume = state["seed"], (state["epoch"], state["batches"])
            self.saved_images = state.get("images")  # None: an older checkpoint

    def apply(self, loader: ResumableLoader) -> None:
        """Seed the loader's order and start it where the checkpoint left off: after the
        images the checkpoint's batches hold, over all processes. Every process's shard
        interleaves one order (``DistributedSampler``'s ``order[rank::world]``), so the first
        ``batches x global batch`` of it are the images trained on whatever the number of
        processes; in batches of this run they can be another count (``loop_at``)."""
        sampler = loader.sampler
        assert isinstance(sampler, ResumableSampler) and loader.batch_size is not None
        sampler.seed = self.seed if self.seed is not None else sampler.seed
        self.global_batch = loader.batch_size * sampler.num_replicas
        self.loop_at = self.resumed_at = None
        if self.resume is None:
            return
        epoch, batches = self.resume
        images = self.saved_images
        if images is None:  # an older checkpoint: its batches, taken as this run's
            images = batches * self.global_batch
        skip = min(images // sampler.num_replicas, sampler.kept)
        sampler.resume_at(epoch, skip)
        sampler.on_resumed = self._spent
        self.resumed_at = (epoch, skip * sampler.num_replicas, batches)
        if skip != batches * loader.batch_size:  # Lightning's count is of other batches
            size, drop = loader.batch_size, loader.drop_last
            done = _batches(sampler.kept, size, drop) - _batches(sampler.kept - skip, size, drop)
            self.loop_at = (epoch, batches, done)
            limit = getattr(self.trainer, "limit_train_batches", None)
            if isinstance(limit, int) and 0 < limit <= done:  # Lightning would run it again
                raise SettingError(
                    f"trainer.limit_train_batches={limit} ends epoch {epoch} of this run (global "
                    f"batch {self.global_batch}) within the {skip * sampler.num_replicas} images "
                    f"the checkpoint trained in it ({done} of its batches): resume with the "
                    f"checkpoint's global batch or without an integer limit_train_batches"
                )

    def _spent(self) -> None:
        """The resumed epoch has started: a loader built later (a fresh fit of this data
        module) starts its epoch from the beginning, not after the checkpoint's batches."""
        self.resume = None

    def loader(
        self,
        dataset: Dataset,
        trainer: L.Trainer | None,
        batch_size: int,
        seeded: bool,
        catch_failed: bool = False,
        drop_single_last: bool = False,
        **kwargs: Any,
    ) -> ResumableLoader:
        """The shuffled training loader: ``seeded`` gives each sample's transform its own seed
        (views made in the loader); each rank of ``trainer`` reads its own shard;
        ``catch_failed`` yields a :class:`FailedBatch` for a batch that fails to load;
        ``drop_single_last`` leaves out a last batch of one image."""
        self.trainer = trainer
        if self.seed is None:
            self.seed = order_seed(trainer)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        sampler = ResumableSampler(
            len(dataset),
            num_replicas=world,
            rank=rank,
            seed=self.seed,
            single_last_of=batch_size if drop_single_last else None,
        )
        loader = ResumableLoader(
            SeededSamples(dataset, seeded=seeded),
            batch_size=batch_size,
            sampler=sampler,
            # the workers' base seed comes from here, not from the global generator, and differs
            # per rank: torch seeds each worker's torch, NumPy and random from it (samples are
            # reseeded by SeededSamples; this covers the unseeded path and worker_init_fn code)
            generator=torch.Generator().manual_seed(sample_seed(self.seed, -1, rank)),  # no epoch
            **kwargs,
        )
        loader.order = self
        loader.catch_failed = catch_failed
        self.apply(loader)
        return loader
