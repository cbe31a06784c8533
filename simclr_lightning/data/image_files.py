"""Images to predict on: files and/or folders given on the command line, without labels."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader, Dataset

from simclr_lightning.data.image_folder import IMAGE_EXTENSIONS, load_rgb
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
            files += sorted(
                str(p)
                for p in entry.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            )
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


class ImageFiles(Dataset):
    """``(image, path)`` pairs: the path travels with the batch so predictions can name it."""

    def __init__(self, files: Sequence[str], transform) -> None:
        self.files = list(files)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        path = self.files[index]
        return self.transform(load_rgb(path)), path


class ImageFilesDataModule(L.LightningDataModule):
    """Serves ``predict_dataloader()`` over image files with the evaluation transform.

    ``image_size``/``mean``/``std``/``resize_ratio`` left None are taken from the model being
    run when it records its preprocessing (a :class:`~simclr_lightning.evaluation.LinearEval`
    checkpoint does), so predictions see images prepared as in training; otherwise 224 px
    with ImageNet statistics. An unreadable image raises an error naming the file.

    Args:
        paths: image files and/or folders (searched recursively).
    """

    def __init__(
        self,
        paths: str | list[str],
        batch_size: int = 64,
        num_workers: int = 0,
        image_size: int | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        resize_ratio: float | None = None,
    ) -> None:
        super().__init__()
        require(batch_size >= 1, "data.batch_size", batch_size, ">= 1")
        require(num_workers >= 0, "data.num_workers", num_workers, ">= 0")
        self.files = list_images(paths)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.image_size = image_size
        self.mean = mean
        self.std = std
        self.resize_ratio = resize_ratio

    def transform(self):
        model = self.trainer.lightning_module if self.trainer is not None else None
        recorded = getattr(model, "preprocessing", None) or {}
        size = self.image_size or recorded.get("image_size") or 224
        mean = self.mean or recorded.get("mean") or IMAGENET_MEAN
        std = self.std or recorded.get("std") or IMAGENET_STD
        ratio = (
            self.resize_ratio
            if self.resize_ratio is not None
            else recorded.get("resize_ratio", eval_crop_ratio(size))
        )
        return eval_transform(size, mean, std, ratio)

    def predict_dataloader(self) -> DataLoader:
        # Built here, not in setup(): the model's checkpoint (and its preprocessing) is only
        # loaded after setup.
        return DataLoader(
            ImageFiles(self.files, self.transform()),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            shuffle=False,
        )
