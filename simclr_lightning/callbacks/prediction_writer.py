"""Write ``predict`` results to a file, one row per image: what a user of a trained classifier
actually wants from ``simclr-lightning predict``."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import IO, Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

from simclr_lightning.data.subsets import left_out, underlying
from simclr_lightning.errors import SettingError, require

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}


class PredictionWriter(BasePredictionWriter):
    """Writes each image's file, predicted class name and per-class probabilities.

    The format follows ``output``'s suffix: ``.csv`` (columns ``file``, ``prediction``,
    ``prob_<class>`` ...) or ``.jsonl``/``.json`` (JSON lines:
    ``{"file", "prediction", "probabilities": {class: p}}``). The model's ``predict_step``
    returns ``[B, C]`` probabilities (:class:`~simclr_lightning.evaluation.LinearEval` does);
    class names come from ``class_names``, else the model's ``class_names``, else 0..C-1.
    The file column is the image's path: the one the batch carries (``ImageFilesDataModule``)
    or its folder dataset's (an image folder's ``val/``); else the dataset index (CIFAR). Rows
    go to a temporary file renamed at the end, so an interrupted run leaves no partial file;
    with several processes each writes ``<stem>.rank<r><suffix>``.
    """

    def __init__(self, output: str, class_names: list[str] | None = None) -> None:
        super().__init__(write_interval="batch")
        suffix = Path(output).suffix.lower()
        allowed = "a file name ending in " + ", ".join(sorted(FORMATS))
        require(suffix in FORMATS, "PredictionWriter.output", output, allowed)
        self.output = Path(output)
        self.format = FORMATS[suffix]
        self.class_names = class_names
        self._file: IO[str] | None = None
        self._csv: Any = None
        self._names: list[str] | None = None
        self.path: Path | None = None  # the file written, once predict has run

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.path, self._tmp = output_paths(self.output, trainer)
        self._file = open_output(self._tmp, "PredictionWriter.output", self.output, "w")
        self._csv = None
        self._names = self.class_names or getattr(pl_module, "class_names", None)

    def write_on_batch_end(
        self,
        trainer,
        pl_module,
        prediction: Tensor,
        batch_indices,
        batch,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        probs = prediction.detach().float().cpu()
        check_probabilities(probs, type(pl_module).__name__)
        names = self._names or [str(i) for i in range(probs.shape[1])]
        if len(names) != probs.shape[1]:
            raise SettingError(
                f"PredictionWriter.class_names has {len(names)} names for the model's "
                f"{probs.shape[1]} classes: give one name per class, or leave it out"
            )
        if batch_indices is not None and len(batch_indices) != len(probs):  # rows left out
            batch_indices = kept_indices(trainer, dataloader_idx, batch_indices)
        files = row_ids(trainer, dataloader_idx, batch, batch_indices, len(probs))
        best = probs.argmax(dim=1).tolist()
        for file, row, k in zip(files, probs.tolist(), best, strict=True):
            if self.format == "jsonl":
                record = {
                    "file": file,
                    "prediction": names[k],
                    "probabilities": dict(zip(names, row, strict=True)),
                }
                self._file.write(json.dumps(record) + "\n")
            else:
                if self._csv is None:
                    self._csv = csv.writer(self._file)
                    self._csv.writerow(["file", "prediction"] + [f"prob_{n}" for n in names])
                self._csv.writerow([file, names[k]] + [f"{p:.6g}" for p in row])

    def teardown(self, trainer, pl_module, stage: str) -> None:
        # Not at on_predict_end: the data module's end-of-predict agreement (under DDP, a
        # file another process could not read) comes after it, and may still fail the run.
        if stage == "predict" and self._file is not None:
            self._file.close()
            os.replace(self._tmp, self.path)
            self._file = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self._file is not None:
            self._file.close()
            self._tmp.unlink(missing_ok=True)
            self._file = None


def check_probabilities(probs: Tensor, model: str) -> None:
    """Refuse what is not ``[batch, classes]`` probabilities: a pretraining checkpoint's
    ``predict_step`` returns the encoder's features, which would be written as a class
    "prediction" (the largest feature) with 512 "probabilities"."""
    if probs.ndim == 2 and len(probs):
        rows_ok = torch.allclose(probs.sum(dim=1), torch.ones(len(probs)), atol=1e-2)
        if rows_ok and bool((probs >= 0).all()):
            return
    elif probs.ndim == 2:
        return
    raise SettingError(
        f"PredictionWriter writes class probabilities, and {model}.predict_step returned "
        f"values of shape {tuple(probs.shape)} that are not (each row must be >= 0 and sum to "
        f"1): predict with a LinearEval checkpoint, a classifier; a SimCLR checkpoint predicts "
        f"the encoder's features: write them with simclr_lightning.FeatureWriter instead "
        f"(--trainer.callbacks+=simclr_lightning.FeatureWriter "
        f"--trainer.callbacks.output features.npz)"
    )


def output_paths(output: Path, trainer: L.Trainer) -> tuple[Path, Path]:
    """The file this process writes (``<stem>.rank<r><suffix>`` under DDP: each its own
    shard) and the temporary file it is written to first (renamed at the end)."""
    path = output
    if trainer.world_size > 1:
        path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
    return path, path.with_name(f".{path.name}.tmp")


def open_output(tmp: Path, setting: str, output: Path, mode: str) -> IO:
    """The temporary file ``tmp`` opened (its folder made): an error names the ``setting`` and
    the user's ``output``, not the temporary file's name."""
    try:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        if "b" in mode:
            return open(tmp, mode)
        return open(tmp, mode, newline="", encoding="utf-8")
    except OSError as err:
        where = err.filename if err.filename and Path(err.filename) != tmp else tmp.parent
        raise SettingError(
            f"{setting}={str(output)!r} cannot be written ({err.strerror or err}: {where}): "
            f"give a file in a folder you can write"
        ) from err


def _predict_dataset(trainer, dataloader_idx: int):
    loaders = trainer.predict_dataloaders
    loader = loaders[dataloader_idx] if isinstance(loaders, (list, tuple)) else loaders
    return getattr(loader, "dataset", None)


def kept_indices(trainer, dataloader_idx: int, batch_indices) -> list[int]:
    """``batch_indices`` less the files the loader left out of the batch (``skip_corrupt``):
    the dataset index of each row, which Lightning's indices no longer match one to one."""
    indices = torch.as_tensor([int(i) for i in batch_indices], dtype=torch.long)
    return indices[~left_out(_predict_dataset(trainer, dataloader_idx), indices)].tolist()


def row_ids(trainer, dataloader_idx: int, batch, batch_indices, n: int) -> list[str]:
    """Each row's image: the path the batch carries (``ImageFilesDataModule``), else the file
    its dataset index names in a folder dataset (an image folder's ``val/``: a bare index
    left the user to find ``val_set.samples``), else the index."""
    if isinstance(batch, (tuple, list)) and len(batch) > 1:
        meta = batch[1]
        if isinstance(meta, (list, tuple)) and all(isinstance(m, str) for m in meta):
            return list(meta)
    if batch_indices is None or len(batch_indices) != n:
        return [""] * n
    indices = [int(i) for i in batch_indices]
    dataset = _predict_dataset(trainer, dataloader_idx)
    if dataset is not None and indices:
        inner, mapped = underlying(dataset, torch.as_tensor(indices))
        samples, files = getattr(inner, "samples", None), getattr(inner, "files", None)
        try:
            paths = [samples[i][0] if samples is not None else files[i] for i in mapped.tolist()]
        except (TypeError, IndexError, KeyError):  # not a folder dataset's list of files
            paths = []
        if paths and all(isinstance(p, (str, os.PathLike)) for p in paths):
            return [str(p) for p in paths]
    return [str(i) for i in indices]
