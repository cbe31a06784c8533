"""Linear evaluation and fine-tuning of a pretrained encoder: the paper's headline metric."""

from __future__ import annotations

from typing import Any, Literal, get_args

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simclr_lightning import checkpoint as checkpoints
from simclr_lightning.backbones import build_backbone
from simclr_lightning.batches import check_channels
from simclr_lightning.distributed import (
    already_synced,
    loader_count,
    pick_loader,
    rank_and_world_size,
    real_rows,
    sum_over_processes,
)
from simclr_lightning.epoch_sums import EpochSums, ResumedEpochMean
from simclr_lightning.errors import CheckpointError, require
from simclr_lightning.evaluation.classify_data import (
    check_evaluated_data,
    checkpoint_architecture,
    classify_batch,
    classify_data,
    record_class_names,
    refuse_pretraining,
    warn_idle_settings,
)
from simclr_lightning.evaluation.eval_figures import StageFigures
from simclr_lightning.heads import ProjectionHead
from simclr_lightning.lagged_reads import LaggedReads
from simclr_lightning.loading import LoadsItsOwnCheckpoints
from simclr_lightning.optim import LRScaling, classifier_optimizer, classifier_rates
from simclr_lightning.run_checks import check_checkpoint_folders
from simclr_lightning.schedule import (
    carry_schedule_over,
    check_rate_finder,
    replan_if_tuned,
    step_schedule,
)
from simclr_lightning.stop_position import save_as_inside_epoch


class LinearEval(LoadsItsOwnCheckpoints, L.LightningModule):
    """A linear classifier on a (frozen) SimCLR encoder: linear evaluation, or fine-tuning.

    ``checkpoint`` is a SimCLR (or LinearEval, or exported) checkpoint; its architecture
    (``backbone``, ``cifar_stem``, ``in_channels``, ``timm_kwargs``) overrides the arguments of
    the same names, which only matter without one. ``head_layers`` k > 0 keeps the first k
    layers of the pretrained projection head under the classifier: SimCLR v2 fine-tunes from the
    first one (google-research/simclr ``ft_proj_selector``), which beats fine-tuning from the
    encoder when few labels are used. Frozen (the default): ``requires_grad=False`` and
    BatchNorm kept in eval mode, so the features are exactly the pretrained ones. ``finetune``
    trains the encoder and kept head layers too, at ``backbone_lr``. The classifier starts at
    zero (the official ``zero_init_logits_layer``). The learning rate follows a cosine over the
    run's optimizer steps (stepped per iteration), whatever ``max_epochs`` is; resumed with
    another global batch (another world size), it goes on at the same epoch. Use with a data
    module's ``task: classify`` (random resized crop + flip, as the official code; with
    ``data.label_fraction`` for the semi-supervised protocol).

    Logs ``train/loss``, ``train/top1``, ``val/top1``, ``val/top5``, ``val/loss``,
    ``test/top1``, ``test/top5``, ``test/loss``, each over the labelled images of all processes
    (under DDP the same as one process holding every batch); several val/test loaders have their
    own figures (``val/top1/dataloader_idx_1``), a loader without a labelled image none.
    ``predict_step`` returns class probabilities. Class names (from an ImageFolder's
    ``classes``, or ``class_names``) and the evaluation preprocessing are stored in the
    checkpoint for prediction.

    Args:
        optimizer: sgd (Nesterov momentum) or lars (SimCLR's linear evaluation); LARS skips
            biases and BatchNorm, which are never weight-decayed either, and the classifier
            (the official ``head_supervised``), whose weight is.
        lr: peak learning rate of the head, scaled by ``lr_scaling``.
        lr_scaling: ``linear`` (``lr * B / 256``, the paper's linear evaluation), ``sqrt``
            (``lr * sqrt(B)``, v2's fine-tuning) or ``none``, B the images of an optimizer
            step (all devices, times ``trainer.accumulate_grad_batches``).
        backbone_lr: of the encoder (and kept head layers) when fine-tuning, scaled as ``lr``;
            None means ``lr``.
        head_layers: pretrained projection-head layers kept under the classifier (0: none).
        zero_init_classifier: start the classifier at zero, as the official fine-tuning does.
        head_config: recorded from ``checkpoint`` so this module's own checkpoints rebuild the
            kept head layers; not set by hand.
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        num_classes: int = 10,
        finetune: bool = False,
        optimizer: Literal["sgd", "lars"] = "sgd",
        lr: float = 0.1,
        lr_scaling: LRScaling = "none",
        backbone_lr: float | None = None,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        nesterov: bool = True,
        head_layers: int = 0,
        zero_init_classifier: bool = True,
        backbone: str = "resnet18",
        cifar_stem: bool = True,
        in_channels: int = 3,
        timm_kwargs: dict[str, Any] | None = None,
        head_config: dict[str, Any] | None = None,
        class_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        require(optimizer in ("sgd", "lars"), "model.optimizer", optimizer, "sgd or lars")
        require(num_classes >= 2, "model.num_classes", num_classes, ">= 2")
        require(lr > 0, "model.lr", lr, "> 0")
        scalings = get_args(LRScaling)
        require(lr_scaling in scalings, "model.lr_scaling", lr_scaling, f"one of {scalings}")
        require(backbone_lr is None or backbone_lr >= 0, "model.backbone_lr", backbone_lr, ">= 0")
        require(
            not nesterov or momentum > 0, "model.momentum", momentum, "> 0 with model.nesterov=true"
        )
        require(class_names is None or len(class_names) == num_classes, "model.class_names",
                class_names, f"a list of model.num_classes={num_classes} names")  # fmt: skip
        require(head_layers >= 0, "model.head_layers", head_layers, ">= 0")
        self.save_hyperparameters()
        state, projection = None, None
        loaded = checkpoints.load_checkpoint(checkpoint) if checkpoint is not None else None
        self.pretraining = checkpoints.pretraining_record(loaded)  # the normalisation to repeat
        if loaded is not None:
            state, arch = checkpoints.load_backbone_state(loaded)
            arch = checkpoint_architecture(type(self), self.hparams, arch)  # it wins, said
            if head_layers:
                projection, head_config = checkpoints.projection_layers(loaded, head_layers)
            for record in (self.hparams, self._hparams_initial):  # saved, and what loggers get
                record.update(arch, head_config=head_config)  # its checkpoints need no file
            backbone, cifar_stem, in_channels, timm_kwargs = arch.values()  # ARCH_KEYS order
        self.backbone, self.feature_dim = build_backbone(
            backbone, cifar_stem, in_channels, timm_kwargs=timm_kwargs
        )
        self._channels = in_channels  # checked in forward: one line
        if state is not None:
            try:
                self.backbone.load_state_dict(state)
            except RuntimeError as err:  # another network, or settings a state dict lacks
                problem = checkpoints.unfit_problem(loaded, self.backbone, state, arch)
                raise CheckpointError("model.checkpoint", checkpoint, problem) from err
        if projection is None:
            require(
                not head_layers or head_config is not None,
                "model.head_layers",
                head_layers,
                "0 without model.checkpoint (the head layers come from it)",
            )
            projection = nn.Sequential()
            if head_layers:
                projection = ProjectionHead(**head_config).first_layers(head_layers)
        self.projection = projection
        if head_layers:
            self.feature_dim = [m for m in projection if isinstance(m, nn.Linear)][-1].out_features
        for module in (self.backbone, self.projection):
            module.requires_grad_(finetune)
            module.train(finetune)
        self.head = nn.Linear(self.feature_dim, num_classes)
        if zero_init_classifier:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self.class_names = list(class_names) if class_names is not None else None
        self.data_class_names: list[str] | None = None  # the fit data's, checked against
        self.preprocessing: dict[str, Any] | None = None
        self.val_figures = StageFigures("val", num_classes)
        self.test_figures = StageFigures("test", num_classes)
        # Training hits and labelled rows over all processes (the same on every one).
        self._train_sums = EpochSums(2)
        self._loss_mean = ResumedEpochMean("train/loss")
        self._reads, self._bar_loss = LaggedReads(), None

    def train(self, mode: bool = True) -> LinearEval:
        """Keep a frozen encoder's BatchNorm on its pretrained statistics."""
        super().train(mode)
        if not self.hparams.finetune:
            self.backbone.eval()
            self.projection.eval()
        return self

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Lightning restores the modes it captured around validation by setting ``training``
        # on each submodule directly, bypassing ``train()``: enforce eval mode where it matters.
        if not self.hparams.finetune and (self.backbone.training or self.projection.training):
            self.backbone.eval()
            self.projection.eval()

    def forward(self, x: Tensor) -> Tensor:
        check_channels(x, self._channels, "evaluate the encoder on images like its pretraining's")
        with torch.set_grad_enabled(self.hparams.finetune and torch.is_grad_enabled()):
            features = self.projection(self.backbone(x))
        return self.head(features)

    # -- steps ----------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> Tensor:
        x, y = classify_batch(batch)
        logits = self(x)
        # Unlabeled images (-1) carry no loss. Weights, not a boolean index, and no count read
        # on the host: either would make the host wait for the GPU at every step.
        keep = y >= 0
        losses = F.cross_entropy(logits, y.clamp(min=0), reduction="none")
        loss_sum = torch.where(keep, losses, 0.0).sum()
        hits = ((logits.argmax(1) == y) & keep).sum()
        # Loss sum, hits and labelled rows over all processes from one all-reduce queued on
        # the device (sync_dist's barrier would make the host wait for the GPU every step).
        stats = torch.stack([loss_sum.float(), hits.float(), keep.sum().float()])
        stats = sum_over_processes(stats)
        rows = stats[2].clamp(min=1)
        # The mean over the global batch's labelled rows, as one process holding every batch
        # computes it: DDP averages the W processes' gradients, hence the factor W (a mean
        # per process would weigh a process's rows by how few labelled rows it holds).
        world = rank_and_world_size()[1]
        loss = loss_sum * (world / rows)
        mean_loss = stats[0] / rows
        self._train_sums.add(self.current_epoch, stats[1:])
        # The bar shows it read back two steps late: Lightning reads bar values every batch.
        self._loss_mean.log(self, mean_loss, len(y) * world)  # weighed by the global batch
        self._reads.push(None, mean_loss)
        for _, (value,) in self._reads.ready():
            self._bar_loss = torch.tensor(value)
        if self._bar_loss is not None:
            self.log("loss", self._bar_loss, prog_bar=True, logger=False, on_step=True)
        return loss

    def on_train_start(self) -> None:
        # Lightning keeps the mode from before fit (eval after load_from_checkpoint): fine-tuning
        # would run with frozen BatchNorm. train() keeps a frozen encoder frozen.
        self.train()
        already_synced("train/loss", "train/top1")  # over all processes: no sync_dist
        warn_idle_settings(self.hparams, self.trainer.ckpt_path)  # known once restored
        list(self._reads.drain())  # nothing of an earlier fit
        self._loss_mean.start()
        self._train_sums.start_fit()
        self._bar_loss = None
        replan_if_tuned(self, self._peak_lrs()[0], "LinearEval")  # e.g. BatchSizeFinder
        carry_schedule_over(self)  # resumed with another global batch

    def on_train_epoch_end(self) -> None:
        sums = self._train_sums.of(self.current_epoch)
        if sums is None:
            return
        hits, rows = sums  # already over all processes: nothing left to reduce
        self.log("train/top1", hits / rows.clamp(min=1))

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("val", batch, batch_idx, dataloader_idx)

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("test", batch, batch_idx, dataloader_idx)

    def _evaluate(self, stage: str, batch, batch_idx: int, dataloader_idx: int) -> None:
        x, y = classify_batch(batch)
        logits = self(x)
        trainer = self.trainer
        loaders = trainer.val_dataloaders if stage == "val" else trainer.test_dataloaders
        loader = pick_loader(loaders, dataloader_idx)
        keep = (y >= 0) & real_rows(loader, batch_idx, len(y), y.device)
        getattr(self, f"{stage}_figures").update(dataloader_idx, logits[keep], y[keep])

    def on_test_start(self) -> None:  # predict's too, and validate's (fit's is at setup)
        check_evaluated_data(self, self.trainer)

    on_predict_start = on_test_start

    def on_validation_start(self) -> None:
        if self.trainer.state.fn == "validate":
            check_evaluated_data(self, self.trainer)

    def on_validation_epoch_start(self) -> None:
        self.val_figures.start(loader_count(self.trainer.val_dataloaders), self.device)

    def on_test_epoch_start(self) -> None:
        self.test_figures.start(loader_count(self.trainer.test_dataloaders), self.device)

    def on_validation_epoch_end(self) -> None:
        self.val_figures.log_to(self)

    def on_test_epoch_end(self) -> None:
        self.test_figures.log_to(self)

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Class probabilities in float32 whatever the run's precision: the encoder may run
        in bf16, but the classifier and softmax do not, so what a user reads is not rounded
        to bf16's 8 bits (0.162109 for 0.1623). Under a ``*-true`` precision the head's own
        weights are bf16 too: float32 copies of them are used."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        with torch.no_grad():
            features = self.projection(self.backbone(x))
        weight, bias = self.head.weight.float(), self.head.bias.float()
        with torch.autocast(features.device.type, enabled=False):
            return F.linear(features.float(), weight, bias).softmax(dim=1)

    # -- optimisation ---------------------------------------------------------------------------
    def _peak_lrs(self) -> tuple[float, float]:
        hp = self.hparams
        return classifier_rates(self.trainer, hp.lr, hp.backbone_lr, hp.lr_scaling)

    def configure_optimizers(self):
        hp = self.hparams
        lr, encoder_lr = self._peak_lrs()
        encoders = [self.backbone, self.projection] if hp.finetune else []
        optimizer = classifier_optimizer(
            hp.optimizer, self.head, encoders, lr, encoder_lr, hp.weight_decay, hp.momentum,
            hp.nesterov,
        )  # fmt: skip
        schedule = step_schedule(self, optimizer, "LinearEval", lr)
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    # -- what prediction needs later ------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit":
            check_rate_finder(self.trainer, self.hparams.lr_scaling, "LinearEval")
            check_checkpoint_folders(self.trainer)
        if stage != "fit" or self.trainer.datamodule is None:
            return
        names, preprocessing = classify_data(self.trainer.datamodule, self.hparams.num_classes,
                                             self.pretraining)  # fmt: skip
        record_class_names(self, names)
        self.preprocessing = preprocessing or self.preprocessing

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._trainer is not None:  # stopped by max_steps or max_time: resume in its epoch
            save_as_inside_epoch(self._trainer, checkpoint)
        hparams = checkpoints.with_class_path(self, checkpoint)
        if hparams:
            hparams["checkpoint"] = None  # the weights are here: rebuilding needs no SimCLR file
            checkpoint["hyper_parameters"] = hparams
        checkpoint["linear_eval"] = {
            "class_names": self.class_names,
            "data_class_names": self.data_class_names,
            "preprocessing": self.preprocessing,
            "pretraining": self.pretraining,
            **self._train_sums.state_dict(),  # the epoch so far, the same on every rank
            "train_loss_mean": self._loss_mean.state_dict(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        refuse_pretraining(checkpoint, self._trainer.ckpt_path if self._trainer else None)
        extra = checkpoint.get("linear_eval") or {}
        if extra.get("class_names") is not None:
            self.class_names = list(extra["class_names"])
        self.data_class_names = extra.get("data_class_names")  # None: saved before it was kept
        self.preprocessing = extra.get("preprocessing") or self.preprocessing
        self.pretraining = extra.get("pretraining") or self.pretraining
        self._train_sums.load_state_dict(extra)
        if "train_loss_mean" in extra:
            self._loss_mean.load_state_dict(extra["train_loss_mean"])
