"""LightningDataModules serving SimCLR's two views (or one eval view) with labels."""

from simclr_lightning.data.base import SimCLRDataModule
from simclr_lightning.data.cifar import CIFARDataModule
from simclr_lightning.data.corrupt import CorruptFilesError, CorruptImageWarning
from simclr_lightning.data.image_files import ImageFilesDataModule
from simclr_lightning.data.image_folder import ImageFolderDataModule
from simclr_lightning.data.mnist import MNISTDataModule
from simclr_lightning.data.raw_images import raw_image
from simclr_lightning.data.sample import SampleDataModule, sample_root

__all__ = [
    "CIFARDataModule",
    "CorruptFilesError",
    "CorruptImageWarning",
    "ImageFilesDataModule",
    "ImageFolderDataModule",
    "MNISTDataModule",
    "SampleDataModule",
    "SimCLRDataModule",
    "raw_image",
    "sample_root",
]
