"""SimCLR self-supervised pretraining for PyTorch Lightning."""

from simclr_lightning.backbones import build_resnet
from simclr_lightning.data import (
    CIFARDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
    SimCLRDataModule,
)
from simclr_lightning.embedding_plot import EmbeddingPlot
from simclr_lightning.export import export_backbone
from simclr_lightning.heads import ProjectionHead
from simclr_lightning.knn import KNNMonitor, knn_predict
from simclr_lightning.linear_eval import LinearEval
from simclr_lightning.linear_probe import OnlineLinearProbe
from simclr_lightning.loss import NTXentLoss
from simclr_lightning.module import SimCLR
from simclr_lightning.optim import LARS
from simclr_lightning.prediction import PredictionWriter
from simclr_lightning.transforms import SimCLRAugmentation

__version__ = "0.1.0"

__all__ = [
    "EmbeddingPlot",
    "KNNMonitor",
    "LinearEval",
    "OnlineLinearProbe",
    "PredictionWriter",
    "export_backbone",
    "knn_predict",
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
