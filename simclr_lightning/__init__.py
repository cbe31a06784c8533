"""SimCLR self-supervised pretraining for PyTorch Lightning.

Where things live: ``module.py`` (the ``SimCLR`` LightningModule) with its parts ``loss.py``
(computed in row tiles by ``tiled_loss.py``), ``grad_cache.py``, ``heads.py``, ``backbones.py``
and ``optim.py``; ``distributed.py`` (gathers); ``batchnorm.py``
(BatchNorm over the global batch); ``data/`` (data modules, CPU transforms, the
on-device augmentation in ``data/gpu/``); ``callbacks/``
(monitors and writers); ``evaluation/`` (linear evaluation, kNN); ``checkpoint.py`` (encoder
loading and export); ``cli.py`` (the ``simclr-lightning`` command).
"""

from simclr_lightning import _deprecated
from simclr_lightning.backbones import apply_stem, build_backbone, build_resnet
from simclr_lightning.batchnorm import GlobalBatchNorm
from simclr_lightning.callbacks import (
    EmbeddingPlot,
    FeatureWriter,
    ImagesPerSecond,
    KNNMonitor,
    KNNReport,
    OnlineLinearProbe,
    PredictionWriter,
    Preemption,
    RNGState,
)
from simclr_lightning.checkpoint import export_backbone, load_backbone_state
from simclr_lightning.checkpoint_io import AtomicCheckpointIO
from simclr_lightning.data import (
    CIFARDataModule,
    ImageFilesDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
    SampleDataModule,
    SimCLRDataModule,
    raw_image,
    sample_root,
)
from simclr_lightning.data.corrupt import CorruptFilesError, CorruptImageWarning
from simclr_lightning.data.gpu import GPUAugment
from simclr_lightning.data.transforms import SimCLRAugmentation
from simclr_lightning.data.worker_signals import shield_from_stop_signals
from simclr_lightning.errors import (
    CheckpointError,
    CorruptImageError,
    CorruptImageStop,
    DataFileError,
    SettingError,
)
from simclr_lightning.evaluation import LinearEval, knn_predict, sharded_knn_predict
from simclr_lightning.grad_cache import embed_in_chunks
from simclr_lightning.heads import ProjectionHead
from simclr_lightning.loss import NTXentLoss
from simclr_lightning.module import SimCLR
from simclr_lightning.optim import LARS
from simclr_lightning.supcon import SupConLoss
from simclr_lightning.tiled_loss import TiledNTXent
from simclr_lightning.warning_format import install as _install_warning_format

__version__ = "0.2.0"

_deprecated.install()
_install_warning_format()  # after Lightning's formatter, which the imports above installed

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointError",
    "DataFileError",
    "CIFARDataModule",
    "EmbeddingPlot",
    "FeatureWriter",
    "GPUAugment",
    "GlobalBatchNorm",
    "ImageFilesDataModule",
    "ImagesPerSecond",
    "ImageFolderDataModule",
    "KNNMonitor",
    "KNNReport",
    "LARS",
    "LinearEval",
    "MNISTDataModule",
    "NTXentLoss",
    "OnlineLinearProbe",
    "Preemption",
    "PredictionWriter",
    "RNGState",
    "ProjectionHead",
    "CorruptFilesError",
    "CorruptImageError",
    "CorruptImageStop",
    "CorruptImageWarning",
    "SettingError",
    "SampleDataModule",
    "SimCLR",
    "SimCLRAugmentation",
    "SimCLRDataModule",
    "SupConLoss",
    "TiledNTXent",
    "apply_stem",
    "build_backbone",
    "build_resnet",
    "embed_in_chunks",
    "export_backbone",
    "knn_predict",
    "load_backbone_state",
    "raw_image",
    "sample_root",
    "sharded_knn_predict",
    "shield_from_stop_signals",
]
