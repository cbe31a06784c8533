"""The training order, and per-sample augmentation seeds, as functions of (seed, epoch, position).

A resumed run must see the same images in the same order with the same random views as the
run it continues. Loader workers run ahead of training (prefetch) in other processes, so
their random state at a checkpoint cannot be saved; instead every sample's view randomness is
seeded from ``(seed, epoch, index)`` and the order from ``(seed, epoch)``, as
``DistributedSampler`` orders. A resumed epoch then only has to skip the batches already seen.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler, get_worker_info

from simclr_lightning.errors import SettingError


def seed_all(seed: int) -> None:
    """Seed torch's, NumPy's and ``random``'s global generators from one 63-bit seed."""
    torch.random.default_generator.manual_seed(seed)
    np.random.seed([seed & 0xFFFFFFFF, seed >> 32])  # NumPy takes 32-bit words
    random.seed(seed)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's views in one epoch: distinct per sample and epoch, so a
    plain run still draws new views every epoch, and each rank draws for its own images."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class ResumableSampler(DistributedSampler):
    """``DistributedSampler``'s order (each rank its shard of one ``seed + epoch`` shuffle; one
    rank when not distributed), yielding ``(index, view_seed)`` for :class:`SeededSamples`.

    Being a ``DistributedSampler``, Lightning keeps it (no sampler injection) and calls
    ``set_epoch`` before every epoch. :meth:`resume_at` makes the next pass over ``epoch``
    start after ``samples`` of its indices: the ones a checkpoint already trained on.

    ``single_last_of``, a batch size, leaves out each epoch's last index when it alone would
    make the last batch (a training BatchNorm cannot use one image). Every rank's shard has
    the same size, so all ranks leave it out together and take the same number of steps.
    """

    def __init__(
        self,
        dataset_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        single_last_of: int | None = None,
    ) -> None:
        super().__init__(
            range(dataset_size), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed
        )
        self._skip: tuple[int, int] | None = None  # (epoch, samples to skip in it)
        self.on_resumed: Callable[[], None] | None = None  # called once the skip is applied
        self.single_last_of = single_last_of

    @property
    def kept(self) -> int:
        """This rank's indices per epoch: its shard, less a last one that would batch alone."""
        size, batch = self.num_samples, self.single_last_of
        return size - 1 if batch is not None and size > 1 and size % batch == 1 else size

    def resume_at(self, epoch: int, samples: int) -> None:
        self.set_epoch(epoch)
        self._skip = (epoch, samples)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else None
        if world not in (None, self.num_replicas):  # Lightning keeps a DistributedSampler
            raise SettingError(
                f"the training loader was built for {self.num_replicas} process(es) but this run "
                f"has {world}: every process would train on the same batches; pass the data "
                f"module (trainer.fit(model, datamodule=dm)) so that each reads its own shard"
            )
        indices = list(super().__iter__())[: self.kept]
        if self._skip is not None and self._skip[0] == self.epoch:
            indices = indices[self._skip[1] :]
            self._skip = None
            if self.on_resumed is not None:
                self.on_resumed()
        seed, epoch = self.seed, self.epoch
        return ((i, sample_seed(seed, epoch, i)) for i in indices)  # hashed as consumed

    def __len__(self) -> int:
        return self.kept


class SeededSamples(Dataset):
    """``dataset[index]`` with torch's, NumPy's and ``random``'s global random states seeded by
    the sampler's view seed, so its transform's draws (a user's NumPy or ``random`` ones too)
    depend only on (seed, epoch, index): different on each rank, which reads other indices,
    and the same after a resume and whatever the number of workers (seed_everything gives
    every rank the same generators, and the data modules' own ``worker_init_fn`` keeps
    Lightning's rank-aware worker seeding out). In a worker the states are simply reseeded
    (nothing else uses them); in the main process (``num_workers=0``) they are restored
    afterwards, so the model's own randomness is left alone."""

    def __init__(self, dataset: Dataset, seeded: bool = True) -> None:
        self.dataset = dataset
        self.seeded = seeded

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int] | int) -> Any:
        if not isinstance(key, tuple):  # Lightning's own sampler (overfit_batches): unseeded
            return self.dataset[key]
        index, seed = key
        if not self.seeded:
            return self.dataset[index]
        if get_worker_info() is not None:
            seed_all(seed)
            return self.dataset[index]
        states = torch.get_rng_state(), np.random.get_state(), random.getstate()
        seed_all(seed)
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(states[0])
            np.random.set_state(states[1])
            random.setstate(states[2])

    def __getattr__(self, name: str) -> Any:  # classes, targets ... of the wrapped dataset
        # not its dunders: a batched __getitems__ would take the (index, seed) keys unwrapped
        if name == "dataset" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)
