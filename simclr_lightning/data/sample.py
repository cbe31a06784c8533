"""The CIFAR-10 sample that ships inside the package: real photographs to pretrain on anywhere,
offline, in minutes (``configs/quickstart.yaml``)."""

from __future__ import annotations

from pathlib import Path

from simclr_lightning.data.image_folder import ImageFolderDataModule
from simclr_lightning.data.transforms import CIFAR10_MEAN, CIFAR10_STD, SimCLRAugmentation

SAMPLE_ROOT = Path(__file__).resolve().parents[1] / "sample" / "cifar10"

# The paper's CIFAR views with the crop floor at 0.2, as is usual for 32 px images: at 0.08 a
# crop of a 32 px image keeps about 9 x 9 pixels, too little to learn from in a few epochs.
SAMPLE_VIEWS = SimCLRAugmentation(image_size=32, jitter_strength=0.5, crop_scale=(0.2, 1.0))


def sample_root() -> Path:
    """Where the bundled sample lies: ``train/<class>/*.jpg`` (300 images per class) and
    ``val/<class>/*.jpg`` (100 per class, from the CIFAR-10 test set), drawn seeded and
    class-balanced by ``scripts/make_sample.py``."""
    if not (SAMPLE_ROOT / "train").is_dir():
        raise FileNotFoundError(
            f"the CIFAR-10 sample is missing from {SAMPLE_ROOT}: reinstall simclr-lightning, or "
            f"recreate it with python scripts/make_sample.py"
        )
    return SAMPLE_ROOT


class SampleDataModule(ImageFolderDataModule):
    """The bundled CIFAR-10 sample (3,000 training and 1,000 held-out 32 px JPEGs, 10 classes)
    as an image folder with CIFAR-10's channel statistics: no download, no path to give.

    Args:
        augmentation: the paper's CIFAR views with crop scale (0.2, 1).
        **kwargs: see :class:`ImageFolderDataModule` and :class:`SimCLRDataModule`.
    """

    default_views = SAMPLE_VIEWS

    def __init__(self, augmentation: SimCLRAugmentation = SAMPLE_VIEWS, **kwargs) -> None:
        super().__init__(root=str(sample_root()), augmentation=augmentation, **kwargs)

    def channel_stats(self):
        if self.channels == 1:  # grayscale: the image folder's own
            return super().channel_stats()
        return CIFAR10_MEAN, CIFAR10_STD
