"""CIFAR-10 and CIFAR-100 through torchvision, with an offline path that says what to do."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import Dataset
from torchvision import datasets

from simclr_lightning.data.base import SimCLRDataModule
from simclr_lightning.data.device_store import DeviceImageStore
from simclr_lightning.data.transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    CIFAR_VIEWS,
    SimCLRAugmentation,
)
from simclr_lightning.errors import DataFileError, require

_DATASETS = {
    "cifar10": (datasets.CIFAR10, "cifar-10-batches-py", CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (datasets.CIFAR100, "cifar-100-python", CIFAR100_MEAN, CIFAR100_STD),
}


class CIFARDataModule(SimCLRDataModule):
    """CIFAR-10/100 (torchvision's python-pickle format) in ``data_dir``.

    Args:
        data_dir: folder holding ``cifar-10-batches-py/`` (or ``cifar-100-python/``).
        dataset: cifar10 or cifar100.
        download: fetch the archive on rank 0 when it is absent (opt-in: nothing downloads
            unless asked).
        augmentation: the paper's CIFAR views (32 px, jitter strength 0.5, no blur).
        **kwargs: see :class:`SimCLRDataModule`.
    """

    default_views = CIFAR_VIEWS

    def __init__(
        self,
        data_dir: str = "data",
        dataset: Literal["cifar10", "cifar100"] = "cifar10",
        download: bool = False,
        augmentation: SimCLRAugmentation = CIFAR_VIEWS,
        **kwargs,
    ) -> None:
        require(dataset in _DATASETS, "data.dataset", dataset, "cifar10 or cifar100")
        self.data_dir = data_dir
        self.dataset = dataset
        self.download = download
        super().__init__(augmentation=augmentation, **kwargs)

    def channel_stats(self):
        _, _, mean, std = _DATASETS[self.dataset]
        return mean, std

    @property
    def num_classes(self) -> int:
        return 100 if self.dataset == "cifar100" else 10

    def prepare_data(self) -> None:
        """With ``download``, fetch the archive unless every file is intact: a missing or
        damaged ``data_batch_*``/``test_batch`` makes torchvision fetch and extract it again."""
        if not self.download or self.damaged_file() is None:
            return  # offline: setup() names what is missing or damaged
        cls, _, _, _ = _DATASETS[self.dataset]
        try:
            cls(self.data_dir, train=True, download=True)
        except OSError as err:  # URLError is an OSError: no network
            raise FileNotFoundError(self._missing_message(f"download failed: {err}")) from err
        except RuntimeError:  # still damaged after it: named below
            pass
        self._raise_if_damaged()

    def make_dataset(self, split, transform) -> Dataset:
        cls, folder, _, _ = _DATASETS[self.dataset]
        try:
            return cls(self.data_dir, train=split == "train", transform=transform, download=False)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
            if not (Path(self.data_dir) / folder).is_dir():
                raise FileNotFoundError(self._missing_message(f"no {folder}/ in it")) from err
            self._raise_if_damaged()
            why = f"its {folder}/ is incomplete or corrupt"
            raise FileNotFoundError(self._missing_message(why)) from err

    def damaged_file(self) -> tuple[Path, str] | None:
        """The first file of the dataset that is missing or fails torchvision's md5 check, with
        what is wrong with it; None when all are intact."""
        cls, folder, _, _ = _DATASETS[self.dataset]
        meta = (cls.meta["filename"], cls.meta["md5"])
        for name, md5 in [*cls.train_list, *cls.test_list, meta]:
            path = Path(self.data_dir) / folder / name
            if not path.is_file():
                return path, "is missing"
            if not datasets.cifar.check_integrity(str(path), md5):
                return path, "is truncated or damaged (its md5 is not the published one)"
        return None

    def _raise_if_damaged(self) -> None:
        """One line naming the first missing or damaged file and how to get it back."""
        found = self.damaged_file()
        if found is None:
            return
        path, problem = found
        cls, folder, _, _ = _DATASETS[self.dataset]
        folder_path = Path(self.data_dir) / folder
        if self.download or path.name == cls.meta["filename"]:
            # a re-download fetches only when a data batch is damaged: start from scratch
            fix = f"delete {folder_path}/ and run again with data.download=true (needs network)"
        else:
            fix = "set data.download=true (needs network) to fetch it again"
        fix += f", or put a fresh extracted {folder}/ there"
        if problem == "is missing":
            raise FileNotFoundError(f"data.data_dir={self.data_dir!r}: {path} {problem}: {fix}")
        raise DataFileError("data.data_dir", self.data_dir, path, problem, fix)

    def make_device_store(self, dataset) -> DeviceImageStore:
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
        return DeviceImageStore(images, torch.as_tensor(dataset.targets))

    def _missing_message(self, why: str) -> str:
        """One line for the CLI (a FileNotFoundError: exit 1): the setting, its value, what to
        do."""
        _, folder, _, _ = _DATASETS[self.dataset]
        fetch = "" if self.download else ", or set data.download=true (needs network)"
        return (
            f"data.data_dir={self.data_dir!r} does not hold {self.dataset} ({why}): put the "
            f"extracted {folder}/ there{fetch}, or train on an image folder instead "
            f"(--config configs/imagefolder.yaml --data.root DIR)"
        )
