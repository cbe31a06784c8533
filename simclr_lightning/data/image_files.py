"""Images to predict on: files and/or folders given on the command line, without labels."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from numbers import Integral, Real
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from simclr_lightning.data.corrupt import SkippedFiles, load_image, verify_files
from simclr_lightning.data.failed_batches import AgreesAfterPredict
from simclr_lightning.data.folders import IMAGE_EXTENSIONS, folder_images
from simclr_lightning.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    eval_crop_ratio,
    eval_transform,
)
from simclr_lightning.errors import require


def list_images(paths: str | Sequence[str]) -> list[str]:
    """The image files among ``paths`` and inside the folders among them (recursively), each
    folder's in sorted order; a missing path is an error, not a silent skip."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[str] = []
    for entry in map(Path, paths):
        if entry.is_dir():
            files += sorted(folder_images(entry, entry, frozenset()))
        elif entry.is_file():
            files.append(str(entry))
        else:
            raise FileNotFoundError(f"data.paths: {entry} does not exist")
    if not files:
        raise FileNotFoundError(
            f"data.paths={list(map(str, paths))} holds no images "
            f"(looked for {', '.join(IMAGE_EXTENSIONS)})"
        )
    return files


LEFT_OUT = "no prediction for it"


def _number(value: object, kind: type) -> bool:
    """``value`` is a ``kind`` (``Integral``, ``Real``) and not a bool."""
    return isinstance(value, kind) and not isinstance(value, bool)


class ImageFiles(Dataset):
    """``(image, path)`` pairs: the path travels with the batch so predictions can name it.

    Images are read as ``mode``: ``RGB``, or ``L`` for a model trained on grayscale images.
    With ``skip_corrupt`` an undecodable file gives None (and one warning), which
    :func:`collate_present` leaves out: a prediction is for the file it names, so no other
    image may stand in for it."""

    def __init__(
        self, files: Sequence[str], transform, skip_corrupt: bool = False, mode: str = "RGB"
    ) -> None:
        self.files = list(files)
        self.transform = transform
        self.mode = mode
        self.skipped = SkippedFiles(self.files, LEFT_OUT) if skip_corrupt else None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        if self.skipped is None:
            return self.read(index)
        return self.skipped.read_or_leave_out(self.read, index)

    def read(self, index: int) -> tuple[Tensor, str]:
        path = self.files[index]
        return self.transform(load_image(path, self.mode)), path


def collate_present(samples: list, shape: tuple[int, ...]) -> tuple[Tensor, list[str]]:
    """The batch of the samples that are not None (an empty ``[0, *shape]`` one if all are)."""
    present = [s for s in samples if s is not None]
    if not present:
        return torch.empty(0, *shape), []
    images, paths = default_collate(present)
    return images, list(paths)


class ImageFilesDataModule(AgreesAfterPredict, L.LightningDataModule):
    """Serves ``predict_dataloader()`` over image files with the evaluation transform.

    ``image_size``/``mean``/``std``/``resize_ratio`` left None are taken from the model being
    run when it records its preprocessing (a :class:`~simclr_lightning.evaluation.LinearEval`
    checkpoint does), so predictions see images prepared as in training; otherwise 224 px
    with ImageNet statistics. One ``mean`` value (an MNIST model's) reads the images as
    grayscale, three as RGB. An unreadable image raises
    :class:`~simclr_lightning.errors.CorruptImageError` naming the file (under DDP in
    every process, once the others have predicted their shards).

    Args:
        paths: image files and/or folders (searched recursively).
        skip_corrupt: leave undecodable files out (one warning each, no prediction row).
        verify: decode every file once at setup and raise one error listing all
            undecodable ones before predicting; with ``skip_corrupt``, warn with that list.
    """

    reads_image_files = True  # under DDP, a file one process cannot read fails them all

    def __init__(
        self,
        paths: str | list[str],
        batch_size: int = 64,
        num_workers: int = 0,
        image_size: int | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        resize_ratio: float | None = None,
        skip_corrupt: bool = False,
        verify: bool = False,
    ) -> None:
        super().__init__()
        require(batch_size >= 1, "data.batch_size", batch_size, ">= 1")
        require(num_workers >= 0, "data.num_workers", num_workers, ">= 0")
        require(
            image_size is None or (_number(image_size, Integral) and image_size >= 1),
            "data.image_size",
            image_size,
            "an integer >= 1 (pixels), or null for the model's recorded size (else 224)",
        )
        require(
            resize_ratio is None or (_number(resize_ratio, Real) and 0 < resize_ratio <= 1),
            "data.resize_ratio",
            resize_ratio,
            "in (0, 1], the share of the resized side the centre crop keeps (0.875: resize "
            "256, crop 224; 1: no crop), or null for the model's recorded ratio",
        )
        self.files = list_images(paths)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.image_size = image_size
        self.mean = mean
        self.std = std
        self.resize_ratio = resize_ratio
        self.skip_corrupt = skip_corrupt
        self.verify = verify
        self._verified = False
        self._bad: list[str] = []  # found by verify: left out without being read (or named) again

    def setup(self, stage: str) -> None:
        self.setup_predict_agreement(stage)
        if self.verify and not self._verified:
            self._bad = verify_files(self.files, self.num_workers, self.trainer, self.skip_corrupt)
            self._verified = True

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        self.report_skipped()
        return batch

    def teardown(self, stage: str) -> None:
        self.report_skipped(force=True)
        super().teardown(stage)

    def report_skipped(self, force: bool = False) -> None:
        """Warn here about files the loader workers left out (their own warnings are lost)."""
        skipped = getattr(getattr(self, "dataset", None), "skipped", None)
        if skipped is not None:
            skipped.report(force)

    def size_channels_and_transform(self):
        """``(image_size, channels, transform)``: the model's recorded preprocessing, with this
        module's settings first; ``channels`` (1 or 3) is the number of ``mean`` values."""
        model = self.trainer.lightning_module if self.trainer is not None else None
        recorded = getattr(model, "preprocessing", None) or {}
        size = self.image_size or recorded.get("image_size") or 224
        mean = self.mean or recorded.get("mean") or IMAGENET_MEAN
        std = self.std or recorded.get("std") or IMAGENET_STD
        require(len(mean) in (1, 3), "data.mean", mean, "1 (grayscale) or 3 (RGB) values")
        require(len(std) == len(mean), "data.std", std, f"{len(mean)} value(s), as data.mean")
        ratio = (
            self.resize_ratio
            if self.resize_ratio is not None
            else recorded.get("resize_ratio", eval_crop_ratio(size))
        )
        return size, len(mean), eval_transform(size, mean, std, ratio)

    def transform(self):
        return self.size_channels_and_transform()[2]

    def predict_dataloader(self) -> DataLoader:
        # Built here, not in setup(): the model's checkpoint (and its preprocessing) is only
        # loaded after setup.
        self.refuse_empty_shards(len(self.files), "data.paths")
        size, channels, transform = self.size_channels_and_transform()
        mode = "L" if channels == 1 else "RGB"
        self.dataset = ImageFiles(self.files, transform, self.skip_corrupt, mode)
        if self.dataset.skipped is not None:
            self.dataset.skipped.known_bad(self._bad)
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            shuffle=False,
            collate_fn=partial(collate_present, shape=(channels, size, size)),
        )
