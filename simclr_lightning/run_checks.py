"""Checks of a SimCLR run that only the Trainer can make (its length, its accumulation) and the
watches of every step (a non-finite loss, a collapse): what used to train silently into a
wasted run now stops, or warns, first."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import (
    EarlyStopping,
    GradientAccumulationScheduler,
    ModelCheckpoint,
    ProgressBar,
)
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader

from simclr_lightning.errors import SettingError
from simclr_lightning.lagged_reads import LaggedReads


def run_length(trainer: L.Trainer, steps_per_epoch: int, total_steps: int) -> str:
    """The trainer settings that fix the run's length, as a user would set them."""
    epochs = total_steps / steps_per_epoch
    limit = f"trainer.max_epochs={trainer.max_epochs}"
    if trainer.max_steps != -1 and trainer.max_steps <= total_steps:
        limit = f"trainer.max_steps={trainer.max_steps}"
    return f"{limit} ({total_steps} optimizer steps, {epochs:.3g} epochs)"


def check_warmup(
    trainer: L.Trainer, warmup_epochs: float, steps_per_epoch: int, total_steps: int
) -> None:
    """Warn (rank zero, before the first step) when the warm-up outlasts the run: the learning
    rate would never reach its peak, and the cosine decay would never start.

    A warning, not an error: every short check of a recipe (``fast_dev_run``, ``--trainer.
    max_epochs 1`` with the paper's 10 warm-up epochs) is such a run, and is wanted."""
    warmup_steps = round(warmup_epochs * steps_per_epoch)
    if warmup_steps <= total_steps or trainer.fast_dev_run:
        return
    rank_zero_warn(
        f"model.warmup_epochs={warmup_epochs:g} is longer than the run, "
        f"{run_length(trainer, steps_per_epoch, total_steps)}: the learning rate never reaches "
        f"its peak and never decays. For the intended schedule set model.warmup_epochs <= "
        f"{total_steps / steps_per_epoch:.3g} or lengthen the run",
        category=UserWarning,
    )


def check_accumulation(trainer: L.Trainer) -> None:
    """Refuse gradient accumulation, also one that Lightning's ``GradientAccumulationScheduler``
    would switch on at a later epoch: the learning rate would scale with the accumulated batch
    while each loss still sees only one batch's negatives."""
    asked = [("trainer.accumulate_grad_batches=", trainer.accumulate_grad_batches)]
    for callback in trainer.callbacks:
        if isinstance(callback, GradientAccumulationScheduler):
            most = max(callback.scheduling.values())
            asked.append(("GradientAccumulationScheduler's accumulation of up to ", most))
    for setting, k in asked:
        if k <= 1:
            continue
        raise SettingError(
            f"{setting}{k} is invalid: must be 1 for SimCLR: "
            f"accumulation adds no negatives (each loss still contrasts one batch) while the "
            f"learning-rate rule would scale for {k}x the batch. For a {k}x larger batch in "
            f"the same memory multiply data.batch_size by {k} and set "
            f"model.grad_cache_chunks={k}"
        )


def check_equal_batches(trainer: L.Trainer, n: int, batch_idx: int) -> None:
    """Refuse, on every process at once, batches of different sizes across the processes when
    the loss gathers their embeddings: the gather needs one size everywhere, and otherwise
    aborts the run (gloo) or mixes garbage into the negatives (NCCL).

    Checked at each epoch's first and last batch only (one small all-gather and host read
    each): a ``DistributedSampler`` (Lightning's default) pads every process to the same
    count, so a size can differ only where a custom sampler or an iterable dataset runs
    short, at an epoch's end; a check at every step would make the host wait for the GPU."""
    if trainer.world_size == 1:
        return
    last = trainer.num_training_batches
    if math.isfinite(last):
        at_end = batch_idx == last - 1
    else:  # a loader without a length: its fetcher, a batch ahead, knows the last one
        at_end = bool(getattr(trainer.fit_loop.epoch_loop.batch_progress, "is_last_batch", 0))
    if batch_idx != 0 and not at_end:
        return
    sizes = trainer.strategy.all_gather(torch.tensor(n, device=trainer.strategy.root_device))
    sizes = [int(size) for size in sizes.flatten().tolist()]
    if len(set(sizes)) == 1:
        return
    raise SettingError(
        f"the processes' batches differ in size at batch {batch_idx} of epoch "
        f"{trainer.current_epoch} ({sizes} images, process by process): the loss gathers "
        f"every process's embeddings (model.gather_distributed=true), which needs one size. "
        f"Give every process the same number of images per batch (as Lightning's "
        f"DistributedSampler does, trainer.use_distributed_sampler=true), or set "
        f"model.gather_distributed=false"
    )


# The metrics of this library's callbacks, by prefix: monitoring one without its callback
# failed at the end of the first epoch, after an epoch of work
METRIC_SOURCES = {"knn/": "KNNMonitor", "probe/": "OnlineLinearProbe"}


def check_pretraining_run(trainer: L.Trainer) -> None:
    """Refuse, before any work, data that serves single labelled views (``task: classify``,
    linear evaluation's, kept when a pretraining config follows an evaluation one), which
    failed at the first batch with a shape error, and an ``EarlyStopping`` or
    ``ModelCheckpoint`` on a metric of a callback the run does not have."""
    task = getattr(trainer.datamodule, "task", "pretrain")
    if task != "pretrain":
        raise SettingError(
            f"SimCLR pretrains on two augmented views of each image: set data.task=pretrain "
            f"(got data.task={task!r}, single views for LinearEval)"
        )
    have = {cls.__name__ for callback in trainer.callbacks for cls in type(callback).__mro__}
    for callback in trainer.callbacks:
        monitor = getattr(callback, "monitor", None)
        if not isinstance(callback, (EarlyStopping, ModelCheckpoint)) or not monitor:
            continue
        owner = next((o for p, o in METRIC_SOURCES.items() if monitor.startswith(p)), None)
        if owner is not None and owner not in have:
            raise SettingError(
                f"{type(callback).__name__}(monitor={monitor!r}) watches a metric only {owner} "
                f"logs, and the run has no {owner}: add it (--trainer.callbacks+="
                f"simclr_lightning.{owner}, or --config configs/monitors.yaml), or monitor "
                f"another metric"
            )


def check_last_batch(trainer: L.Trainer, gathered: bool) -> None:
    """A training DataLoader passed to ``fit`` (a data module's own refuse this before setup)
    whose last batch is a global batch of one image, with no negative for NT-Xent (one per
    process under DDP is a global batch of W when the loss ``gathered`` them): the run
    stopped there, at the end of its first epoch, advising a larger batch size."""
    loader = trainer.train_dataloader
    if not isinstance(loader, DataLoader) or loader.batch_size is None or loader.drop_last:
        return
    if gathered and trainer.world_size > 1:
        return
    try:
        per_rank = len(loader.sampler)  # a DistributedSampler's: this process's share
    except TypeError:  # an iterable dataset's
        return
    batches = math.ceil(per_rank / loader.batch_size)
    if per_rank % loader.batch_size != 1 or trainer.num_training_batches < batches:
        return  # no batch of one, or limit_train_batches stops before it
    if 0 <= trainer.max_steps < batches:
        return  # the run stops before it
    raise SettingError(
        f"the training DataLoader (batch_size={loader.batch_size}, drop_last=False) leaves a "
        f"last batch of 1 image ({per_rank} images), which holds no negative for NT-Xent: "
        f"give it drop_last=True, or another batch_size"
    )


def check_launch(trainer: L.Trainer) -> None:
    """Refuse a command launched as several processes (torchrun, or another launcher that sets
    WORLD_SIZE) whose trainer runs as one: Lightning then picks its single-device strategy,
    and each process trains alone on all the data at one process's batch and learning rate,
    writing over the others' checkpoints, with no error."""
    launched = int(os.environ.get("WORLD_SIZE") or 1)
    if launched > 1 and trainer.world_size == 1:
        raise SettingError(
            f"launched as {launched} processes (WORLD_SIZE={launched}: torchrun, srun ...) but "
            f"trainer.devices={trainer.num_devices} x trainer.num_nodes={trainer.num_nodes} "
            f"runs one, so each would train alone on all the data: set --trainer.devices to "
            f"the processes of one node (and --trainer.num_nodes to the nodes) with "
            f"--trainer.strategy ddp"
        )


def check_checkpoint_folders(trainer: L.Trainer) -> None:
    """Refuse, before any work, a ``ModelCheckpoint`` folder this run cannot write (read-only,
    another user's): its first save would come after the first epoch, or at the end of the
    run, and stop it there with all the training lost. Tried by the process that writes
    (global rank zero) and said on every process at once; remote folders are left to their
    file system."""
    if trainer.fast_dev_run:  # Lightning saves nothing then: no folder made either
        return
    problem = None
    if trainer.is_global_zero:
        folders = [c.dirpath for c in trainer.checkpoint_callbacks if getattr(c, "dirpath", None)]
        problem = next(filter(None, map(_unwritable, folders)), None)
    problem = trainer.strategy.broadcast(problem)
    if problem is not None:
        raise SettingError(problem)


def _unwritable(folder: str | os.PathLike) -> str | None:
    if "://" in str(folder):
        return None
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        return (
            f"the ModelCheckpoint folder {str(folder)!r} cannot be written "
            f"({err.strerror or type(err).__name__}): set the checkpoint's dirpath (or "
            f"trainer.default_root_dir) to a folder this run can write"
        )
    return None


VALIDATION_HOOKS = [f"on_validation{part}" for part in (
    "_start", "_epoch_start", "_batch_start", "_batch_end", "_epoch_end", "_end")]  # fmt: skip


def reads_validation(trainer: L.Trainer) -> bool:
    """Whether anything takes the features SimCLR's ``validation_step`` returns: a callback's
    ``on_validation_batch_end`` (a progress bar's counts batches only), any validation hook of
    a user's own callback, or the module's own validation hooks (a user's subclass)."""
    module = type(trainer.lightning_module)

    def reads(callback: L.Callback) -> bool:
        own = not type(callback).__module__.startswith(("lightning.", "simclr_lightning."))
        hooks = VALIDATION_HOOKS if own else ("on_validation_batch_end",)
        return not isinstance(callback, ProgressBar) and any(
            getattr(type(callback), hook) is not getattr(L.Callback, hook) for hook in hooks
        )

    return any(reads(c) for c in trainer.callbacks) or any(
        getattr(module, hook) is not getattr(L.LightningModule, hook)
        for hook in ("on_validation_batch_end", "on_validation_epoch_end")
    ) or module.validation_step.__qualname__ != "SimCLR.validation_step"  # fmt: skip


def warn_unmeasured_validation(trainer: L.Trainer) -> None:
    """Say, before a ``validate`` of a SimCLR model, that nothing will be measured when no
    callback takes the features its ``validation_step`` returns: the run exits cleanly and
    prints no figure at all, as if it had measured nothing worth showing."""
    if reads_validation(trainer):
        return
    rank_zero_warn(
        "validate of a SimCLR model measures nothing by itself: its validation_step returns "
        "features for the monitors; add them (--config configs/monitors.yaml: kNN, linear "
        "probe, embedding plot) for figures, or measure the encoder by linear evaluation "
        "(configs/linear_eval.yaml)",
        category=UserWarning,
    )


def skip_unread_validation(trainer: L.Trainer) -> bool:
    """Whether a pretraining fit runs no validation, said in one line: no monitor watches it,
    and each pass computed the features of the whole held-out split (1,000 images every epoch
    of the quick start, 50,000 of ImageNet's) for nothing to read them. Kept where a
    ModelCheckpoint or EarlyStopping acts at validation's end (validation at another cadence
    than each epoch's end, or their own setting): they would never act."""
    every_epoch = getattr(trainer, "_val_check_time_interval", None) is None and (
        trainer.check_val_every_n_epoch == 1 and getattr(trainer, "val_check_interval", 1) == 1.0
    )
    at_validation = any(
        getattr(c, "_save_on_train_epoch_end", None) is False
        or getattr(c, "_check_on_train_epoch_end", None) is False
        or not every_epoch
        for c in trainer.callbacks
        if isinstance(c, (ModelCheckpoint, EarlyStopping))
    )
    if trainer.limit_val_batches == 0 or at_validation or reads_validation(trainer):
        return False
    rank_zero_info(
        "simclr-lightning: no callback reads validation, so none runs; --config "
        "configs/monitors.yaml adds kNN, probe and plots"
    )
    return True


class CollapseWatch:
    """Warns once (rank zero) when ``train/z_std``, the per-dimension std of the unit
    embeddings, falls below a tenth of its healthy value 1/sqrt(D): the embeddings have
    collapsed towards one point and the run is no longer learning."""

    def __init__(self, output_dim: int) -> None:
        self.healthy = 1 / math.sqrt(output_dim)
        self.warned = False

    def update(self, z_std: float, step: int) -> None:
        if self.warned or z_std >= 0.1 * self.healthy:
            return
        self.warned = True
        rank_zero_warn(
            f"train/z_std={z_std:.3g} at step {step} is below a tenth of its healthy "
            f"{self.healthy:.3g} (1/sqrt(model.head_output_dim)): the embeddings are "
            f"collapsing. Raise model.temperature, lower model.base_lr, or lengthen "
            f"model.warmup_epochs",
            category=UserWarning,
        )


class StepWatch:
    """Checks every training step's loss (finite) and, at logging steps, its ``z_std``
    (:class:`CollapseWatch`), reading both back two steps late on a GPU so it never waits.

    On a GPU the error for a non-finite loss therefore comes two steps after the step that
    made it (the message names that step). Under DDP every process stops at the same step if
    the losses pushed agree on being finite (the lag is a count of steps): the caller pushes
    a loss that is non-finite on every process as soon as on one. :meth:`flush` makes the
    check complete, and runs before any checkpoint is written, so no checkpoint ever holds the
    weights a non-finite step produced. Once seen, the error is raised again at every later
    check.

    ``loss`` is the last loss checked, a host tensor: what the progress bar can show without
    a read from the GPU (Lightning reads every progress-bar value after every batch).
    """

    def __init__(self, output_dim: int, reads: LaggedReads | None = None) -> None:
        self.collapse = CollapseWatch(output_dim)
        self.reads = reads if reads is not None else LaggedReads()
        self.failure: str | None = None
        self.loss: Tensor | None = None

    def push(self, step: int, loss: Tensor, z_std: Tensor, watch_collapse: bool) -> None:
        """Queue this step's values and check those the device has finished."""
        self.reads.push((step, watch_collapse), loss, z_std)
        self._check(self.reads.ready())

    def reset(self) -> None:
        """Forget an earlier fit: its failure (raised again at every check) and its queue."""
        self.reads.clear()
        self.failure, self.loss = None, None
        self.collapse.warned = False

    def flush(self) -> None:
        """Check every queued step, waiting for the device."""
        self._check(self.reads.drain())

    def _check(self, finished) -> None:
        for (step, watch_collapse), (loss, z_std) in finished:
            self.loss = torch.tensor(loss)
            if self.failure is None and not math.isfinite(loss):
                self.failure = (
                    f"train/loss is {loss} at step {step}: lower model.base_lr, raise "
                    f"model.temperature or warm up longer (model.warmup_epochs)"
                )
            if watch_collapse and self.failure is None:
                self.collapse.update(z_std, step)
        if self.failure is not None:
            raise FloatingPointError(self.failure)
