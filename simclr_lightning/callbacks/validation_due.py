"""When a monitor that costs a pass (kNN bank) or a picture (embedding plot) runs during
``fit``: at the end-of-epoch validation of every n-th epoch, and at the run's last validation,
so that a short run, or one bounded by ``max_steps`` or ``max_time``, still gets a figure."""

from __future__ import annotations

import lightning as L


def within_epoch(trainer: L.Trainer) -> bool:
    """Whether this fit validation comes before the epoch's last training batch
    (``val_check_interval`` < 1, or a number of steps)."""
    return not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch


def last_validation(trainer: L.Trainer) -> bool:
    """Whether the fit stops after this validation, as far as can be known here: the last
    epoch's end, ``max_steps`` reached, or a stop already asked for (``max_time``, a signal).
    A stop that a later callback decides (early stopping) is not known yet."""
    last_epoch = not within_epoch(trainer) and trainer.current_epoch + 1 == trainer.max_epochs
    steps_done = trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps
    return last_epoch or steps_done or trainer.should_stop


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
