"""The test loader serves the held-out split in validation's seeded, class-balanced order, so
a test cut short (``trainer.limit_test_batches``) sees every class, not the first folders of a
sorted image folder (the quickstart's ``limit_test_batches 2``: 100 airplanes and 28
automobiles, test/top1 0.0); the whole test still counts every image once, under DDP too, and
predict keeps the files' order. Every served image is a flat grey written here with PIL, so
its file (and class folder) is read back from its pixels, not from the code's labels."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from simclr_lightning import ImageFolderDataModule, SimCLRAugmentation
from simclr_lightning.distributed import real_rows, sample_positions
from tests.helpers import quiet_trainer

CLASSES = ["ant", "bee", "cat", "dog"]  # sorted: the folder order the old test loader kept
PER_CLASS = 5
# mean 0, std 1: a served image's mean * 255 is the grey level of its file
PLAIN = SimCLRAugmentation(image_size=8, mean=(0.0,) * 3, std=(1.0,) * 3, blur_prob=0.0)


@pytest.fixture
def folder(tmp_path) -> tuple[Path, dict[int, tuple[str, str]]]:
    """val/ of 4 classes x 5 flat-grey 8x8 PNGs, train/ one per class (it numbers the
    classes); the grey level of each val file -> (class folder, file name)."""
    owner, grey = {}, 10
    for name in CLASSES:
        (tmp_path / "train" / name).mkdir(parents=True)
        Image.fromarray(np.full((8, 8, 3), 5, np.uint8)).save(tmp_path / "train" / name / "0.png")
        (tmp_path / "val" / name).mkdir(parents=True)
        for k in range(PER_CLASS):
            Image.fromarray(np.full((8, 8, 3), grey, np.uint8)).save(
                tmp_path / "val" / name / f"{k}.png"
            )
            owner[grey], grey = (name, f"{k}.png"), grey + 10
    return tmp_path, owner


def data(root: Path, batch_size: int, **kwargs) -> ImageFolderDataModule:
    return ImageFolderDataModule(
        str(root), augmentation=PLAIN, task="classify", batch_size=batch_size, num_workers=0,
        **kwargs,
    )  # fmt: skip


def files_of(images: torch.Tensor, owner: dict[int, tuple[str, str]]) -> list[tuple[str, str]]:
    """(class folder, file name) of each served image, from its grey level."""
    return [owner[round(float(image.mean()) * 255)] for image in images]


class Recorder(L.LightningModule):
    """Records what each test (or predict) batch holds: images' files and served labels."""

    def __init__(self, owner: dict[int, tuple[str, str]]) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.owner = owner
        self.batches: list[list[tuple[tuple[str, str], int]]] = []

    def test_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        self.batches.append(list(zip(files_of(x, self.owner), y.tolist(), strict=True)))

    def predict_step(self, batch, batch_idx: int):
        self.test_step(batch, batch_idx)
        return batch[1]


@pytest.mark.parametrize(("batch_size", "limit"), [(4, 1), (2, 2), (3, 2)])
def test_a_cut_short_test_sees_every_class(folder, batch_size, limit):
    """The first ``limit`` batches (4 to 6 images) hold all 4 classes: the old loader served
    ant's 5 files first, so one or two batches saw ant alone."""
    root, owner = folder
    model = Recorder(owner)
    quiet_trainer(limit_test_batches=limit).test(model, data(root, batch_size), verbose=False)
    rows = [row for batch in model.batches for row in batch]
    assert len(model.batches) == limit and len(rows) == batch_size * limit
    assert sorted({name for (name, _), _ in rows}) == CLASSES
    # no class over-represented: with equal class sizes, at most one more than another
    counts = Counter(name for (name, _), _ in rows)
    assert max(counts.values()) - min(counts.values()) <= 1, counts
    # each image with its own folder's label (the sorted class index, written here)
    assert all(label == CLASSES.index(name) for (name, _), label in rows)


def test_the_whole_test_counts_every_image_once_in_a_seeded_mixed_order(folder):
    root, owner = folder
    served = []
    for _ in range(2):  # the same order every run
        model = Recorder(owner)
        quiet_trainer().test(model, data(root, 3), verbose=False)
        served.append([row for batch in model.batches for row in batch])
    rows = served[0]
    assert Counter(file for file, _ in rows) == Counter(owner.values())  # once each
    assert all(label == CLASSES.index(name) for (name, _), label in rows)
    assert served[1] == rows
    assert [file for file, _ in rows] != sorted(owner.values())  # not the folder order
    other = Recorder(owner)
    quiet_trainer().test(other, data(root, 3, val_seed=1), verbose=False)
    assert [row for batch in other.batches for row in batch] != rows  # val_seed seeds it


def test_test_is_validation_order_without_the_val_subset_cut(folder):
    root, owner = folder
    dm = data(root, 4, val_subset=6)
    dm.setup("validate")
    val = [f for x, _ in dm.val_dataloader() for f in files_of(x, owner)]
    test = [f for x, _ in dm.test_dataloader() for f in files_of(x, owner)]
    assert len(val) == 6 and len(test) == len(owner)
    assert test[:6] == val


@pytest.mark.parametrize(("world", "batch_size"), [(3, 2), (2, 3)])
def test_under_ddp_a_cut_short_test_is_balanced_and_a_whole_one_counts_each_once(
    folder, world, batch_size
):
    """Lightning shards a test loader with an unshuffled DistributedSampler (rank r of W reads
    r, r+W, ...; padded with repeats): the ranks' first batches together are the first
    W x batch_size images of the order, and over the whole pass the rows real_rows keeps
    (positions from sample_positions) are every image exactly once."""
    root, owner = folder
    dm = data(root, batch_size)
    dm.setup("test")
    test_loader = dm.test_dataloader()
    first, counted = [], []
    for rank in range(world):
        sampler = DistributedSampler(
            test_loader.dataset, num_replicas=world, rank=rank, shuffle=False
        )
        loader = DataLoader(
            test_loader.dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=test_loader.collate_fn,
        )
        for batch_idx, (x, y) in enumerate(loader):
            files = files_of(x, owner)
            if batch_idx < 2:  # limit_test_batches=2
                first += files
            keep = real_rows(loader, batch_idx, len(y), y.device)
            assert sample_positions(loader, batch_idx, len(y)) is not None  # order known
            counted += [f for f, k in zip(files, keep.tolist(), strict=True) if k]
    assert len(first) == 2 * world * batch_size
    assert sorted({name for name, _ in first}) == CLASSES
    assert Counter(counted) == Counter(owner.values())  # padding repeats dropped


def test_predict_keeps_the_files_order(folder):
    """Predictions are written per row with Lightning's batch indices as dataset indices
    (PredictionWriter): predict serves the split itself, in file order."""
    root, owner = folder
    dm = data(root, 3)
    model = Recorder(owner)
    quiet_trainer().predict(model, dm)
    rows = [row for batch in model.batches for row in batch]
    assert [file for file, _ in rows] == sorted(owner.values())
    assert dm.predict_dataloader().dataset is dm.val_set
