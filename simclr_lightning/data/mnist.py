"""MNIST and Fashion-MNIST read straight from their original idx files (gzipped or not)."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import datasets

from simclr_lightning.data.base import SimCLRDataModule
from simclr_lightning.data.device_store import DeviceImageStore
from simclr_lightning.data.transforms import MNIST_VIEWS, SimCLRAugmentation
from simclr_lightning.errors import DataFileError, SettingError, require

_INFO = {
    # name: (torchvision class, its folder, mean, std)
    "mnist": (datasets.MNIST, "MNIST", (0.1307,), (0.3081,)),
    "fashion_mnist": (datasets.FashionMNIST, "FashionMNIST", (0.2860,), (0.3530,)),
}
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class IdxError(ValueError):
    """Why an idx file cannot be read (the data module names the setting and the fix)."""


def read_idx(path: Path) -> np.ndarray:
    """An idx array (LeCun's format): 2 zero bytes, a type code, the rank, big-endian sizes."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError; a cut .gz, EOFError
        raise IdxError(f"cannot be read ({type(err).__name__}: {err})") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise IdxError("is not an idx file of unsigned bytes")
    rank = data[3]
    if len(data) < 4 + 4 * rank:
        raise IdxError(f"is truncated: {len(data)} bytes, shorter than its header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * rank)
    if body.size != int(np.prod(shape)):
        raise IdxError(f"is truncated: its header says {shape}, found {body.size} bytes")
    return body.reshape(shape)


FASHION_CLASSES = list(datasets.FashionMNIST.classes)  # "T-shirt/top", "Trouser" ...


class IdxImages(Dataset):
    """Grayscale images as [1, H, W] uint8 tensors, the input torchvision v2 works fastest on."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        transform=None,
        classes: list[str] | None = None,
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.classes = classes  # torchvision's names ("T-shirt/top" ...): predictions name them
        self.images = torch.from_numpy(images.copy()).unsqueeze(1)
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


class MNISTDataModule(SimCLRDataModule):
    """MNIST or Fashion-MNIST, one channel (use ``model.in_channels: 1``).

    Args:
        data_dir: a folder with the four idx files (``train-images-idx3-ubyte[.gz]`` ...), such
            as Debian's ``/usr/share/datasets/fashion-mnist``, or torchvision's layout
            ``data_dir/FashionMNIST/raw/``.
        dataset: mnist or fashion_mnist.
        download: fetch with torchvision on rank 0 when the files are absent.
        **kwargs: see :class:`SimCLRDataModule`.
    """

    default_views = MNIST_VIEWS

    def __init__(
        self,
        data_dir: str = "data",
        dataset: Literal["mnist", "fashion_mnist"] = "fashion_mnist",
        download: bool = False,
        augmentation: SimCLRAugmentation = MNIST_VIEWS,
        **kwargs,
    ) -> None:
        require(dataset in _INFO, "data.dataset", dataset, "mnist or fashion_mnist")
        self.data_dir = data_dir
        self.dataset = dataset
        self.download = download
        super().__init__(augmentation=augmentation, **kwargs)

    def channel_stats(self):
        _, _, mean, std = _INFO[self.dataset]
        return mean, std

    @property
    def num_classes(self) -> int:
        return 10

    def make_device_store(self, dataset: IdxImages) -> DeviceImageStore:
        return DeviceImageStore(dataset.images, dataset.labels)

    def _find(self, name: str) -> Path | None:
        _, folder, _, _ = _INFO[self.dataset]
        for directory in (Path(self.data_dir), Path(self.data_dir) / folder / "raw"):
            for candidate in (directory / name, directory / f"{name}.gz"):
                if candidate.is_file():
                    return candidate
        return None

    def _check_kind(self, images: np.ndarray, path: Path) -> None:
        """MNIST's and Fashion-MNIST's files have the same names: one read as the other took
        the other's normalisation and class names in silence. Their mean pixels (0.131 and
        0.286 of 255) tell them apart; images near neither (a dataset of one's own in their
        format) are not judged."""
        mean = float(images.mean(dtype=np.float64)) / 255
        own_mean = _INFO[self.dataset][2][0]
        for other, (_, _, (other_mean,), _) in _INFO.items():
            if other != self.dataset and abs(mean - other_mean) < 0.03 < abs(mean - own_mean):
                raise SettingError(
                    f"data.data_dir={self.data_dir!r} holds {other}, not data.dataset="
                    f"{self.dataset!r}: the mean pixel of {path.name} is {mean:.3f} of 255, "
                    f"{other}'s {other_mean:.3f}; set data.dataset={other}"
                )

    def prepare_data(self) -> None:
        if self._find(_FILES["train"][0]) is None and self.download:
            cls, _, _, _ = _INFO[self.dataset]
            try:
                cls(self.data_dir, train=True, download=True)
                cls(self.data_dir, train=False, download=True)
            except OSError as err:  # URLError is an OSError: no network
                raise FileNotFoundError(
                    f"data.data_dir={self.data_dir!r} does not hold {self.dataset} and the "
                    f"download failed ({err}): put its four idx files there"
                ) from err

    def make_dataset(self, split, transform) -> Dataset:
        paths = [self._find(name) for name in _FILES[split]]
        if None in paths:
            missing = _FILES[split][paths.index(None)]
            fetch = "" if self.download else ", set data.download=true (needs network)"
            raise FileNotFoundError(
                f"data.data_dir={self.data_dir!r} does not hold {self.dataset}: no {missing}[.gz] "
                f"in it nor in its {_INFO[self.dataset][1]}/raw/. Put the four idx files "
                f"there{fetch}, or for fashion_mnist apt-get install dataset-fashion-mnist and "
                f"use /usr/share/datasets/fashion-mnist"
            )
        arrays = []
        for path in paths:
            try:
                arrays.append(read_idx(path))
            except IdxError as err:
                refetch = "delete it and set data.download=true (needs network)"
                if self.dataset == "fashion_mnist":
                    refetch += ", or apt-get install --reinstall dataset-fashion-mnist"
                raise DataFileError(
                    "data.data_dir", self.data_dir, path, str(err), f"replace it: {refetch}"
                ) from err
        images, labels = arrays
        if len(images) != len(labels):
            raise DataFileError(
                "data.data_dir",
                self.data_dir,
                paths[0],
                f"holds {len(images)} images but {paths[1].name} {len(labels)} labels",
                "the two files are of different sets; replace them",
            )
        self._check_kind(images, paths[0])
        names = FASHION_CLASSES if self.dataset == "fashion_mnist" else None  # MNIST's: 0-9
        return IdxImages(images, labels, transform, classes=names)
