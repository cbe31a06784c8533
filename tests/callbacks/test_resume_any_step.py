"""Every callback of this library (and those the shipped configs add) survives a resume from a
checkpoint of any training step, and the resumed run logs what the uninterrupted one did.

Lightning resumes mid-epoch without ``on_train_epoch_start``, and from a checkpoint written
at an epoch's last batch it skips that epoch's end and the next epoch's start: callbacks that
set up or reset their epoch state in those hooks break there (``ImagesPerSecond`` raised
``AttributeError``; the probe's training figures carried the finished epoch into the next).
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from simclr_lightning import (
    EmbeddingPlot,
    ImagesPerSecond,
    KNNMonitor,
    KNNReport,
    OnlineLinearProbe,
    Preemption,
    RNGState,
    SimCLR,
)
from tests.helpers import quiet_trainer

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES, PER_STEP, STEPS, EPOCHS = 4, 4, 3, 2


def images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=gen), torch.arange(n) % CLASSES


class SameBatches(L.LightningDataModule):
    """Every training batch the same views and labels: a plain loader restarts its epoch on a
    mid-epoch resume, so only then does the resumed run see what the uninterrupted one saw."""

    num_classes = CLASSES

    def train_dataloader(self):
        (a, y), (b, _) = images(PER_STEP, seed=1), images(PER_STEP, seed=2)
        rows = [((a[i], b[i]), y[i]) for i in range(PER_STEP)] * STEPS
        return DataLoader(rows, batch_size=PER_STEP, shuffle=False)

    def val_dataloader(self):
        return DataLoader(list(zip(*images(10, seed=3), strict=True)), batch_size=5)

    def test_dataloader(self):
        return self.val_dataloader()

    def eval_train_dataloader(self):
        return DataLoader(list(zip(*images(12, seed=4), strict=True)), batch_size=6)


def callbacks() -> list[L.Callback]:
    return [
        ImagesPerSecond(window=2, log_every_n_steps=1),
        OnlineLinearProbe(num_classes=CLASSES, optimizer="sgd", lr=0.5),
        KNNMonitor(num_classes=CLASSES, k=3),
        KNNReport(k=3, num_classes=CLASSES),
        EmbeddingPlot(max_points=10),
        LearningRateMonitor(logging_interval="step"),
        Preemption(),
        RNGState(),
    ]


def fit(tmp_path, name: str, ckpt_path=None) -> tuple[L.Trainer, dict[str, float]]:
    L.seed_everything(0, verbose=False)
    model = SimCLR(
        cifar_stem=True,
        head_hidden_dim=32,
        head_output_dim=16,
        optimizer="sgd",
        base_lr=0.5,
        warmup_epochs=0,
    )
    every_step = ModelCheckpoint(tmp_path / "ckpts", "{step}", every_n_train_steps=1, save_top_k=-1)
    trainer = quiet_trainer(
        max_epochs=EPOCHS,
        callbacks=[*callbacks(), every_step] if ckpt_path is None else callbacks(),
        enable_checkpointing=True,
        logger=CSVLogger(tmp_path, name=name),
        log_every_n_steps=1,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=SameBatches(), ckpt_path=ckpt_path)
    return trainer, {k: float(v) for k, v in trainer.callback_metrics.items()}


@pytest.mark.slow
def test_every_callback_resumes_from_any_step_and_logs_the_uninterrupted_figures(tmp_path):
    full, expected = fit(tmp_path, "full")
    assert full.global_step == STEPS * EPOCHS
    names = {"probe/train_top1", "probe/train_loss", "probe/val_top1", "knn/val_top1"}
    names |= {"train/images_per_sec", "train/loss_epoch"}  # the epoch so far survives too
    assert names <= expected.keys()
    # mid-epoch, at an epoch's last batch, mid-epoch in the last epoch
    for step in (1, STEPS, STEPS + 1):
        resumed, logged = fit(tmp_path, f"from{step}", tmp_path / "ckpts" / f"step={step}.ckpt")
        assert resumed.global_step == STEPS * EPOCHS, step
        assert "train/images_per_sec" in logged, step
        for name in names - {"train/images_per_sec"}:
            assert logged[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-6), (step, name)
