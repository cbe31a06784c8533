"""An online linear probe: a running estimate of linear-evaluation accuracy during pretraining,
for the cost of one matrix product per batch."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.nn.utils import skip_init
from torchmetrics.classification import MulticlassAccuracy

from simclr_lightning.callbacks.knn_monitor import labels_past_classes, refuse_other_class_count
from simclr_lightning.data.loaders import align_resumed_epoch
from simclr_lightning.distributed import (
    already_synced,
    rank_and_world_size,
    real_rows,
    validation_loader,
)
from simclr_lightning.epoch_sums import EpochSums
from simclr_lightning.errors import SettingError, require
from simclr_lightning.schedule import carried_step, loader_resumes, schedule_steps, warmup_cosine


class OnlineLinearProbe(L.Callback):
    """Trains ``nn.Linear(pl_module.feature_dim, num_classes)`` on the detached backbone
    features ``training_step`` returns (``{"features", "labels"}``): no second forward pass.

    The classifier and its optimizer live in this callback, not in the LightningModule, so the
    module's optimizer never sees them and no gradient reaches the encoder; creating the
    classifier (zero-initialised) draws no random numbers, so attaching the probe leaves the
    pretraining run bit-identical. Under DDP one all-reduce per step sums the probe's gradients
    (and its sample counts), so every rank applies the gradient of the mean loss over the
    global batch and the probes stay identical. Validation accuracy (top-1, top-5) is a
    torchmetrics ``MulticlassAccuracy`` reduced across ranks, with DistributedSampler's padding
    repeats left out. Rows labelled -1 (unlabeled images) are skipped; a global batch with no
    labelled row at all makes a zero-gradient step (momentum and weight decay act as on any
    step), so the step count and the cosine schedule follow the training batches.

    Nothing in a training step reads a value back on the host (that would make the host wait
    for the GPU every step): the training loss and accuracy are summed on the device and
    logged at the epoch's end.

    Logs ``probe/train_loss``, ``probe/train_top1`` (epoch means), ``probe/val_top1`` and
    ``probe/val_top5``. Classifier, optimizer and step count are saved in checkpoints; a run
    resumed with another global batch (another world size) goes on at the same epoch of the
    cosine schedule.

    Args:
        num_classes: classes of the labels; None reads the data module's ``num_classes``
            (every SimCLRDataModule of labelled images has one), so configs need no number.
            Fewer than the data module's classes is refused at setup; a label past it at
            the next validation or the epoch's end (a training step reads nothing back).
        optimizer: adam (robust to the scale of unnormalised features) or sgd (momentum).
        lr / weight_decay / momentum: of the probe's optimizer.
        schedule: constant, or cosine decay to 0 over the training batches of the run.
    """

    def __init__(
        self,
        num_classes: int | None = None,
        optimizer: Literal["adam", "sgd"] = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        schedule: Literal["constant", "cosine"] = "constant",
    ) -> None:
        name = "OnlineLinearProbe"
        require(
            num_classes is None or num_classes >= 2,
            f"{name}.num_classes",
            num_classes,
            ">= 2 or null",
        )
        require(optimizer in ("adam", "sgd"), f"{name}.optimizer", optimizer, "adam or sgd")
        require(
            schedule in ("constant", "cosine"), f"{name}.schedule", schedule, "constant or cosine"
        )
        require(lr > 0, f"{name}.lr", lr, "> 0")
        self.num_classes = num_classes
        self._given_num_classes = num_classes
        self.optimizer_name = optimizer
        self.lr = lr
        self.weight_decay = weight_decay
        self.momentum = momentum
        self.schedule = schedule
        self.classifier: nn.Linear | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.steps = 0
        self._per_epoch = 0  # training batches (probe steps) per epoch; 0: unknown
        self._saved_per_epoch = 0  # of the run a checkpoint was saved by
        self._total_steps = 1  # of the cosine, planned in on_train_start
        self._pending_state: dict[str, Any] | None = None
        self._val_rows = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(num_classes=self.num_classes)

    # -- construction ---------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        already_synced("probe/train_loss", "probe/train_top1")  # sums over ranks: the same
        dim = getattr(pl_module, "feature_dim", None)
        if not isinstance(dim, int):
            raise AttributeError(
                "OnlineLinearProbe needs pl_module.feature_dim, the width of the features "
                "training_step returns"
            )
        refuse_other_class_count("OnlineLinearProbe", self._given_num_classes, trainer.datamodule)
        self.num_classes = self._given_num_classes or _datamodule_classes(trainer)
        if stage == "fit":  # a new fit starts the probe's schedule again, as its module's
            self.steps, self._saved_per_epoch = 0, 0  # (a checkpoint's state comes after)
        classifier = self.classifier
        if classifier is not None and (classifier.in_features, classifier.out_features) == (
            dim,
            self.num_classes,
        ):
            return
        device = trainer.strategy.root_device
        # Zero init (the loss is convex, so nothing is lost): no random numbers drawn, so the run
        # stays bit-identical with or without the probe, and every rank and every strategy
        # (DDP reseeds its processes) starts from the same probe.
        self.classifier = skip_init(nn.Linear, dim, self.num_classes, device=device)
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)
        params = self.classifier.parameters()
        if self.optimizer_name == "adam":
            self.optimizer = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(
                params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
            )
        top5 = min(5, self.num_classes)
        self.val_top1 = MulticlassAccuracy(self.num_classes, top_k=1, average="micro").to(device)
        self.val_top5 = MulticlassAccuracy(self.num_classes, top_k=top5, average="micro").to(device)
        self._train_sums = EpochSums(3)  # loss, correct, rows over all ranks
        self._top_label, self._top_val_label = torch.tensor(-1, device=device), -1
        if self._pending_state is not None:
            self.load_state_dict(self._pending_state)

    # -- training -------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        self._train_sums.start_fit()
        batches = trainer.num_training_batches
        self._per_epoch = int(batches) if batches != float("inf") else 0
        if self.schedule == "cosine":  # planned once, not at every batch
            self._total_steps = probe_steps(trainer)
        saved, self._saved_per_epoch = self._saved_per_epoch, 0
        if trainer.estimated_stepping_batches != trainer.max_steps:  # a run of epochs
            # resumed with another global batch: the same epoch of this run's schedule
            resumes, at = loader_resumes(trainer), align_resumed_epoch(trainer)
            self.steps = carried_step(self.steps, saved, self._per_epoch, resumes, at)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not isinstance(outputs, dict) or "features" not in outputs or "labels" not in outputs:
            raise RuntimeError(
                "OnlineLinearProbe needs training_step to return {'loss', 'features', 'labels'}"
            )
        classifier, optimizer = self.classifier, self.optimizer
        device = classifier.weight.device
        features = outputs["features"].detach().to(device, torch.float32)
        labels = outputs["labels"].to(device, torch.long)  # a user's int32 labels too
        # Unlabelled rows (label < 0) get weight 0 rather than being indexed out: a boolean
        # index would make the host wait for the GPU at every step. So do labels past
        # num_classes, refused at the epoch's end or the next validation, not read here.
        self._top_label = torch.maximum(self._top_label, labels.max())
        keep = (labels >= 0) & (labels < self.num_classes)
        classifier.train()
        optimizer.zero_grad(set_to_none=False)
        with torch.enable_grad():
            logits = classifier(features)
            targets = labels.clamp(0, self.num_classes - 1)
            losses = F.cross_entropy(logits, targets, reduction="none")
            # A sum, not a mean: divided below by the labelled rows over all ranks.
            loss_sum = torch.where(keep, losses, 0.0).sum()
            loss_sum.backward()
        correct = ((logits.detach().argmax(dim=1) == labels) & keep).sum()
        params = list(classifier.parameters())
        stats = torch.stack([loss_sum.detach(), correct.float(), keep.sum().float()])
        packed = torch.cat([p.grad.flatten() for p in params] + [stats])
        if rank_and_world_size()[1] > 1:
            dist.all_reduce(packed)  # every rank calls this once per batch
        count = packed[-1].clamp(min=1)  # no labels anywhere: a zero gradient
        offset = 0
        for p in params:
            p.grad.copy_(packed[offset : offset + p.numel()].view_as(p)).div_(count)
            offset += p.numel()
        self._set_lr(trainer)
        optimizer.step()
        self.steps += 1
        self._train_sums.add(trainer.current_epoch, packed[-3:])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._refuse_labels_past_classes(trainer)
        sums = self._train_sums.of(trainer.current_epoch)
        if sums is None:
            return
        total_loss, total_correct, count = sums.tolist()
        if count == 0:
            return
        # Already summed over ranks, so the same on every rank: nothing left to reduce.
        pl_module.log("probe/train_loss", total_loss / count, on_epoch=True)
        pl_module.log("probe/train_top1", total_correct / count, on_epoch=True)

    def _set_lr(self, trainer: L.Trainer) -> None:
        if self.schedule == "constant":
            return
        lr = self.lr * warmup_cosine(self.steps, 0, self._total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # -- validation -----------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.val_top1.reset()
        self.val_top5.reset()
        self._val_rows = 0
        self._top_val_label = -1

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if dataloader_idx != 0 or self.classifier is None:
            return
        if not isinstance(outputs, dict) or "features" not in outputs or "labels" not in outputs:
            raise RuntimeError(
                "OnlineLinearProbe needs validation_step to return {'features', 'labels'}"
            )
        features = outputs["features"].to(self.classifier.weight.device, torch.float32)
        labels = outputs["labels"].to(features.device, torch.long)
        loader = validation_loader(trainer, dataloader_idx)
        keep = (labels >= 0) & real_rows(loader, batch_idx, len(labels), labels.device)
        if not keep.any():
            return
        # refused at the epoch's end, on every rank at once (torchmetrics raised a bare error)
        self._top_val_label = max(self._top_val_label, int(labels[keep].max()))
        keep &= labels < self.num_classes
        self.classifier.eval()
        logits = self.classifier(features[keep])
        self.val_top1.update(logits, labels[keep])
        self.val_top5.update(logits, labels[keep])
        self._val_rows += int(keep.sum())

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.classifier is None:
            return
        self._refuse_labels_past_classes(trainer)  # the sanity check's too: before any training
        if trainer.sanity_checking:
            return
        if not trainer.strategy.reduce_boolean_decision(self._val_rows > 0, all=False):
            return
        if self.steps == 0:  # the same on every rank
            # ``validate`` of a checkpoint written without the probe: its zero classifier
            # would score chance, logged as if measured
            rank_zero_warn(
                "OnlineLinearProbe has not trained (no training step yet, and no probe state "
                "in the checkpoint): probe/val_top1 and probe/val_top5 are not logged",
                category=UserWarning,
            )
            return
        # compute() all-gathers the metric states: exact global accuracy on every rank.
        top1, top5 = self.val_top1.compute(), self.val_top5.compute()
        pl_module.log("probe/val_top1", top1, sync_dist=True)
        pl_module.log("probe/val_top5", top5, sync_dist=True)
        self.val_top1.reset()
        self.val_top5.reset()

    def _refuse_labels_past_classes(self, trainer: L.Trainer) -> None:
        """Raised on every rank where any rank's labels reached num_classes: one read of the
        largest training label, at an epoch's end or a validation (which read anyway)."""
        top = torch.maximum(
            self._top_label, torch.tensor(self._top_val_label, device=self._top_label.device)
        )
        top = int(trainer.strategy.reduce(top, reduce_op="max"))
        if top >= self.num_classes:
            name, given = "OnlineLinearProbe", self._given_num_classes
            raise SettingError(labels_past_classes(name, self.num_classes, given, top))

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.classifier is None:
            return dict(self._pending_state or {})
        return {
            "classifier": self.classifier.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "steps": self.steps,
            "batches_per_epoch": self._per_epoch,
            **self._train_sums.state_dict(),  # the epoch so far, the same on every rank
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.classifier is None:  # restored before setup: apply once the classifier exists
            self._pending_state = state_dict
            return
        self.classifier.load_state_dict(state_dict["classifier"])
        saved = "adam" if "betas" in state_dict["optimizer"]["param_groups"][0] else "sgd"
        if saved == self.optimizer_name:  # another one's state broke its step (KeyError)
            self.optimizer.load_state_dict(state_dict["optimizer"])
        else:
            rank_zero_warn(f"OnlineLinearProbe: the checkpoint's probe optimizer is {saved!r}, "
                           f"not optimizer={self.optimizer_name!r}: it starts afresh")  # fmt: skip
        self.steps = int(state_dict.get("steps", 0))
        self._saved_per_epoch = int(state_dict.get("batches_per_epoch", 0))
        self._train_sums.load_state_dict(state_dict)
        self._pending_state = None


def probe_steps(trainer: L.Trainer) -> int:
    """The probe's steps in this run, one per training batch: the optimizer's steps times
    accumulate_grad_batches, fewer where an epoch's last step accumulates fewer batches."""
    total = schedule_steps(trainer, "OnlineLinearProbe") * trainer.accumulate_grad_batches
    batches, epochs = trainer.num_training_batches, trainer.max_epochs or -1
    if epochs > 0 and not math.isinf(batches):
        total = min(total, int(batches) * epochs)
    return max(1, total)


def _datamodule_classes(trainer: L.Trainer) -> int:
    datamodule = trainer.datamodule
    num_classes = getattr(datamodule, "num_classes", None)
    if hasattr(datamodule, "num_classes") and num_classes is None:
        raise SettingError(
            f"OnlineLinearProbe needs labelled images, and the data module "
            f"({type(datamodule).__name__}) has none (num_classes=None, e.g. data.root/train "
            f"without class folders): remove the OnlineLinearProbe callback, or give class "
            f"folders (train/<class>/<image>); if the labels exist, set its num_classes"
        )
    if num_classes == 1:  # setting num_classes would not mend it
        raise SettingError(
            f"OnlineLinearProbe needs labelled images of at least 2 classes, and the data "
            f"module ({type(datamodule).__name__}) has 1: give another class folder, or remove "
            f"the OnlineLinearProbe callback"
        )
    if not isinstance(num_classes, int) or num_classes < 2:
        raise SettingError(
            f"OnlineLinearProbe: num_classes is not set and the data module "
            f"({type(trainer.datamodule).__name__}) does not say how many classes its labels have "
            f"(num_classes={num_classes!r}): set it, e.g. --trainer.callbacks.num_classes 10"
        )
    return num_classes
