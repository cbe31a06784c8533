"""Judging a pretrained encoder: linear evaluation / fine-tuning, and kNN classification."""

from simclr_lightning.evaluation.knn import knn_predict, sharded_knn_predict, top_k_accuracy
from simclr_lightning.evaluation.linear_eval import LinearEval

__all__ = ["LinearEval", "knn_predict", "sharded_knn_predict", "top_k_accuracy"]
