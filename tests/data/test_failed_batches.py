"""A training batch that fails to load under DDP becomes a FailedBatch, from loader workers
too, and the loader goes on; in one process the check raises the file's own error. The
2-process stop itself is tested through the command in tests/test_preemption.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from simclr_lightning import CorruptImageError
from simclr_lightning.data.failed_batches import CatchFailedBatches, FailedBatch, StopTogether


class BadAt(Dataset):
    def __init__(self, size: int, bad: int) -> None:
        self.size, self.bad = size, bad

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> torch.Tensor:
        if index == self.bad:
            raise CorruptImageError(f"/data/{index}.jpg", "empty file")
        return torch.tensor([index])


@pytest.mark.parametrize("workers", [0, 2])
def test_a_batch_that_fails_becomes_a_failed_batch_and_loading_goes_on(workers):
    loader = DataLoader(BadAt(12, bad=7), batch_size=3, num_workers=workers)
    batches = list(CatchFailedBatches(iter(loader)))
    assert len(batches) == 4
    failed = batches[2]
    assert isinstance(failed, FailedBatch) and failed.error.path == "/data/7.jpg"
    assert failed.error.reason == "empty file"
    kept = [b.flatten().tolist() for i, b in enumerate(batches) if i != 2]
    assert kept == [[0, 1, 2], [3, 4, 5], [9, 10, 11]]


def test_in_one_process_the_check_raises_the_files_own_error():
    class OneProcess:
        world_size, global_rank = 1, 0

    stop = StopTogether()
    stop.check(torch.zeros(3), OneProcess())  # a good batch passes
    error = CorruptImageError("/data/7.jpg", "empty file")
    with pytest.raises(CorruptImageError) as caught:
        stop.check(FailedBatch(error), OneProcess())
    assert caught.value is error


@pytest.mark.parametrize("workers", [0, 2])
def test_an_evaluation_loader_hands_on_a_failed_batch_after_a_rebuild(workers):
    """Evaluation loaders carry the catch in their dataset and collate_fn, so it survives
    Lightning's rebuild of the loader around a DistributedSampler (done here the same way:
    a new DataLoader from the old one's dataset and collate_fn). The dataset is a Subset, as
    the validation sample is: its batched __getitems__ must not go around the catch."""
    from torch.utils.data import DistributedSampler, Subset

    from simclr_lightning.data.failed_batches import CatchFailedSamples, CollateOrFail

    dataset = CatchFailedSamples(Subset(BadAt(14, bad=9), range(12)))
    assert dataset.indices == range(12) and len(dataset) == 12  # still the dataset's own
    first = DataLoader(dataset, batch_size=2, collate_fn=CollateOrFail())
    sampler = DistributedSampler(first.dataset, num_replicas=2, rank=1, shuffle=False)
    rebuilt = DataLoader(
        first.dataset,
        batch_size=2,
        sampler=sampler,
        collate_fn=first.collate_fn,
        num_workers=workers,
    )
    batches = list(rebuilt)  # rank 1 reads 1, 3, 5, 7, 9, 11
    assert [b.flatten().tolist() for b in batches[:2]] == [[1, 3], [5, 7]]
    assert isinstance(batches[2], FailedBatch) and batches[2].error.path == "/data/9.jpg"
    assert batches[2].error.reason == "empty file"


def test_device_decoded_training_batches_are_checked_once_each_after_decoding(
    cifar_jpg_root, tmp_path, monkeypatch
):
    """``decode: gpu`` under DDP: the per-step check (one all-reduce) is made after the
    transfer, where the device's decoder has read the batch, not before it: once per batch,
    with the decoded batch, or with a :class:`FailedBatch` for a file the workers or that
    decoder could not read. (The 2-process stop: tests/data/test_corrupt.py.)"""
    from types import SimpleNamespace

    from lightning.pytorch.plugins import Precision

    from simclr_lightning import ImageFolderDataModule, SimCLRAugmentation
    from simclr_lightning.data.encoded import collate_encoded

    (tmp_path / "train" / "cat").mkdir(parents=True)
    for src in sorted((cifar_jpg_root / "train" / "cat").iterdir())[:8]:  # 4 per process
        (tmp_path / "train" / "cat" / src.name).write_bytes(src.read_bytes())
    data = ImageFolderDataModule(
        str(tmp_path),
        augment="gpu",
        decode="gpu",
        batch_size=4,
        num_workers=0,
        augmentation=SimCLRAugmentation(image_size=16),
    )
    cpu = SimpleNamespace(root_device=torch.device("cpu"))
    data.trainer = SimpleNamespace(
        training=True, world_size=2, global_rank=0, strategy=cpu, precision_plugin=Precision()
    )
    data.setup("fit")
    checked: list = []
    monkeypatch.setattr(data._stop_together, "check", lambda batch, _: checked.append(batch))

    batch = collate_encoded([data.train_set[i] for i in range(4)])
    assert data.on_before_batch_transfer(batch, 0) is batch and checked == []
    (view_a, _), labels = data.on_after_batch_transfer(batch, 0)
    assert len(checked) == 1 and not isinstance(checked[0], FailedBatch)
    assert view_a.shape == (4, 3, 16, 16) and labels.tolist() == [0] * 4

    failed = FailedBatch(CorruptImageError("/data/7.jpg", "empty file"))  # from the workers
    data.on_before_batch_transfer(failed, 0)
    with pytest.raises(CorruptImageError, match="7.jpg"):  # the check here lets it through
        data.on_after_batch_transfer(failed, 0)
    assert checked[1:] == [failed]

    bad = Path(data.train_set.samples[2][0])
    bad.write_bytes(b"\xff\xd8" + b"\x00garbage" * 50 + b"\xff\xd9")  # passes the workers
    batch = collate_encoded([data.train_set[i] for i in range(4)])
    with pytest.raises(CorruptImageError, match=bad.name):
        data.on_after_batch_transfer(batch, 0)
    assert len(checked) == 3 and isinstance(checked[2], FailedBatch)
    assert checked[2].error.path == str(bad)

    data.trainer.training = False  # evaluation batches are checked before the transfer
    data.on_before_batch_transfer(torch.zeros(2), 0)
    assert len(checked) == 4
