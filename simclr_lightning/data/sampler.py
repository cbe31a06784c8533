"""The training order, and per-sample augmentation seeds, as functions of (seed, epoch, position).

A resumed run must see the same images in the same order with the same random views as the
run it continues. Loader workers run ahead of training (prefetch) in other processes, so
their random state at a checkpoint cannot be saved; instead every sample's view randomness is
seeded from ``(seed, epoch, index)`` and the order from ``(seed, epoch)``, as
``DistributedSampler`` orders. A resumed epoch then only has to skip the batches already seen.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, DistributedSampler, get_worker_info


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
    start after ``batches`` batches of ``batch_size``: the ones a checkpoint already trained on.
    """

    def __init__(
        self,
        dataset_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(
            range(dataset_size), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed
        )
        self._skip: tuple[int, int] | None = None  # (epoch, samples to skip in it)

    def resume_at(self, epoch: int, batches: int, batch_size: int) -> None:
        self.set_epoch(epoch)
        self._skip = (epoch, batches * batch_size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())
        if self._skip is not None and self._skip[0] == self.epoch:
            indices = indices[self._skip[1] :]
            self._skip = None
        seed, epoch = self.seed, self.epoch
        return ((i, sample_seed(seed, epoch, i)) for i in indices)  # hashed as consumed

    def __len__(self) -> int:
        return self.num_samples


class SeededSamples(Dataset):
    """``dataset[index]`` with torch's random state seeded by the sampler's view seed, so its
    transform's draws depend only on (seed, epoch, index). In a worker the worker's generator is
    simply reseeded (nothing else uses it); in the main process (``num_workers=0``) the global
    generator is restored afterwards, so the model's own randomness is left alone."""

    def __init__(self, dataset: Dataset, seeded: bool = True) -> None:
        self.dataset = dataset
        self.seeded = seeded

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        if not self.seeded:
            return self.dataset[index]
        if get_worker_info() is not None:
            torch.random.default_generator.manual_seed(seed)
            return self.dataset[index]
        state = torch.get_rng_state()
        torch.random.default_generator.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(state)

    def __getattr__(self, name: str) -> Any:  # classes, targets ... of the wrapped dataset
        # not its dunders: a batched __getitems__ would take the (index, seed) keys unwrapped
        if name == "dataset" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)
