"""The kNN monitor: weighted kNN accuracy of the encoder during pretraining, no training of its
own, so it tracks representation quality from the first epoch."""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader

from simclr_lightning.callbacks.monitor_checks import check_monitors
from simclr_lightning.callbacks.signal_agreement import stop_requested
from simclr_lightning.callbacks.validation_due import validation_due
from simclr_lightning.data.class_names import says_unlabeled
from simclr_lightning.distributed import (
    PassCutShort,
    RowCollector,
    encode_rows,
    shard_loader,
    validation_loader,
)
from simclr_lightning.errors import SettingError, require
from simclr_lightning.evaluation.knn import sharded_knn_predict, top_k_accuracy

KNN_KEYS = ("knn/val_top1", "knn/val_top5")
BankDtype = Literal["float32", "float16", "bfloat16"]


class KNNMonitor(L.Callback):
    """Weighted kNN top-1/top-5 of validation features against the labelled training split.

    At the end-of-epoch validation of every ``every_n_epochs``-th training epoch (and of the
    last; validations inside an epoch, ``val_check_interval < 1``, are left out), it encodes
    the datamodule's ``eval_train_dataloader()`` (training images, no augmentation) with the
    module's ``forward`` as the memory bank and scores the features ``validation_step``
    returned (dataloader 0) by weighted kNN (:func:`knn_predict`); logged as ``knn/val_top1`` and
    ``knn/val_top5``. Under DDP each rank encodes its shard of the bank and keeps only that
    shard, normalised once, in ``bank_dtype`` (memory per rank: bank / W); the validation
    features are gathered, scored by every rank against its shard, and the per-rank top-k
    merged with one all-gather of k entries per query (:func:`sharded_knn_predict`).
    DistributedSampler's padding repeats are dropped, so the metrics equal a single
    process's. Rows labelled -1 are ignored. Under ``fast_dev_run`` it measures nothing: the
    bank pass covers the whole training set (on ImageNet, an hour), which such a run is meant
    to avoid, as Lightning leaves out checkpoints and loggers there.

    Args:
        num_classes: None reads the data module's ``num_classes``, else 1 + the largest bank
            label. Fewer than the data module's classes is refused at setup; a label past
            it when measured (validation labels before the bank pass).
        k / temperature: neighbours and the softmax temperature of their votes.
        every_n_epochs: the bank pass costs one inference epoch over the training set.
        chunk_size: query rows scored at once (memory: chunk_size x bank shard floats).
        bank_dtype: storage of the bank: float16 or bfloat16 halve its memory (ImageNet with
            a ResNet-50: 5 GB instead of 10 GB over all ranks) for similarities rounded to
            about 3 significant digits.
    """

    def __init__(
        self,
        num_classes: int | None = None,
        k: int = 200,
        temperature: float = 0.1,
        every_n_epochs: int = 1,
        chunk_size: int = 1024,
        bank_dtype: BankDtype = "float32",
    ) -> None:
        require(every_n_epochs >= 1, "KNNMonitor.every_n_epochs", every_n_epochs, ">= 1")
        require(k >= 1, "KNNMonitor.k", k, ">= 1")
        require(temperature > 0, "KNNMonitor.temperature", temperature, "> 0")
        self.num_classes = num_classes
        self._given_num_classes = num_classes
        self.k = k
        self.temperature = temperature
        self.every_n_epochs = every_n_epochs
        self.chunk_size = chunk_size
        require(
            bank_dtype in ("float32", "float16", "bfloat16"),
            "KNNMonitor.bank_dtype",
            bank_dtype,
            "one of float32, float16, bfloat16",
        )
        self.bank_dtype = getattr(torch, bank_dtype)
        self.val_rows = RowCollector()
        self.active = False
        self._bank_loader: DataLoader | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._bank_loader = None  # a new run may bring a new datamodule
        self.num_classes = self._given_num_classes or getattr(
            trainer.datamodule, "num_classes", None
        )
        datamodule = trainer.datamodule
        if stage in ("fit", "validate"):  # before any work, not at the first kNN epoch
            require_bank(datamodule)
        refuse_other_class_count("KNNMonitor", self._given_num_classes, datamodule)
        if stage == "fit":
            check_monitors(trainer, KNN_KEYS, self.every_n_epochs, "KNNMonitor")
        if self.num_classes is None and datamodule is not None and says_unlabeled(datamodule):
            raise SettingError(
                f"KNNMonitor needs labelled images, and the data module "
                f"({type(datamodule).__name__}) has none (num_classes=None, e.g. data.root/train "
                f"without class folders): remove the KNNMonitor callback, or give class folders "
                f"(train/<class>/<image>); if the labels exist, set its num_classes"
            )

    def _due(self, trainer: L.Trainer) -> bool:
        # val_check_interval < 1: one bank pass an epoch, at its end; the run's last
        # validation too: a short run still gets a figure
        return not trainer.fast_dev_run and validation_due(trainer, self.every_n_epochs)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.val_rows.reset()
        self.active = self._due(trainer)

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if not self.active or dataloader_idx != 0:
            return
        if not isinstance(outputs, dict) or "features" not in outputs:
            raise RuntimeError(
                "KNNMonitor needs validation_step to return {'features': ..., 'labels': ...}"
            )
        loader = validation_loader(trainer, dataloader_idx)
        self.val_rows.add(loader, batch_idx, outputs["features"], outputs["labels"])

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self.active:
            return
        self.active = False
        device = pl_module.device
        query, query_labels = self.val_rows.gather(trainer, device)
        self.val_rows.reset()
        self._refuse_labels_past_classes(query_labels)  # before the bank pass
        try:
            shard, shard_labels, shard_index = self._encode_bank(trainer, pl_module)
        except PassCutShort as cut:
            rank_zero_info(f"KNNMonitor: no kNN figure this epoch: the run is stopping ({cut})")
            return
        keep = shard_labels >= 0
        shard, shard_labels, shard_index = shard[keep], shard_labels[keep], shard_index[keep]
        keep = query_labels >= 0
        query, query_labels = query[keep], query_labels[keep]
        gather = _stacking_all_gather(trainer)
        bank_size, top_label = gather(
            torch.tensor([len(shard), int(shard_labels.max()) if len(shard) else -1], device=device)
        ).T
        lacking = [
            split
            for split, empty in (
                ("training", int(bank_size.sum()) == 0),
                ("validation", len(query) == 0),
            )
            if empty
        ]  # a labelled train/ beside a flat val/ is no bank-less run
        if lacking:
            rank_zero_warn(f"KNNMonitor: no labelled {' or '.join(lacking)} images; skipping")
            return
        self._refuse_labels_past_classes(top_label)  # the same on every rank: all raise
        num_classes = self.num_classes or int(top_label.max()) + 1
        scores = sharded_knn_predict(
            query,
            shard,
            shard_labels,
            shard_index,
            num_classes,
            self.k,
            self.temperature,
            self.chunk_size,
            gather,
        )
        # Every rank holds the same global result; sync_dist averages equal values (exact) and
        # keeps Lightning from warning about unsynced epoch-level metrics.
        for key, k in zip(KNN_KEYS, (1, 5), strict=True):
            pl_module.log(key, top_k_accuracy(scores, query_labels, k), sync_dist=True)

    def _refuse_labels_past_classes(self, labels: Tensor) -> None:
        """A bank label past num_classes failed the vote's scatter with a bare index error, a
        query's was never scored right. The labels are gathered from every rank: every rank
        raises, or none."""
        top = int(labels.max()) if len(labels) else -1
        if self.num_classes and top >= self.num_classes:
            message = labels_past_classes(
                "KNNMonitor", self.num_classes, self._given_num_classes, top
            )
            raise SettingError(message)

    @torch.no_grad()
    def _encode_bank(
        self, trainer: L.Trainer, pl_module: L.LightningModule
    ) -> tuple[Tensor, Tensor, Tensor]:
        """This rank's shard of the bank: unit features in ``bank_dtype``, labels, and their
        positions in the bank's dataset."""
        if self._bank_loader is None:
            datamodule = require_bank(trainer.datamodule)
            self._bank_loader = shard_loader(datamodule.eval_train_dataloader(), trainer)
        rows = RowCollector(self.bank_dtype)
        # a pass over the whole training set: cut short when the run is being stopped
        stop = partial(stop_requested, trainer)
        encode_rows(trainer, pl_module, self._bank_loader, rows, normalize=True, stop=stop)
        return rows.shard(trainer, pl_module.device)


def _stacking_all_gather(trainer: L.Trainer):
    """Every rank's tensor stacked along a new dim 0 (Lightning's all_gather, which in one
    process returns the tensor unstacked)."""
    if trainer.world_size == 1:
        return lambda t: t[None]
    return trainer.strategy.all_gather


def require_bank(datamodule: Any) -> Any:
    """The data module, which must serve the memory bank (the un-augmented training images)."""
    if datamodule is None or not hasattr(datamodule, "eval_train_dataloader"):
        raise SettingError(
            "KNNMonitor needs a data module with eval_train_dataloader() (every "
            "SimCLRDataModule has one: the training images without augmentation): pass "
            "datamodule= to the Trainer's fit/validate, not dataloaders"
        )
    return datamodule


def refuse_other_class_count(name: str, given: int | None, datamodule: Any) -> None:
    """Refuse at setup a ``num_classes`` below the data module's (this monitor's, the
    probe's, the report's): the first batch, or kNN epoch, failed with a torch error naming
    no setting. More is left alone: unused classes cost nothing, and a data module may
    count more than its labels use."""
    count = getattr(datamodule, "num_classes", None)
    if given is not None and isinstance(count, int) and count >= 2 and given < count:
        raise SettingError(
            f"{name}.num_classes={given} is invalid: must be at least {count}, the classes of "
            f"the data module ({type(datamodule).__name__}), or null to read them "
            f"(--trainer.callbacks.num_classes on the command line)"
        )


def labels_past_classes(name: str, num_classes: int, given: int | None, top: int) -> str:
    """The message for labels up to ``top``, past ``num_classes`` (``given`` or the data's)."""
    if given is None:
        return (
            f"{name}: the data module says num_classes={num_classes}, but its labels go up to "
            f"{top}: correct the data module's num_classes"
        )
    return (
        f"{name}.num_classes={given} is invalid: must be above the largest label, {top} "
        f"(--trainer.callbacks.num_classes on the command line)"
    )
