"""Write the encoder's features from ``predict`` to one file, one row per image: the
embeddings a user takes to retrieval, t-SNE/UMAP or a classifier of their own (what lightly's
``embed`` command writes)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

from simclr_lightning.callbacks.prediction_writer import (
    kept_indices,
    open_output,
    output_paths,
    row_ids,
)
from simclr_lightning.errors import SettingError, require
from simclr_lightning.evaluation.linear_eval import LinearEval

FORMATS = (".npz", ".pt")


class FeatureWriter(BasePredictionWriter):
    """Writes each image's features (what the model's ``predict_step`` returns: a SimCLR
    checkpoint's encoder features h) with the image's id and, when the batch carries them, its
    integer label.

    The format follows ``output``'s suffix: ``.npz`` (``numpy.load``: ``features`` float32
    ``[N, D]``, ``ids`` strings, ``labels`` int64) or ``.pt`` (``torch.load``: the same keys, a
    float32 tensor, a list of strings and an int64 tensor). Features are float32 whatever the
    run's precision. An id is the image's path (the batch's, or its folder dataset's:
    ``ImageFilesDataModule``, an image folder's ``val/``), else the dataset index; a file left
    out by ``skip_corrupt`` has no row. Rows are kept on the CPU batch by batch and written at
    the end to a temporary file renamed then, so an interrupted run leaves no partial file;
    with several processes each writes its own shard to ``<stem>.rank<r><suffix>``
    (concatenate them: ids tell the rows apart).
    """

    def __init__(self, output: str) -> None:
        super().__init__(write_interval="batch")
        suffix = Path(output).suffix.lower()
        allowed = "a file name ending in .npz (numpy) or .pt (torch.save)"
        require(suffix in FORMATS, "FeatureWriter.output", output, allowed)
        self.output = Path(output)
        self.format = suffix
        self._file: IO[bytes] | None = None
        self._clear()
        self.path: Path | None = None  # the file written, once predict has run

    def _clear(self) -> None:
        self._features: list[Tensor] = []
        self._ids: list[str] = []
        self._labels: list[Tensor] | None = []  # None once a batch has no labels

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(pl_module, LinearEval):  # its predict_step: class probabilities
            raise SettingError(
                f"FeatureWriter writes an encoder's features, and {type(pl_module).__name__}."
                f"predict_step returns class probabilities: write those with "
                f"simclr_lightning.PredictionWriter, or predict the encoder's features with "
                f"the pretraining (SimCLR) checkpoint"
            )
        self.path, self._tmp = output_paths(self.output, trainer)
        # opened now: a folder that cannot be written fails before predicting, not after
        self._file = open_output(self._tmp, "FeatureWriter.output", self.output, "wb")
        self._clear()

    def write_on_batch_end(
        self,
        trainer,
        pl_module,
        prediction,
        batch_indices,
        batch,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if not isinstance(prediction, Tensor) or prediction.ndim != 2:
            got = (
                f"a tensor of shape {tuple(prediction.shape)}"
                if isinstance(prediction, Tensor)
                else f"a {type(prediction).__name__}"
            )
            raise SettingError(
                f"FeatureWriter writes one feature vector per image, and "
                f"{type(pl_module).__name__}.predict_step returned {got}: it must return "
                f"[batch, features] (a SimCLR checkpoint's predict_step does)"
            )
        features = prediction.detach().to("cpu", torch.float32, copy=True)
        n = len(features)
        if batch_indices is not None and len(batch_indices) != n:  # rows left out
            batch_indices = kept_indices(trainer, dataloader_idx, batch_indices)
        self._features.append(features)
        self._ids += row_ids(trainer, dataloader_idx, batch, batch_indices, n)
        labels = _labels(batch, n)
        if self._labels is not None:
            self._labels = None if labels is None else [*self._labels, labels]

    def teardown(self, trainer, pl_module, stage: str) -> None:
        # Not at on_predict_end: the data module's end-of-predict agreement (under DDP, a
        # file another process could not read) comes after it, and may still fail the run.
        if stage != "predict" or self._file is None:
            return
        dim = self._features[0].shape[1] if self._features else 0
        record: dict = {
            "features": torch.cat(self._features) if self._features else torch.zeros(0, dim),
            "ids": self._ids,
        }
        if self._labels:
            record["labels"] = torch.cat(self._labels)
        self._clear()
        try:
            if self.format == ".npz":
                arrays = {k: v.numpy() for k, v in record.items() if isinstance(v, Tensor)}
                np.savez(self._file, ids=np.array(record["ids"], dtype=str), **arrays)
            else:
                torch.save(record, self._file)
            self._file.close()
        except BaseException:
            self._discard()
            raise
        self._file = None
        os.replace(self._tmp, self.path)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._discard()

    def _discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._tmp.unlink(missing_ok=True)
            self._file = None
        self._clear()


def _labels(batch, n: int) -> Tensor | None:
    """The batch's integer labels (``(images, labels)``), else None (a batch of file paths)."""
    if isinstance(batch, (tuple, list)) and len(batch) > 1:
        labels = batch[1]
        integer = isinstance(labels, Tensor) and not labels.is_floating_point()
        if (
            integer
            and not labels.is_complex()
            and labels.dtype != torch.bool
            and labels.shape == (n,)
        ):
            return labels.detach().to("cpu", torch.int64)
    return None
