"""A folder of images: the ImageNet layout (train/ and val/ of class folders) or a user's own."""

from __future__ import annotations

import warnings
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import DataLoader, Dataset

from simclr_lightning.data.base import SimCLRDataModule
from simclr_lightning.data.corrupt import (
    DeviceSkips,
    SkipCorrupt,
    dataset_files,
    load_image,
    load_rgb,
    verify_files,
)
from simclr_lightning.data.device_store import DeviceImageStore
from simclr_lightning.data.encoded import collate_encoded, read_encoded
from simclr_lightning.data.folders import (
    IMAGE_EXTENSIONS,
    ImageFolderFiles,
    UnlabeledImages,
    check_layout,
    class_folders,
    listed,
)
from simclr_lightning.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    IMAGENET_VIEWS,
    SimCLRAugmentation,
)
from simclr_lightning.errors import SettingError, require

# ImageNet's statistics through PIL's luminance weights (ITU-R 601-2: L = 0.299 R + 0.587 G
# + 0.114 B), the grayscale images' defaults; the std so weighted is an approximation.
LUMA = (0.299, 0.587, 0.114)
GRAY_MEAN = (round(sum(w * m for w, m in zip(LUMA, IMAGENET_MEAN, strict=True)), 4),)
GRAY_STD = (round(sum(w * s for w, s in zip(LUMA, IMAGENET_STD, strict=True)), 4),)


class ImageFolderDataModule(SimCLRDataModule):
    """Images under ``root/train`` and (optionally) ``root/val``.

    Each split is either class folders (``train/<class>/*.jpg``, the ImageNet layout; labels
    feed the online probe and kNN monitor) or images directly in the split folder
    (unlabeled, label -1). Without ``val/`` there is no validation.

    Args:
        root: the folder holding ``train/`` (and ``val/``).
        augmentation: defaults to the paper's ImageNet settings at 224 px (jitter strength 1,
            blur); set ``augmentation.image_size`` etc. for other data.
        decode: with ``augment: gpu``, where training JPEGs are decoded: ``cpu`` in the
            workers, or ``gpu``: workers only read the files and the batch is decoded on the
            device (nvJPEG) before the views are made. Either way views are cropped from the
            full image, as the CPU pipeline crops them.
        channels: 3 reads every image as RGB; 1 as grayscale (PIL's luminance), for an
            encoder of ``model.in_channels: 1`` (X-rays, scans ...): one ``mean``/``std``
            value, by default ImageNet's through the same luminance weights. Its views are
            made on the CPU (``augment: gpu`` decodes RGB).
        resident: with ``augment: gpu``, decode the whole training split once and keep it on
            the device as uint8 (all images must share one size, e.g. the CIFAR-10 JPEG
            copy: 150 MB); batches are then drawn by index, with no loader workers.
        skip_corrupt: an image file that cannot be decoded is skipped with a warning (once
            per file): in training a seeded substitute is served in its place, so batches stay
            full and a resumed run draws the same; validation, test, predict and the kNN bank
            leave it out (no row). Without it such a file stops the run with a
            :class:`~simclr_lightning.errors.CorruptImageError` naming it.
        verify: decode every image of the splits a stage uses once at setup (in
            ``num_workers`` processes) and raise one error listing all undecodable files
            before any training; with ``skip_corrupt``, warn with that list and skip them.
        **kwargs: see :class:`SimCLRDataModule`.
    """

    reads_image_files = True  # under DDP, a bad file stops every process at one step
    default_views = IMAGENET_VIEWS

    def __init__(
        self,
        root: str,
        augmentation: SimCLRAugmentation = IMAGENET_VIEWS,
        decode: Literal["cpu", "gpu"] = "cpu",
        channels: int = 3,
        resident: bool = False,
        skip_corrupt: bool = False,
        verify: bool = False,
        **kwargs,
    ) -> None:
        require(decode in ("cpu", "gpu"), "data.decode", decode, "cpu or gpu")
        require(channels in (1, 3), "data.channels", channels, "1 (grayscale) or 3 (RGB)")
        self.channels = channels
        self.decode = decode
        self.resident = resident
        self.skip_corrupt = skip_corrupt
        self.verify = verify
        self._verified: set[str] = set()
        self._warned: set[str] = set()  # splits lacking a training class, warned about once
        # one per split, shared by every dataset made of it (the training split and the kNN
        # bank read the same files): a file found bad by any of them is named once, here
        self._skips: dict[str, SkipCorrupt] = {}
        # files only the device's decoder finds bad (decode: gpu), skipped with skip_corrupt
        self.device_skips = DeviceSkips() if skip_corrupt else None
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.root={root!r} is not a directory")
        if not (self.root / "train").is_dir():
            raise FileNotFoundError(
                f"data.root={root!r} has no train/ folder: expected {root}/train/<class>/<image> "
                f"(ImageNet layout) or {root}/train/<image> for unlabeled images"
            )
        super().__init__(augmentation=augmentation, **kwargs)
        if channels == 1 and self.on_device:
            raise SettingError(
                "data.channels=1 makes its views on the CPU, and data.augment=gpu decodes "
                "images as RGB: set data.augment=cpu (or data.channels=3)"
            )
        if (decode == "gpu" or resident) and not self.on_device:
            warnings.warn(
                f"data.decode={decode} and data.resident={str(resident).lower()} apply to views "
                f"made on the device (data.augment=gpu, data.task=pretrain), not to "
                f"data.augment={self.augment}, data.task={self.task}: images are decoded and "
                f"transformed on the CPU",
                stacklevel=2,
            )

    def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if self.channels == 1:
            return GRAY_MEAN, GRAY_STD
        return super().channel_stats()

    @property
    def num_classes(self) -> int | None:
        """The class folders of ``train/`` (None for unlabeled images), as ImageFolder finds
        them: known before any image is read."""
        return len(class_folders(self.root / "train")) or None

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.task == "classify" and self.num_classes is None:
            raise SettingError(
                f"data.task=classify needs labelled images, and data.root={str(self.root)!r} "
                f"has none: train/ holds no class folders (train/<class>/<image>)"
            )
        if stage != "fit" and not (self.root / "val").is_dir():  # Lightning would run nothing
            raise SettingError(
                f"data.root={str(self.root)!r} has no val/ folder, the held-out images "
                f"simclr-lightning {getattr(stage, 'value', stage)} reads: add "
                f"{self.root / 'val'}/<class>/<image>"
                + (", or give any images as --data ImageFilesDataModule --data.paths DIR")
                * (stage == "predict")
            )
        if self.task == "classify" and stage != "predict":
            self.check_labelled_val()
        if self.verify:
            self.verify_splits(["train", "val"] if stage == "fit" else ["val"])
        super().setup(stage)

    def check_labelled_val(self) -> None:
        """A classifier is scored on val/'s labels: images there without class folders have
        none, and every metric of the run (a checkpoint's monitor too) would silently lack."""
        val, classes = self.root / "val", class_folders(self.root / "train")
        if classes and val.is_dir() and not class_folders(val):
            raise SettingError(
                f"data.root={str(self.root)!r}: val/ has no class folders but train/ has "
                f"({listed(classes)}), and data.task=classify scores val/'s labels: put its "
                f"images in class folders as train/'s (val/<class>/<image>)"
            )

    def verify_splits(self, splits: list[str]) -> None:
        """Decode every image of ``splits`` (those not verified yet) and raise one error
        listing all undecodable files (with more than 20, all in ``corrupt_files.txt`` in the
        trainer's root folder)."""
        splits = [s for s in splits if s not in self._verified and (self.root / s).is_dir()]
        if not splits:
            return
        files = [f for s in splits for f in dataset_files(self.make_dataset(s, None))]
        bad = verify_files(files, self.workers, self.trainer, skip=self.skip_corrupt)
        for split in splits:  # named already: skipped without being read, or named, again
            if split in self._skips:
                self._skips[split].known_bad(bad)
        self._verified.update(splits)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        self.report_skipped()
        return super().on_before_batch_transfer(batch, dataloader_idx)

    def teardown(self, stage: str) -> None:
        self.report_skipped(force=True)
        super().teardown(stage)

    def report_skipped(self, force: bool = False) -> None:
        """Warn here about files the loader workers skipped (their own warnings are lost)."""
        for skip in self._skips.values():
            skip.report(force)

    def device_input_transform(self):
        return None  # make_dataset then hands over bytes or decoded uint8 images as they are

    def device_collate_fn(self):
        return collate_encoded

    def make_device_store(self, dataset) -> DeviceImageStore | None:
        if not self.resident:
            return None
        dataset.leave_out = True  # a bad file has no row in the store (nor a substitute's)
        loader = DataLoader(
            dataset, batch_size=512, num_workers=self.workers, collate_fn=collate_kept
        )
        # filled in place: a list of the images and then their stack held the split twice
        store, labels, first, n = None, [], None, 0
        for batch, batch_labels in filter(None, loader):
            for image in batch.images:
                first = first or image
                if image.data.shape != first.data.shape:
                    raise SettingError(
                        f"data.resident=true needs training images of one size: {image.path} "
                        f"is {tuple(image.data.shape)}, {first.path} is "
                        f"{tuple(first.data.shape)}; set data.resident=false"
                    )
                if store is None:
                    shape = (len(dataset), *first.data.shape)
                    store = torch.empty(shape, dtype=first.data.dtype)
                store[n] = image.data
                n += 1
            labels.append(batch_labels)
        self.report_skipped(force=True)
        if store is None:
            raise SettingError(
                f"data.resident=true: no image of {self.root / 'train'} could be read"
            )
        return DeviceImageStore(store[:n], torch.cat(labels))

    def split_classes(self, folder: Path) -> dict[str, int] | None:
        """The training split's class numbering, for a split of ``folder`` (None when
        ``train/`` has no class folders): a class folder training lacks is an error, a
        training class the split lacks a warning (once per data module)."""
        train = self.root / "train"
        classes, here = class_folders(train), class_folders(folder)
        if not classes:
            return None
        class_to_idx = {name: i for i, name in enumerate(classes)}
        extra = [name for name in here if name not in class_to_idx]
        if extra:
            raise SettingError(
                f"data.root={str(self.root)!r}: {folder / extra[0]} is not a class of train/: "
                f"{folder.name}/ may only hold the training classes ({listed(classes)})"
            )
        missing = [name for name in classes if name not in here]
        if missing and str(folder) not in self._warned:
            self._warned.add(str(folder))
            warnings.warn(
                f"{folder} has no folder for training class(es) {listed(missing)}: it has no "
                f"images of them (its other classes keep train/'s labels)",
                stacklevel=3,
            )
        return class_to_idx

    def make_dataset(self, split, transform) -> Dataset | None:
        folder = self.root / split
        if not folder.is_dir():
            if split == "val":
                warnings.warn(f"{folder} does not exist: no validation", stacklevel=2)
                return None
            raise FileNotFoundError(f"{folder} does not exist")
        loader = load_rgb if self.channels == 3 else partial(load_image, mode="L")
        if transform is None:  # the device path: bytes or uint8 pixels, made into views later
            loader = partial(read_encoded, decode=self.decode == "cpu" or self.resident)
        if check_layout(folder):
            class_to_idx = None if split == "train" else self.split_classes(folder)
            try:
                dataset = ImageFolderFiles(
                    str(folder),
                    transform=transform,
                    loader=loader,
                    allow_empty=split != "train",  # val/: warned, as a missing class
                    class_to_idx=class_to_idx,
                )
            except FileNotFoundError as err:
                raise FileNotFoundError(f"data.root: {err}") from err
        else:
            dataset = UnlabeledImages(folder, transform, loader)
        if len(dataset) == 0:
            raise FileNotFoundError(
                f"{folder} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})"
            )
        if self.skip_corrupt:
            files = dataset_files(dataset)
            skip = self._skips.get(split)
            if skip is None or skip.files != files:
                skip = self._skips[split] = SkipCorrupt(files)
            dataset.skip = skip
        return dataset


def collate_kept(samples: list) -> tuple | None:
    """:func:`collate_encoded` of the samples not left out (None), or None if all were."""
    kept = [sample for sample in samples if sample is not None]
    return collate_encoded(kept) if kept else None
