"""The SimCLR LightningModule: encoder f, projection head g, NT-Xent, and the paper's optimiser."""

from __future__ import annotations

from typing import Any, Literal, get_args

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from simclr_lightning.backbones import build_backbone
from simclr_lightning.batches import check_channels, two_views
from simclr_lightning.checkpoint import with_class_path
from simclr_lightning.data.transforms import preprocessing_of
from simclr_lightning.distributed import already_synced, mean_over_processes
from simclr_lightning.epoch_sums import ResumedEpochMean
from simclr_lightning.errors import require
from simclr_lightning.grad_cache import embed_in_chunks
from simclr_lightning.heads import ProjectionHead
from simclr_lightning.loading import LoadsItsOwnCheckpoints
from simclr_lightning.loss import LossReduction, NTXentLoss
from simclr_lightning.optim import (
    LRScaling,
    OptimizerName,
    build_optimizer,
    param_groups,
    scaled_learning_rate,
)
from simclr_lightning.run_checks import (
    StepWatch,
    check_accumulation,
    check_checkpoint_folders,
    check_equal_batches,
    check_last_batch,
    check_pretraining_run,
    skip_unread_validation,
    warn_unmeasured_validation,
)
from simclr_lightning.schedule import (
    carry_schedule_over,
    global_batch_size,
    replan_if_tuned,
    step_schedule,
)
from simclr_lightning.stop_position import save_as_inside_epoch
from simclr_lightning.supcon import SupConLoss, require_labels

LossName = Literal["ntxent", "supcon"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
COMPILE_MODES = get_args(CompileMode)


class SimCLR(LoadsItsOwnCheckpoints, L.LightningModule):
    """SimCLR pretraining (Chen et al. 2020; v2 head: Chen et al. 2020b).

    Training batches are ``((view_a, view_b), labels)``. With ``loss: ntxent`` (SimCLR) labels
    are only passed on to callbacks (online probe, kNN); ``loss: supcon`` (Khosla et al. 2020)
    uses them to define the positives. ``training_step`` and ``validation_step`` return the
    backbone features so callbacks need no second forward. The progress bar's ``loss`` is the
    value the NaN check has read, two steps late on a GPU; ``train/loss`` goes to the loggers.
    Under DDP both are the mean over processes.

    The defaults are one recipe: google-research/simclr's CIFAR-10 pretraining command
    (ResNet-18 with the CIFAR stem its code uses for images of 32 px, the code's 3-layer head
    of the encoder's width with BatchNorm on every layer, LARS at 1.0 x B/256 with 10 warm-up
    epochs, weight decay 1e-4, temperature 0.5, batch 512 in ``configs/cifar10.yaml``).

    Args:
        backbone: resnet18, resnet34 or resnet50 (torchvision, built from scratch), or
            ``timm:<name>`` for any timm model (``pip install 'simclr-lightning[timm]'``).
        cifar_stem: 3x3 stride-1 first convolution and no max-pool, for 32x32 images
            (torchvision ResNets only).
        in_channels: 3 for colour images, 1 for MNIST-like data.
        zero_init_residual: start every residual block as the identity (the last BatchNorm
            of each block at zero), as the official ResNet does.
        timm_kwargs: extra ``timm.create_model`` arguments (e.g. ``{"img_size": 32}``).
        head_hidden_dim / head_output_dim / head_layers / head_output_bn: the projection MLP
            (2 layers is SimCLR v1, 3 is v2); ``head_hidden_dim`` None means the encoder's width;
            ``head_output_bn`` the official scale-only BatchNorm on the output.
        loss: ntxent (SimCLR's NT-Xent) or supcon (supervised contrastive, L_out; needs labels).
        temperature: the tau of the loss.
        loss_reduction: sum_of_views is google-research/simclr's ``loss_a + loss_b`` (each
            view's mean over the N images, summed), twice the paper's 1/(2N) mean over the
            anchors (mean, as lightly and solo-learn). LARS is not invariant to that factor,
            so the official learning rates and weight decay need the official sum; recipes
            tuned with the mean (lightly's, solo-learn's) need mean.
        optimizer: lars (the paper), sgd (momentum) or adamw.
        base_lr: learning rate before scaling; the peak rate is base_lr * B / 256 (linear)
            or base_lr * sqrt(B) (sqrt), B the global batch (per-device batch x devices x
            nodes). Gradient accumulation is refused (it adds no negatives): use
            ``grad_cache_chunks`` for a larger batch in the same memory.
        weight_decay: applied to weights only; BatchNorm and bias parameters are excluded
            (and skip LARS adaptation) when ``exclude_bn_bias``.
        warmup_epochs: linear warm-up length, then cosine decay to ``final_lr_ratio`` x peak,
            stepped every optimizer step; a warning says when it outlasts the run.
        gather_distributed: under DDP use every rank's embeddings as negatives.
        batch_size: per-device batch for the learning-rate rule; None reads it from the
            datamodule (or the train DataLoader).
        channels_last: on CUDA, keep the encoder and its inputs in channels-last memory
            format (NHWC), the layout tensor-core convolutions want under bf16/fp16.
        compile: ``torch.compile`` the encoder when fitting (state-dict names unchanged).
            Measure first: for CIFAR ResNet-18 eager was faster in one H100 measurement.
        compile_mode: ``torch.compile``'s mode: reduce-overhead replays the encoder's
            kernels as CUDA graphs (fewer launches), max-autotune also searches kernels.
        grad_cache_chunks: above 1, gradient caching: the encoder's activations are those
            of one chunk of the per-device batch (of ``batch_size / grad_cache_chunks`` image
            pairs), while the loss still uses the whole global batch; costs a second encoder
            forward. BatchNorm normalises each chunk by its own statistics.
        loss_block_size: anchors whose similarities NT-Xent holds at once (memory about
            ``loss_block_size x 2 x global batch`` floats).
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        cifar_stem: bool = True,
        in_channels: int = 3,
        zero_init_residual: bool = True,
        timm_kwargs: dict[str, Any] | None = None,
        head_hidden_dim: int | None = None,
        head_output_dim: int = 128,
        head_layers: int = 3,
        head_output_bn: bool = True,
        loss: LossName = "ntxent",
        temperature: float = 0.5,
        loss_reduction: LossReduction = "sum_of_views",
        optimizer: OptimizerName = "lars",
        base_lr: float = 1.0,
        lr_scaling: LRScaling = "linear",
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        lars_eta: float = 0.001,
        exclude_bn_bias: bool = True,
        warmup_epochs: float = 10.0,
        final_lr_ratio: float = 0.0,
        gather_distributed: bool = True,
        batch_size: int | None = None,
        channels_last: bool = True,
        compile: bool = False,
        compile_mode: CompileMode = "default",
        grad_cache_chunks: int = 1,
        loss_block_size: int = 1024,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        require(base_lr > 0, "model.base_lr", base_lr, "> 0")
        require(weight_decay >= 0, "model.weight_decay", weight_decay, ">= 0")
        require(warmup_epochs >= 0, "model.warmup_epochs", warmup_epochs, ">= 0")
        require(0 <= final_lr_ratio <= 1, "model.final_lr_ratio", final_lr_ratio, "in [0, 1]")
        require(temperature > 0, "model.temperature", temperature, "> 0")
        require(0 <= momentum < 1, "model.momentum", momentum, "in [0, 1)")
        require(lars_eta > 0, "model.lars_eta", lars_eta, "> 0")
        require(loss in ("ntxent", "supcon"), "model.loss", loss, "ntxent or supcon")
        require(optimizer in ("lars", "sgd", "adamw"), "model.optimizer", optimizer,
                "one of lars, sgd, adamw")  # fmt: skip
        require(lr_scaling in ("linear", "sqrt", "none"), "model.lr_scaling", lr_scaling,
                "one of linear, sqrt, none")  # fmt: skip
        require(batch_size is None or batch_size >= 2, "model.batch_size", batch_size, ">= 2")
        require(
            compile_mode in COMPILE_MODES,
            "model.compile_mode",
            compile_mode,
            "one of " + ", ".join(COMPILE_MODES),
        )
        require(grad_cache_chunks >= 1, "model.grad_cache_chunks", grad_cache_chunks, ">= 1")
        hidden_ok = head_hidden_dim is None or head_hidden_dim >= 1  # 0 meant the encoder's width
        require(hidden_ok, "model.head_hidden_dim", head_hidden_dim, ">= 1, or null for the width")
        self.backbone, self.feature_dim = build_backbone(
            backbone, cifar_stem, in_channels, zero_init_residual, timm_kwargs
        )
        self.head = ProjectionHead(
            self.feature_dim,
            hidden_dim=head_hidden_dim or self.feature_dim,
            output_dim=head_output_dim,
            num_layers=head_layers,
            output_bn=head_output_bn,
        )
        if loss == "supcon":  # untiled: it holds the [2N, 2NW] similarities
            self.criterion = SupConLoss(temperature, gather_distributed, loss_reduction)
        else:
            self.criterion = NTXentLoss(
                temperature, gather_distributed, loss_block_size, loss_reduction
            )
        self._compiled = False
        self._watch = StepWatch(head_output_dim)
        self._loss_mean = ResumedEpochMean("train/loss")
        # the data's evaluation preprocessing, recorded in checkpoints: ImageFilesDataModule
        # prepares images to predict with it
        self.preprocessing: dict | None = None

    def forward(self, x: Tensor) -> Tensor:
        """Encoder features h = f(x): the representation used downstream."""
        expected = self.hparams.get("in_channels", 3)
        check_channels(x, expected, f"set model.in_channels={x.shape[1]} for this data")
        return self.backbone(self._layout(x))

    def _layout(self, x: Tensor) -> Tensor:
        if self.hparams.get("channels_last") and x.is_cuda and x.ndim == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def configure_model(self) -> None:
        # Before the strategy wraps the model (DDP builds its gradient buckets with these
        # strides) and in every stage, so weights and inputs agree in validate/predict too.
        if self._trainer is None:
            return
        if self.hparams.get("channels_last") and self.trainer.strategy.root_device.type == "cuda":
            self.backbone.to(memory_format=torch.channels_last)
        if self.hparams.get("compile") and self.trainer.state.fn == "fit" and not self._compiled:
            # in place: parameters and state-dict keys stay the same
            self.backbone.compile(mode=self.hparams.get("compile_mode", "default"))
            self._compiled = True

    def training_step(self, batch, batch_idx: int) -> dict[str, Tensor]:
        (x_a, x_b), labels = two_views(batch)
        if self.hparams.gather_distributed:
            check_equal_batches(self.trainer, len(x_a), batch_idx)
        if self.hparams.grad_cache_chunks > 1:
            features, z = embed_in_chunks(
                self._encode, x_a, x_b, self.hparams.grad_cache_chunks, self
            )
        else:  # one pass over both views: BatchNorm sees the 2N images together, as in SimCLR
            features, z = self._encode(torch.cat([x_a, x_b]))
        z_a, z_b = z.chunk(2)
        if self.hparams.get("loss") == "supcon":
            loss, stats = self.criterion.forward_with_stats(z_a, z_b, labels)
        else:
            loss, stats = self.criterion.forward_with_stats(z_a, z_b)
        # No host read here: the watch checks the loss (and z_std) two steps late on a GPU.
        every = self.trainer.log_every_n_steps  # 0: Lightning never logs
        logging_step = every > 0 and self.global_step % every == 0
        # The mean over processes (non-finite on every process as soon as on one, so all of
        # them stop at the same step), from one all-reduce queued on the device: not
        # sync_dist, whose barrier would make the host wait for the GPU at every step.
        mean_loss = mean_over_processes(loss)
        self._watch.push(self.global_step, mean_loss, stats["z_std"], watch_collapse=logging_step)
        # Not in the progress bar: Lightning reads every progress-bar value on the host after
        # every batch (whatever log_every_n_steps, even with the bar off), a GPU wait per step.
        # train/loss, _step and _epoch: the epoch's mean weighs a step by its global batch
        # (the same within a run, not across a resume at another world size)
        self._loss_mean.log(self, mean_loss, len(x_a) * self.trainer.world_size)
        if self._watch.loss is not None:  # the bar shows the loss the watch has read instead
            self.log("loss", self._watch.loss, prog_bar=True, logger=False, on_step=True)
        self.log_dict({f"train/{k}": v for k, v in stats.items()}, on_step=True, on_epoch=False)
        # A host tensor: Lightning turns a float into a tensor on the module's device, a
        # blocking copy that would make the host wait for the GPU at every step.
        lr = torch.tensor(self.trainer.optimizers[0].param_groups[0]["lr"])
        self.log("train/lr", lr, on_step=True)
        return {"loss": loss, "features": features.detach(), "labels": torch.cat([labels, labels])}

    def _encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self(x)
        return features, self.head(features)

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        x, labels = batch
        return {"features": self(x), "labels": labels}

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x)

    def configure_callbacks(self) -> list:  # the first hook of a run, before Lightning's checks
        self.__dict__.pop("validation_step", None)  # an earlier fit's skip (a failed one's too)
        return []

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.get("loss") == "supcon":
            require_labels(self.trainer.datamodule)
        if stage == "fit":
            check_checkpoint_folders(self.trainer)
            check_pretraining_run(self.trainer)
            if skip_unread_validation(self.trainer):  # Lightning runs none without the step
                self.validation_step = L.LightningModule.validation_step.__get__(self)
        elif stage == "validate":
            warn_unmeasured_validation(self.trainer)

    def on_train_start(self) -> None:
        # Lightning keeps whatever train/eval mode the module had before fit; a model left in
        # eval mode (e.g. by a kNN check before training) would pretrain with frozen BatchNorm
        # statistics. Every part of SimCLR trains, so make that explicit.
        self.train()
        already_synced("train/loss")
        replan_if_tuned(self, self.lr, "SimCLR")  # BatchSizeFinder, LearningRateFinder
        carry_schedule_over(self)  # resumed with another global batch
        check_last_batch(self.trainer, self.hparams.gather_distributed)  # a plain DataLoader
        self._watch.reset()  # an earlier fit's non-finite loss would stop this one at once
        self._loss_mean.start()

    def on_train_epoch_end(self) -> None:
        self._watch.flush()

    def on_train_end(self) -> None:
        self._watch.flush()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Checkpoints from before model.loss_reduction were trained with the mean: a resumed
        # run goes on with it rather than doubling its gradients midway.
        saved = checkpoint.get("hyper_parameters") or {}
        if saved and "loss_reduction" not in saved and self.hparams.loss_reduction != "mean":
            rank_zero_warn(
                "this checkpoint predates model.loss_reduction and was trained with the mean "
                "over the anchors: continuing with loss_reduction=mean"
            )
            self.hparams.loss_reduction = self.criterion.reduction = "mean"
        if "train_loss_mean" in checkpoint:
            self._loss_mean.load_state_dict(checkpoint["train_loss_mean"])
        record = checkpoint.get("pretraining") or {}
        self.preprocessing = record.get("preprocessing") or self.preprocessing

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self._watch.flush()  # never write the weights of a non-finite step
        if self._trainer is not None:  # stopped by max_steps or max_time: resume in the epoch
            save_as_inside_epoch(self._trainer, checkpoint)
        checkpoint["train_loss_mean"] = self._loss_mean.state_dict()  # the epoch so far
        if checkpoint.get("hyper_parameters"):
            checkpoint["hyper_parameters"] = with_class_path(self, checkpoint)
        # the data's normalisation, which linear evaluation of this encoder must repeat
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        self.preprocessing = preprocessing_of(datamodule) or self.preprocessing
        if self.preprocessing is not None:
            checkpoint["pretraining"] = {"preprocessing": self.preprocessing}

    def global_batch_size(self) -> int:
        """Images per optimizer step over all processes: what the learning-rate rule scales by."""
        return global_batch_size(self.trainer, self.hparams.batch_size)

    @property
    def lr(self) -> float:
        """The peak learning rate, ``base_lr`` scaled for the global batch (the trainer's):
        what Lightning's learning-rate finder sweeps and sets (setting it sets ``base_lr``)."""
        if self._trainer is None:
            raise AttributeError("SimCLR.lr needs a trainer (the global batch): see base_lr")
        hp = self.hparams
        return scaled_learning_rate(hp.base_lr, self.global_batch_size(), hp.lr_scaling)

    @lr.setter
    def lr(self, value: float) -> None:
        hp = self.hparams
        hp.base_lr = value / scaled_learning_rate(1.0, self.global_batch_size(), hp.lr_scaling)

    def configure_optimizers(self):
        hp = self.hparams
        check_accumulation(self.trainer)
        lr = self.lr
        groups = param_groups(self, hp.weight_decay, hp.exclude_bn_bias)
        optimizer = build_optimizer(hp.optimizer, groups, lr, hp.momentum, hp.lars_eta)
        schedule = step_schedule(self, optimizer, "SimCLR", lr, hp.warmup_epochs, hp.final_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": schedule}
