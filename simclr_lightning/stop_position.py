"""Where a fit that stopped inside an epoch stands, as a checkpoint must say it.

A fit bounded by ``trainer.max_steps`` or ``trainer.max_time`` (a SLURM job's budget), or
stopped by ``trainer.should_stop``, leaves its epoch after the batch it stopped at, and
Lightning then runs the epoch's end: the ``ModelCheckpoint`` saves there (at the epoch's end
or, with ``save_last``, at the fit's end) record the epoch as done, or half done. A resume
with a longer budget then began the next epoch, leaving the rest of this one out (or, from
an epoch-end save, counted this epoch while the loader served the next one's order). Such a
checkpoint is written as the one saved after that last batch would be: the same epoch, its
batches trained so far."""

from __future__ import annotations

from typing import Any

import lightning as L


def stopped_inside_epoch(trainer: L.Trainer) -> bool:
    """Whether the fit has left its epoch before the epoch's last batch (and after its first)."""
    fit = trainer.fit_loop
    progress = fit.epoch_loop.batch_progress  # is_last_batch: a loader without a length too
    inside = 0 < progress.current.processed < trainer.num_training_batches
    epochs = fit.epoch_progress.current
    return inside and not progress.is_last_batch and epochs.processed == epochs.started


def epoch_in_progress(trainer: L.Trainer) -> int:
    """The epoch the fit's last batches are of: Lightning's current epoch moves on to the next
    once it counts an epoch done (-1 before the first)."""
    return trainer.fit_loop.epoch_progress.current.started - 1


def save_as_inside_epoch(trainer: L.Trainer, checkpoint: dict[str, Any]) -> None:
    """Rewrite ``checkpoint``'s loop state, when the fit :func:`stopped_inside_epoch`, into the
    state a checkpoint saved after its last batch (``on_train_batch_end``) holds: the epoch
    started and not processed, the last batch processed and not completed, that batch not
    yet counted in the logging steps. Lightning resumes such a checkpoint at the next batch
    of the same epoch. Call from ``on_save_checkpoint``."""
    loop = (checkpoint.get("loops") or {}).get("fit_loop")
    if loop is None or not stopped_inside_epoch(trainer):
        return
    for scope in ("current", "total"):
        epochs = loop["epoch_progress"][scope]
        epochs["processed"] = epochs["completed"] = epochs["started"] - 1
        batches = loop["epoch_loop.batch_progress"][scope]
        batches["completed"] = batches["processed"] - 1
    loop["epoch_loop.batch_progress"]["is_last_batch"] = False
    stepped = loop["epoch_loop.state_dict"]
    stepped["_batches_that_stepped"] = max(0, stepped["_batches_that_stepped"] - 1)
    checkpoint["epoch"] = epoch_in_progress(trainer)
