"""Index batches + a device-resident store, sharded by torch's DistributedSampler.

Lightning injects ``DistributedSampler(dataset, num_replicas=W, rank=r, shuffle=True,
seed=s)`` under DDP and calls ``set_epoch`` each epoch; these tests build the same
sampler by hand for every rank of a simulated world, so no process group is needed.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from simclr_lightning.device_data import DeviceImageStore, IndexDataset


def _shards(
    n: int, world: int, epoch: int, seed: int = 7, drop_last: bool = False, batch_size: int = 8
) -> list[list[int]]:
    """Indices each rank's DataLoader yields in ``epoch``, in order."""
    dataset = IndexDataset(n)
    shards = []
    for rank in range(world):
        sampler = DistributedSampler(
            dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=drop_last
        )
        sampler.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=0)
        batches = list(loader)
        assert all(b.dtype == torch.int64 for b in batches)
        shards.append(torch.cat(batches).tolist())
    return shards


def test_index_dataset_yields_its_indices() -> None:
    dataset = IndexDataset(10)
    assert len(dataset) == 10
    assert [dataset[i] for i in range(10)] == list(range(10))
    with pytest.raises(IndexError):
        dataset[10]
    batches = list(DataLoader(dataset, batch_size=4, shuffle=False))
    assert [b.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(ValueError):
        IndexDataset(-1)


@pytest.mark.parametrize("world", [2, 3])
def test_shards_are_disjoint_and_complete(world: int) -> None:
    n = 60  # divisible by 2 and 3
    for epoch in range(3):
        shards = _shards(n, world, epoch)
        assert all(len(s) == n // world for s in shards)
        for a in range(world):
            for b in range(a + 1, world):
                assert not set(shards[a]) & set(shards[b])
        assert sorted(i for s in shards for i in s) == list(range(n))


@pytest.mark.parametrize("world", [2, 3])
def test_set_epoch_reshuffles_and_keeps_completeness(world: int) -> None:
    n = 60
    orders = [_shards(n, world, epoch) for epoch in range(4)]
    for rank in range(world):
        per_epoch = [tuple(o[rank]) for o in orders]
        assert len(set(per_epoch)) == 4  # a new order every epoch
        # ...and a new subset: shards are not fixed partitions across epochs.
        assert len({frozenset(p) for p in per_epoch}) > 1
    for shards in orders:
        assert sorted(i for s in shards for i in s) == list(range(n))
    # Same epoch, same seed: identical on every call (all ranks agree on the permutation).
    assert _shards(n, world, 2) == orders[2]
    # Without set_epoch the order would repeat: the sampler's epoch defaults to 0.
    assert _shards(n, world, 0) == orders[0]


@pytest.mark.parametrize("world", [2, 3])
def test_non_divisible_size_pads_or_drops(world: int) -> None:
    """n % world != 0. drop_last=False (Lightning's default for training): each rank
    gets ceil(n / world) indices; the union is still complete, and the padding
    repeats the first ``world * ceil(n / world) - n`` indices of the epoch's
    permutation, so those few images are seen twice. drop_last=True: each rank gets
    floor(n / world), shards stay disjoint, and ``n % world`` images are skipped."""
    n = 61
    padded = -(-n // world) * world
    for epoch in range(2):
        shards = _shards(n, world, epoch)
        assert all(len(s) == padded // world for s in shards)
        everything = [i for s in shards for i in s]
        assert set(everything) == set(range(n))
        counts = Counter(everything)
        assert sorted(counts.values()) == [1] * (2 * n - padded) + [2] * (padded - n)
        permutation = torch.randperm(n, generator=torch.Generator().manual_seed(7 + epoch))
        assert {i for i, c in counts.items() if c == 2} == set(permutation[: padded - n].tolist())

        dropped = _shards(n, world, epoch, drop_last=True)
        assert all(len(s) == n // world for s in dropped)
        union = [i for s in dropped for i in s]
        assert len(union) == len(set(union)) == n - n % world


def _store(n: int = 50) -> DeviceImageStore:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return DeviceImageStore(images, labels)


def test_gather_returns_exactly_the_indexed_rows() -> None:
    store = _store()
    indices = torch.tensor([3, 0, 49, 3, 17, 17, 25])  # any order, repeats allowed
    images, labels = store.gather(indices)
    expected_images = torch.stack([store.images[int(i)] for i in indices])
    expected_labels = torch.tensor([int(store.labels[int(i)]) for i in indices])
    assert images.dtype == torch.uint8 and images.shape == (7, 3, 8, 8)
    assert torch.equal(images, expected_images)
    assert torch.equal(labels, expected_labels)
    assert images.device == indices.device

    empty_images, empty_labels = store.gather(torch.empty(0, dtype=torch.long))
    assert empty_images.shape == (0, 3, 8, 8) and empty_labels.shape == (0,)


def test_loader_plus_store_reproduces_the_dataset_per_rank() -> None:
    store = _store(60)
    dataset = IndexDataset(len(store))
    seen = []
    for rank in range(3):
        sampler = DistributedSampler(dataset, num_replicas=3, rank=rank, shuffle=True, seed=1)
        sampler.set_epoch(5)
        for batch in DataLoader(dataset, batch_size=16, sampler=sampler):
            images, labels = store.gather(batch)
            for k, i in enumerate(batch.tolist()):
                assert torch.equal(images[k], store.images[i])
                assert labels[k] == store.labels[i]
            seen += batch.tolist()
    assert sorted(seen) == list(range(60))


def test_to_is_idempotent_and_free_when_already_there() -> None:
    store = _store()
    images, labels = store.images, store.labels
    assert store.to("cpu") is store
    assert store.images is images and store.labels is labels  # no copy
    assert store.to(torch.device("cpu")).images.data_ptr() == images.data_ptr()
    assert store.device == torch.device("cpu")
    assert len(store) == 50


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gather_on_cuda() -> None:
    store = _store().to("cuda")
    indices = torch.tensor([1, 4, 2], device="cuda")
    images, labels = store.gather(indices)
    assert images.is_cuda and labels.is_cuda
    assert torch.equal(images.cpu(), store.images.cpu()[[1, 4, 2]])


def test_store_validates_shapes() -> None:
    with pytest.raises(ValueError):
        DeviceImageStore(torch.zeros(4, 8, 8, dtype=torch.uint8), torch.zeros(4))
    with pytest.raises(ValueError):
        DeviceImageStore(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(5))
