"""SimCLR self-supervised pretraining for PyTorch Lightning."""

from simclr_lightning.backbones import build_resnet
from simclr_lightning.data import (
    CIFARDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
    SimCLRDataModule,
)
from simclr_lightning.heads import ProjectionHead
from simclr_lightning.loss import NTXentLoss
from simclr_lightning.module import SimCLR
from simclr_lightning.optim import LARS
from simclr_lightning.transforms import SimCLRAugmentation

__version__ = "0.1.0"

__all__ = [
    "LARS",
    "CIFARDataModule",
    "ImageFolderDataModule",
    "MNISTDataModule",
    "NTXentLoss",
    "ProjectionHead",
    "SimCLR",
    "SimCLRAugmentation",
    "SimCLRDataModule",
    "build_resnet",
]
