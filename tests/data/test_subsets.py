"""Validation subsets are class-balanced random samples of the whole split, whatever part of
it a run uses (data.val_subset, trainer.limit_val_batches)."""

from __future__ import annotations

import lightning as L
import torch

from simclr_lightning import ImageFolderDataModule, SimCLRAugmentation
from simclr_lightning.data.subsets import stratified_order
from tests.helpers import quiet_trainer


def test_every_prefix_is_class_balanced():
    sizes = [50, 30, 20, 7]
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(3))]
    order = stratified_order(labels, seed=0)
    assert sorted(order.tolist()) == list(range(len(labels)))  # each image once
    total = len(labels)
    for m in range(1, total + 1):  # brute force over every prefix
        seen = torch.bincount(labels[order[:m]], minlength=len(sizes)).tolist()
        for c, n in enumerate(sizes):
            assert abs(seen[c] - m * n / total) <= 1.0, (m, c, seen)
    assert torch.equal(order, stratified_order(labels, seed=0))
    assert not torch.equal(order, stratified_order(labels, seed=1))
    # random within a class: not the class's images in their dataset order
    first = [i for i in order.tolist() if labels[i] == 0]
    assert first != sorted(first)


class LabelRecorder(L.Callback):
    def __init__(self) -> None:
        self.labels: list[int] = []

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ):
        self.labels += batch[1].tolist()


class Encoder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def validation_step(self, batch, batch_idx):
        return None


def test_limit_val_batches_sees_every_class(cifar_tiny):
    """The sorted folder starts with 10 airplanes; one batch of 10 must hold all 10 classes."""
    views = SimCLRAugmentation(image_size=32)
    data = ImageFolderDataModule(str(cifar_tiny), batch_size=10, num_workers=0, augmentation=views)
    recorder = LabelRecorder()
    quiet_trainer(limit_val_batches=1, callbacks=[recorder]).validate(Encoder(), data)
    assert sorted(recorder.labels) == list(range(10))


def test_val_subset_is_balanced_and_test_keeps_the_whole_split(cifar_tiny):
    data = ImageFolderDataModule(str(cifar_tiny), batch_size=8, num_workers=0, val_subset=20)
    data.setup("validate")
    labels = torch.cat([y for _, y in data.val_dataloader()])
    assert torch.bincount(labels).tolist() == [2] * 10
    test_labels = torch.cat([y for _, y in data.test_dataloader()])
    assert test_labels.tolist() == sorted(test_labels.tolist()) and len(test_labels) == 100
