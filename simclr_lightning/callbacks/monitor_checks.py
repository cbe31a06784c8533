"""Refuse, before the first epoch, an ``EarlyStopping`` or ``ModelCheckpoint`` that watches a
metric logged only every n epochs (the kNN monitor's) at epochs where it is not measured.

Lightning keeps the last value of a metric in ``callback_metrics``: before the first
measurement such a callback stops the run with Lightning's own error at the end of the first
epoch (``EarlyStopping`` with ``strict``, ``ModelCheckpoint`` once a validation has run), and
after it the callback reads the same value again, epoch after epoch. An ``EarlyStopping``
with ``patience=3`` over a kNN of every 5 epochs would stop the run 3 epochs after the first
measurement, for a lack of improvement that nobody measured."""

from __future__ import annotations

import math
from collections.abc import Iterable

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from simclr_lightning.errors import SettingError


def check_monitors(trainer: L.Trainer, keys: Iterable[str], every_n_epochs: int, owner: str):
    """Raise a :class:`SettingError` for the first callback of ``trainer`` that monitors one of
    ``keys`` (logged by ``owner`` at the end-of-epoch validation of every ``every_n_epochs``-th
    epoch) and would read it at an epoch without that validation."""
    keys = set(keys)
    for callback in trainer.callbacks:
        monitor = getattr(callback, "monitor", None)
        if monitor not in keys:
            continue
        if isinstance(callback, EarlyStopping):
            problem = _early_stopping_problem(trainer, callback, every_n_epochs)
        elif isinstance(callback, ModelCheckpoint):
            problem = _checkpoint_problem(trainer, callback, every_n_epochs)
        else:
            continue
        if problem is None:
            continue
        name = f"{type(callback).__name__}(monitor={monitor!r})"
        raise SettingError(
            f"{name} {problem}, but {owner} logs {monitor} only at the end of "
            f"{_epochs(every_n_epochs)} ({owner}.every_n_epochs={every_n_epochs}): it would "
            f"fail where {monitor} is missing, or read its last value again as if measured. "
            f"{_fix(callback, every_n_epochs, owner, problem)}"
        )


def _epochs(n: int) -> str:
    return "each epoch" if n == 1 else f"every {n} epochs"


def _inside_epochs(trainer: L.Trainer, n: int) -> str | None:
    """Why validations inside epochs would miss the measurement, or None (none there)."""
    if trainer.check_val_every_n_epoch is None:  # by steps: measured at every one, if due
        return None if n == 1 else "checks at validations counted in steps (every epoch's)"
    if trainer.val_check_interval != 1.0:  # measured only at the epoch-end one
        return "checks at validations inside epochs (trainer.val_check_interval)"
    return None


def _early_stopping_problem(trainer: L.Trainer, stop: EarlyStopping, n: int) -> str | None:
    every = trainer.check_val_every_n_epoch
    on_train_end = getattr(stop, "_check_on_train_epoch_end", None)  # None: Lightning's rule
    if on_train_end is None:
        on_train_end = trainer.val_check_interval == 1.0 and every == 1
    if on_train_end:
        return None if n == 1 and every == 1 else "checks at every epoch's end"
    inside = _inside_epochs(trainer, n)
    if inside is not None or every is None:
        return inside
    return None if every % n == 0 else f"checks at every validation ({_epochs(every)})"


def _checkpoint_problem(trainer: L.Trainer, checkpoint: ModelCheckpoint, n: int) -> str | None:
    if getattr(checkpoint, "_every_n_train_steps", 0) or getattr(
        checkpoint, "_train_time_interval", None
    ):
        return "saves by steps or time (every_n_train_steps, train_time_interval)"
    m = getattr(checkpoint, "_every_n_epochs", 1)
    if m < 1:
        return None  # saves no top-k checkpoint: never compares the metric
    every = trainer.check_val_every_n_epoch
    if getattr(checkpoint, "_save_on_train_epoch_end", None):  # at epochs' ends only
        if every is None:
            return "saves at epochs' ends, which validations counted in steps may not reach"
        aligned = m % math.lcm(every, n) == 0  # the end-of-epoch validation measured
        return None if aligned else f"saves at the end of {_epochs(m)}"
    inside = _inside_epochs(trainer, n)
    if inside is not None:
        return inside.replace("checks", "saves")
    if every is None:
        return None  # n == 1: every validation measured
    saved_at = math.lcm(every, m)  # at validations: those of every lcm(every, m) epochs
    return None if saved_at % n == 0 else f"saves at the end of {_epochs(saved_at)}"


def _fix(callback: L.Callback, n: int, owner: str, problem: str) -> str:
    if "inside epochs" in problem:
        return "Validate once an epoch (trainer.val_check_interval=1.0), or monitor another metric"
    if "validations counted in steps may not" in problem:
        return "Save at validations (the checkpoint's save_on_train_epoch_end: false)"
    if "counted in steps" in problem:
        return f"Set {owner}.every_n_epochs=1 (measured at every validation)"
    if "by steps or time" in problem:
        return "Save by epochs (every_n_epochs) for this metric, or monitor another metric"
    if isinstance(callback, ModelCheckpoint):
        return (
            f"Give the checkpoint every_n_epochs={n} (or a multiple), or set "
            f"{owner}.every_n_epochs=1"
        )
    return (
        f"Set {owner}.every_n_epochs=1 and trainer.check_val_every_n_epoch={n} (the "
        f"measurement at every validation, every {n} epochs), or monitor a metric of every epoch"
    )
