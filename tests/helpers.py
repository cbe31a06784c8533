"""Helpers the tests share: a quiet CPU Trainer, subsets of the real data, and a module whose
features are its inputs (so monitor results are known independently)."""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

REPO = Path(__file__).resolve().parents[1]


def quiet_trainer(**kwargs):
    """A CPU Trainer without logger, checkpoints, progress bar or model summary; ``kwargs``
    override any of it."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**(defaults | kwargs))


def write_png_folder(
    root: Path, count: int, size: int, splits: tuple[str, ...] = ("train",), seed: int = 0
) -> list[Path]:
    """``count`` random ``size`` px RGB PNGs per split in two class folders (``<split>/c<i %
    2>/<i>.png``), seeded: a tiny image folder. The files written, split by split."""
    rng = np.random.default_rng(seed)
    files = []
    for split in splits:
        for i in range(count):
            path = root / split / f"c{i % 2}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
            files.append(path)
    return files


def make_subset(source: Path, dest: Path, train_per_class: int, val_per_class: int) -> Path:
    """An ImageFolder tree of symlinks to the first images of each class."""
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for class_dir in sorted((source / split).iterdir()):
            out = dest / split / class_dir.name
            out.mkdir(parents=True, exist_ok=True)
            for image in sorted(class_dir.iterdir())[:count]:
                (out / image.name).symlink_to(image)
    return dest


class FeatureModule(L.LightningModule):
    """Its features are its inputs, so the expected kNN result is known independently."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.feature_dim = dim
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x + 0 * self.w

    def training_step(self, batch, batch_idx):
        x, y = batch
        return {"loss": (self.w**2).sum(), "features": self(x).detach(), "labels": y}

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return {"features": self(x), "labels": y}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class FeatureData(L.LightningDataModule):
    def __init__(self, train, val, batch_size=8) -> None:
        super().__init__()
        self.train, self.val, self.batch_size = train, val, batch_size

    def train_dataloader(self):
        return DataLoader(TensorDataset(*self.train), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(TensorDataset(*self.val), batch_size=self.batch_size)

    def eval_train_dataloader(self):
        return DataLoader(TensorDataset(*self.train), batch_size=self.batch_size)


class EpochMetrics(L.Callback):
    def __init__(self) -> None:
        self.epochs: list[dict] = []

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.epochs.append({k: float(v) for k, v in trainer.callback_metrics.items()})


@contextmanager
def gpu_waits_raise() -> Iterator[None]:
    """CUDA's sync detector raising on any host wait for the GPU inside the block (work queued
    before it is finished first, so only the block's own waits count)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


class SignalAt(torch.utils.data.Dataset):
    """``(x[i], y[i])`` that sends this process ``signum`` when item ``at`` is read (read in
    the process itself: a loader without workers), and records the items read."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, at: int | None, signum: int) -> None:
        self.x, self.y, self.at, self.signum = x, y, at, signum
        self.read: list[int] = []

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        self.read.append(i)
        if i == self.at:
            os.kill(os.getpid(), self.signum)
        return self.x[i], self.y[i]


def write_cifar_batches(
    folder: Path, batches: dict[str, tuple[np.ndarray, list[int]]], label_names: list[str]
) -> dict:
    """``cifar-10-batches-py/`` in torchvision's pickle format: ``batches`` maps each batch file
    (``data_batch_1`` .. ``_5``, ``test_batch``) to its rows (``[N, 3 * 32 * 32]`` uint8, CHW
    order) and labels. Returns the md5 table torchvision checks (``CIFAR10.train_list``,
    ``test_list``, ``meta``), of these files instead of the published ones."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list(label_names)}))
    for name, (rows, labels) in batches.items():
        (folder / name).write_bytes(pickle.dumps({"data": rows, "labels": list(labels)}))
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    train = sorted(name for name in batches if name != "test_batch")
    return {
        "train_list": [[name, md5[name]] for name in train],
        "test_list": [["test_batch", md5["test_batch"]]],
        "meta": {"filename": "batches.meta", "key": "label_names", "md5": md5["batches.meta"]},
    }


def check_cifar_files_against(table: dict, monkeypatch) -> None:
    """Point torchvision's CIFAR-10 md5 table at ``table`` (:func:`write_cifar_batches`), so its
    real integrity check runs on the files written here."""
    from torchvision import datasets

    for attr, value in table.items():
        monkeypatch.setattr(datasets.CIFAR10, attr, value)
