"""When a monitor that costs a pass (kNN bank) or a picture (embedding plot) runs during
``fit``: at the end-of-epoch validation of every n-th epoch, and at the run's last validation,
so that a short run, or one bounded by ``max_steps`` or ``max_time``, still gets a figure."""

from __future__ import annotations

import math

import lightning as L


def within_epoch(trainer: L.Trainer) -> bool:
    """Whether this fit validation comes before the epoch's last training batch
    (``val_check_interval`` < 1, or a number of steps)."""
    return not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch


def batches_to_next_validation(trainer: L.Trainer) -> float | None:
    """Training batches from this fit validation to the next one by Lightning's schedule
    (``inf``: none within ``max_epochs``; None: not known, for validation by time or a
    training loader without a length)."""
    per_epoch, every = trainer.num_training_batches, trainer.val_check_batch
    if every is None or math.isinf(per_epoch):
        return None
    done = trainer.fit_loop.epoch_loop.batch_idx + 1  # batches of this epoch trained
    epoch, max_epochs = trainer.current_epoch, trainer.max_epochs
    k = trainer.check_val_every_n_epoch
    if k is None:  # counted in batches across epochs
        if max_epochs in (None, -1):
            return every
        left = (max_epochs - epoch - 1) * per_epoch + per_epoch - done
        return every if every <= left else math.inf
    if within_epoch(trainer):  # the next check of this epoch, or its end
        return min(every, per_epoch - done)
    next_epoch = (epoch + 1) // k * k + k - 1  # the next epoch that validates
    if max_epochs not in (None, -1) and next_epoch >= max_epochs:
        return math.inf
    return (next_epoch - epoch - 1) * per_epoch + min(every, per_epoch)


def last_validation(trainer: L.Trainer) -> bool:
    """Whether the fit stops before its next validation, as far as can be known here: no
    validation left within ``max_epochs``, ``max_steps`` reached before it, or a stop already
    asked for that Lightning will honour (``max_time``, a signal; early stopping before
    ``min_epochs`` is not). A stop that a later callback decides (early stopping) is not known
    yet."""
    can_stop = getattr(trainer.fit_loop, "_can_stop_early", True)
    if trainer.should_stop and can_stop:
        return True
    batches = batches_to_next_validation(trainer)
    if batches is None:
        return False
    if math.isinf(batches):
        return True
    if trainer.max_steps == -1:
        return False
    steps = math.ceil(batches / max(1, trainer.accumulate_grad_batches))
    return trainer.global_step + steps > trainer.max_steps


def validation_due(trainer: L.Trainer, every_n_epochs: int) -> bool:
    """Whether this validation is one of the monitor's: outside fit (``validate``) always; in
    fit at the end of every ``every_n_epochs``-th epoch (once an epoch: not at validations
    inside it, unless validation is counted in steps across epochs,
    ``check_val_every_n_epoch=None``), and at the run's last validation."""
    if trainer.sanity_checking:
        return False
    if trainer.state.fn != "fit":
        return True
    if last_validation(trainer):
        return True
    if within_epoch(trainer) and trainer.check_val_every_n_epoch is not None:
        return False
    return (trainer.current_epoch + 1) % every_n_epochs == 0
