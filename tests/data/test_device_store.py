"""Index batches and the device-resident image store. How Lightning shards the library's
loaders under real DDP is tested in ``test_sharding_ddp.py``."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from simclr_lightning.data.device_store import DeviceImageStore, IndexDataset


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


def test_a_copy_the_gpu_cannot_hold_is_a_one_line_error_before_it_is_made(monkeypatch):
    """data.resident=true moves the decoded split to the GPU at the first batch: one that does
    not fit was an out-of-memory traceback; it is a SettingError naming the setting, and the
    images stay where they are."""
    from simclr_lightning.errors import SettingError

    store = _store()  # 50 images of 3 x 8 x 8: 9,600 bytes and their labels
    asked = []

    def mem_get_info(device):
        asked.append(torch.device(device))
        return 4_000, 80 * 2**30

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    with pytest.raises(SettingError, match=r"^data\.resident=true: the training images take") as e:
        store.to("cuda:0")
    assert "\n" not in str(e.value) and "set data.resident=false" in str(e.value)
    assert asked == [torch.device("cuda:0")] and store.device == torch.device("cpu")
