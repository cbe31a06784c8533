"""Lightning callbacks that watch pretraining or write results: they never change the encoder."""

from simclr_lightning.callbacks.embedding_plot import EmbeddingPlot
from simclr_lightning.callbacks.feature_writer import FeatureWriter
from simclr_lightning.callbacks.images_per_second import ImagesPerSecond
from simclr_lightning.callbacks.knn_monitor import KNNMonitor
from simclr_lightning.callbacks.knn_report import KNNReport
from simclr_lightning.callbacks.linear_probe import OnlineLinearProbe
from simclr_lightning.callbacks.prediction_writer import PredictionWriter
from simclr_lightning.callbacks.preemption import Preemption
from simclr_lightning.callbacks.rng_state import RNGState

__all__ = [
    "EmbeddingPlot",
    "FeatureWriter",
    "ImagesPerSecond",
    "KNNMonitor",
    "KNNReport",
    "OnlineLinearProbe",
    "Preemption",
    "PredictionWriter",
    "RNGState",
]
