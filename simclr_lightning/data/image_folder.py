"""A folder of images: the ImageNet layout (train/ and val/ of class folders) or a user's own."""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.transforms import v2

from simclr_lightning.data.base import SimCLRDataModule
from simclr_lightning.transforms import IMAGENET_VIEWS, SimCLRAugmentation

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def load_rgb(path: str) -> Image.Image:
    """PIL's loader, with an error that names the file: one corrupt image in a million
    should say which."""
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            return image.convert("RGB")
    except Exception as err:
        raise RuntimeError(f"cannot read image {path}: {err}") from err


class UnlabeledImages(Dataset):
    """Images directly in a folder, without class folders; labels are -1 (unknown)."""

    def __init__(self, root: Path, transform=None) -> None:
        self.files = sorted(
            str(p) for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        image = load_rgb(self.files[index])
        return (self.transform(image) if self.transform else image), -1


class ImageFolderDataModule(SimCLRDataModule):
    """Images under ``root/train`` and (optionally) ``root/val``.

    Each split is either class folders (``train/<class>/*.jpg``, the ImageNet layout; labels
    feed the online probe and kNN monitor) or images directly in the split folder
    (unlabeled, label -1). Without ``val/`` there is no validation.

    Args:
        root: the folder holding ``train/`` (and ``val/``).
        augmentation: defaults to the paper's ImageNet settings at 224 px (jitter strength 1,
            blur); set ``augmentation.image_size`` etc. for other data.
        **kwargs: see :class:`SimCLRDataModule`.
    """

    def __init__(
        self,
        root: str,
        augmentation: SimCLRAugmentation = IMAGENET_VIEWS,
        **kwargs,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.root={root!r} is not a directory")
        if not (self.root / "train").is_dir():
            raise FileNotFoundError(
                f"data.root={root!r} has no train/ folder: expected {root}/train/<class>/<image> "
                f"(ImageNet layout) or {root}/train/<image> for unlabeled images"
            )
        super().__init__(augmentation=augmentation, **kwargs)

    @property
    def eval_resize_ratio(self) -> float | None:
        # ImageNet evaluation resizes to 256 then centre-crops 224; small images just resize.
        return 0.875 if self.augmentation.image_size >= 96 else None

    def device_input_transform(self):
        # Views are cropped on the device from one fixed-size square per image: the centre
        # square, 8/7 of the view size for ImageNet-size views (as 256 -> 224), else the view size.
        size = self.augmentation.image_size
        load = round(size * 8 / 7) if size >= 96 else size
        return v2.Compose([v2.ToImage(), v2.Resize(load, antialias=True), v2.CenterCrop(load)])

    def make_dataset(self, split, transform) -> Dataset | None:
        folder = self.root / split
        if not folder.is_dir():
            if split == "val":
                warnings.warn(f"{folder} does not exist: no validation", stacklevel=2)
                return None
            raise FileNotFoundError(f"{folder} does not exist")
        if any(p.is_dir() for p in folder.iterdir()):
            try:
                dataset = datasets.ImageFolder(
                    str(folder), transform=transform, loader=load_rgb, allow_empty=True
                )
            except FileNotFoundError as err:
                raise FileNotFoundError(f"data.root: {err}") from err
        else:
            dataset = UnlabeledImages(folder, transform)
        if len(dataset) == 0:
            raise FileNotFoundError(
                f"{folder} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})"
            )
        return dataset
