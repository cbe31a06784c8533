"""The learning-rate schedule of pretraining and linear evaluation: linear warm-up then cosine,
stepped per optimizer step, planned from the Trainer's run length and carried over when a run
resumes with another number of steps per epoch (another world size: another global batch)."""

from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateFinder
from lightning.pytorch.utilities import rank_zero_info

from simclr_lightning.data.loaders import align_resumed_epoch
from simclr_lightning.errors import SettingError, require
from simclr_lightning.run_checks import check_warmup


def warmup_cosine(
    step: int, warmup_steps: int, total_steps: int, final_ratio: float = 0.0
) -> float:
    """Multiplier of the peak learning rate at optimizer ``step``: linear warm-up from
    1/warmup_steps to 1, then cosine decay to ``final_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def carried_step(
    step: int,
    old_per_epoch: int,
    new_per_epoch: int,
    loader_resumes: bool,
    resumed_at: int | None = None,
) -> int:
    """``step`` of a run of ``old_per_epoch`` steps an epoch as the same point of a run of
    ``new_per_epoch``, where a resumed Lightning loop goes on: the epochs done, then the
    batches of the current one (``resumed_at``, when :func:`align_resumed_epoch` has counted
    them in this run's batches). A checkpoint past the new epoch's end (``batches >=
    new_per_epoch``) restarts that epoch: a loader that ``loader_resumes`` (this library's,
    with ``state_dict``) then has no batch left of it, a plain loader serves it again whole."""
    if not (old_per_epoch and new_per_epoch):
        return step  # one of them unknown (a loader without a length)
    epochs, batches = divmod(step, old_per_epoch)
    if resumed_at is not None:  # also at an equal count: an integer limit_train_batches
        batches = resumed_at
    elif old_per_epoch == new_per_epoch:
        return step
    elif batches >= new_per_epoch and not loader_resumes:
        batches = 0
    return epochs * new_per_epoch + min(batches, new_per_epoch)


def loader_resumes(trainer: L.Trainer) -> bool:
    """Whether the training loaders go on mid-epoch from a checkpoint, as Lightning decides:
    each has ``state_dict`` and ``load_state_dict``."""
    loaders = trainer.train_dataloader
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    elif not isinstance(loaders, (list, tuple)):
        loaders = [loaders]
    return all(
        callable(getattr(x, "state_dict", None)) and callable(getattr(x, "load_state_dict", None))
        for x in loaders
    )


class WarmupCosine:
    """:func:`warmup_cosine` as ``LambdaLR``'s multiplier, with the run's geometry.

    An object, not a lambda: ``LambdaLR`` saves its attributes in the checkpoint, so a resumed
    run knows the steps per epoch and the peak rate its step count was made with, and
    :meth:`carry_over` can map it onto a run that makes other steps per epoch with another
    peak rate (another world size: another global batch)."""

    def __init__(
        self,
        warmup_steps: int,
        total_steps: int,
        final_ratio: float,
        steps_per_epoch: int,
        peak_lr: float,
        epoch_bound: bool,
        base_lrs: list[float] | None = None,
    ) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.final_ratio = final_ratio
        self.steps_per_epoch = steps_per_epoch  # 0: a loader without a length
        self.peak_lr = peak_lr
        self.epoch_bound = epoch_bound  # the run ends after max_epochs, not max_steps
        self.base_lrs = base_lrs  # each parameter group's peak rate

    def __call__(self, step: int) -> float:
        return warmup_cosine(step, self.warmup_steps, self.total_steps, self.final_ratio)

    def carry_over(
        self,
        schedule: torch.optim.lr_scheduler.LambdaLR,
        planned: dict,
        loader_resumes: bool,
        resumed_at: int | None = None,
    ) -> dict | None:
        """After a resume has loaded the checkpoint's geometry into this multiplier, switch
        ``schedule`` to the ``planned`` geometry of this run (``vars()`` of the multiplier
        ``configure_optimizers`` made): the same epoch and batch of it (the same step when
        ``max_steps`` ends the run; :func:`carried_step`), at this run's peak rate of each
        parameter group (``base_lrs``, which :func:`step_schedule` sets). The checkpoint's
        geometry it replaced, or None when nothing changed."""
        saved = dict(vars(self))
        if saved == planned:
            return None
        step = schedule.last_epoch
        if planned["epoch_bound"]:
            old_spe, new_spe = saved["steps_per_epoch"], planned["steps_per_epoch"]
            step = carried_step(step, old_spe, new_spe, loader_resumes, resumed_at)
        vars(self).update(planned)
        schedule.base_lrs = list(planned["base_lrs"])
        schedule.last_epoch = step
        for group, base in zip(schedule.optimizer.param_groups, schedule.base_lrs, strict=True):
            group["initial_lr"] = base
            group["lr"] = base * self(step)
        schedule._last_lr = [group["lr"] for group in schedule.optimizer.param_groups]
        return saved


def schedule_steps(trainer: L.Trainer, who: str) -> int:
    """The optimizer steps a cosine schedule spans: Lightning's estimate of the whole run,
    refused when the run has no end (``max_epochs=-1`` and ``max_steps=-1``, or a loader
    without a length and no ``max_steps``) instead of failing on ``int(inf)``."""
    total = trainer.estimated_stepping_batches
    if math.isinf(total):
        raise SettingError(
            f"{who}'s cosine schedule needs a run of known length, but trainer.max_epochs="
            f"{trainer.max_epochs} and trainer.max_steps={trainer.max_steps} give none: set "
            "trainer.max_steps, or trainer.max_epochs with a training loader that has a length"
        )
    return max(1, int(total))


def training_batches(trainer: L.Trainer) -> float:
    """Training batches per epoch (inf for a loader without a length). Lightning loads the
    train loader lazily, and ``estimated_stepping_batches`` does not when only ``max_steps``
    bounds the run: load it here the way that property does."""
    if trainer.train_dataloader is None:
        trainer.fit_loop.setup_data()
    return trainer.num_training_batches


def global_batch_size(trainer: L.Trainer, per_device: int | None = None) -> int:
    """Images per optimizer step over all processes (devices x nodes, times the accumulated
    batches): what a learning-rate rule scales by. ``per_device`` None reads the data
    module's, else the train loader's."""
    if per_device is None:
        per_device = getattr(trainer.datamodule, "batch_size", None)
    if per_device is None:
        training_batches(trainer)  # loads the loader, which Lightning does lazily
        per_device = getattr(trainer.train_dataloader, "batch_size", None)
    if per_device is None:
        raise SettingError(
            "cannot tell the per-device batch size model.lr_scaling scales by: use a data "
            "module or DataLoader with a batch_size (SimCLR: or set model.batch_size)"
        )
    return per_device * trainer.world_size * trainer.accumulate_grad_batches


def epoch_steps(trainer: L.Trainer) -> int:
    """Optimizer steps an epoch, as Lightning counts them (an epoch's last, partial
    accumulation steps too); 0 for a training loader without a length."""
    batches = training_batches(trainer)
    if math.isinf(batches):
        return 0
    return max(1, math.ceil(batches / trainer.accumulate_grad_batches))


def plan_schedule(
    trainer: L.Trainer,
    who: str,
    peak_lr: float,
    warmup_epochs: float = 0.0,
    final_ratio: float = 0.0,
) -> WarmupCosine:
    """The multiplier of this run: warm-up in epochs of its loader, cosine to its end."""
    total_steps = schedule_steps(trainer, who)
    batches = training_batches(trainer)
    if math.isinf(batches):  # a loader without a length: Lightning cannot tell an epoch
        require(
            warmup_epochs == 0,
            "model.warmup_epochs",
            warmup_epochs,
            "0 with a training loader that has no length (an IterableDataset), or set "
            "trainer.limit_train_batches to the batches of one epoch",
        )
        steps_per_epoch = 0
    else:
        steps_per_epoch = epoch_steps(trainer)
        check_warmup(trainer, warmup_epochs, steps_per_epoch, total_steps)
    return WarmupCosine(
        warmup_steps=round(warmup_epochs * steps_per_epoch),
        total_steps=total_steps,
        final_ratio=final_ratio,
        steps_per_epoch=steps_per_epoch,
        peak_lr=peak_lr,
        epoch_bound=total_steps != trainer.max_steps,
    )


def step_schedule(
    module: L.LightningModule,
    optimizer: torch.optim.Optimizer,
    who: str,
    peak_lr: float,
    warmup_epochs: float = 0.0,
    final_ratio: float = 0.0,
) -> dict:
    """``configure_optimizers``' ``lr_scheduler``: :func:`plan_schedule`'s multiplier, stepped
    every optimizer step. The plan is kept on ``module`` for :func:`carry_schedule_over`: a
    resume loads the checkpoint's geometry into the multiplier."""
    multiplier = plan_schedule(module.trainer, who, peak_lr, warmup_epochs, final_ratio)
    multiplier.base_lrs = [group["lr"] for group in optimizer.param_groups]
    module._planned_schedule = dict(vars(multiplier))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
    return {"scheduler": schedule, "interval": "step", "frequency": 1}


def carry_schedule_over(module: L.LightningModule) -> None:
    """A checkpoint resumed with another global batch (another world size) or length:
    Lightning has restored the schedule's peak rate and step count, made for the old run.
    Go on at the same epoch of the schedule :func:`step_schedule` planned for this run, at
    this run's peak rate; in the middle of an epoch, after this run's batches of the images
    trained on (:func:`align_resumed_epoch`, which moves Lightning's count of them too).
    Call in ``on_train_start``."""
    resumed_at = align_resumed_epoch(module.trainer)  # batches; the schedule counts steps
    if resumed_at is not None:
        resumed_at //= module.trainer.accumulate_grad_batches
    schedule = module.lr_schedulers()
    multiplier = getattr(schedule, "lr_lambdas", [None])[0]
    planned = getattr(module, "_planned_schedule", None)
    if not isinstance(multiplier, WarmupCosine) or planned is None:
        return
    saved = multiplier.carry_over(schedule, planned, loader_resumes(module.trainer), resumed_at)
    if saved is not None:
        rank_zero_info(
            f"resumed schedule: {saved['steps_per_epoch']} -> {planned['steps_per_epoch']} "
            f"steps per epoch, peak learning rate {saved['peak_lr']:.4g} -> "
            f"{planned['peak_lr']:.4g}; continuing at step {schedule.last_epoch} of "
            f"{planned['total_steps']}"
        )


def replan_if_tuned(module: L.LightningModule, peak_lr: float, who: str) -> None:
    """Plan the optimizer and schedule again when the run's global batch or peak rate
    (``peak_lr``, as it stands now) is no longer the one ``configure_optimizers`` planned them
    for: Lightning's ``BatchSizeFinder`` and ``LearningRateFinder`` callbacks change them
    after it, and the run would otherwise train with the old peak rate and an epoch of the
    old length (a cosine that reached 0 a quarter into the run). Only before the first step
    (the tuners restore the step-0 state they saved): a run resumed later carries its plan
    over (:func:`carry_schedule_over`) with its optimizer's state. Call in
    ``on_train_start``."""
    trainer = module.trainer
    if trainer.global_step > 0:
        return
    schedule = module.lr_schedulers()
    live = getattr(schedule, "lr_lambdas", [None])[0]
    if not isinstance(live, WarmupCosine):
        return  # a tuner's own schedule (the learning-rate finder's sweep)
    per_epoch = epoch_steps(trainer)
    same = (
        per_epoch == live.steps_per_epoch
        and schedule_steps(trainer, who) == live.total_steps
        and math.isclose(peak_lr, live.peak_lr, rel_tol=1e-9)
    )
    if same:
        return
    trainer.strategy.setup_optimizers(trainer)
    rank_zero_info(
        f"{who}: the batch or learning rate changed after the optimizer was planned (a tuner "
        f"callback): planned again for {per_epoch} steps per epoch at a peak learning rate of "
        f"{peak_lr:.4g} (it was {live.steps_per_epoch} at {live.peak_lr:.4g})"
    )


def check_rate_finder(trainer: L.Trainer, lr_scaling: str, who: str) -> None:
    """Refuse Lightning's learning-rate finder on a module whose ``model.lr`` a rule scales:
    the finder writes the rate it found there, which the rule would scale a second time (a
    rate B/256 times the suggestion). Call in ``setup``."""
    finder = any(isinstance(c, LearningRateFinder) for c in trainer.callbacks)
    if finder and lr_scaling != "none":
        raise SettingError(
            f"{who}: Lightning's learning-rate finder sets model.lr to the rate it found, which "
            f"model.lr_scaling={lr_scaling} would scale again for the global batch: set "
            f"model.lr_scaling=none to tune model.lr with it"
        )
