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

Found = tuple[str, str]  # (what the callback does that misses the measurement, the fix)


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
            found = _early_stopping_problem(trainer, callback, every_n_epochs, owner)
        elif isinstance(callback, ModelCheckpoint):
            found = _checkpoint_problem(trainer, callback, every_n_epochs, owner)
        else:
            continue
        if found is None:
            continue
        problem, fix = found
        name = f"{type(callback).__name__}(monitor={monitor!r})"
        raise SettingError(
            f"{name} {problem}, but {owner} logs {monitor} only at the end of "
            f"{_epochs(every_n_epochs)} ({owner}.every_n_epochs={every_n_epochs}): it would "
            f"fail where {monitor} is missing, or read its last value again as if measured. "
            f"{fix}"
        )


def _epochs(n: int) -> str:
    return "each epoch" if n == 1 else f"every {n} epochs"


INSIDE = "Validate once an epoch (trainer.val_check_interval=1.0), or monitor another metric"


def _inside_epochs(trainer: L.Trainer, n: int, owner: str, does: str) -> Found | None:
    """Why validations inside epochs would miss the measurement, or None (none there)."""
    if trainer.check_val_every_n_epoch is None:  # by steps: measured at every one, if due
        if n == 1:
            return None
        fix = f"Set {owner}.every_n_epochs=1 (measured at every validation)"
        return f"{does} at validations counted in steps (every epoch's)", fix
    if trainer.val_check_interval != 1.0:  # measured only at the epoch-end one
        return f"{does} at validations inside epochs (trainer.val_check_interval)", INSIDE
    return None


def _early_stopping_problem(
    trainer: L.Trainer, stop: EarlyStopping, n: int, owner: str
) -> Found | None:
    every = trainer.check_val_every_n_epoch
    fix = (
        f"Set {owner}.every_n_epochs=1 and trainer.check_val_every_n_epoch={n} (the "
        f"measurement at every validation, every {n} epochs), or monitor a metric of every epoch"
    )
    on_train_end = getattr(stop, "_check_on_train_epoch_end", None)  # None: Lightning's rule
    if on_train_end is None:
        on_train_end = trainer.val_check_interval == 1.0 and every == 1
    if on_train_end:
        return None if n == 1 and every == 1 else ("checks at every epoch's end", fix)
    inside = _inside_epochs(trainer, n, owner, "checks")
    if inside is not None or every is None:
        return inside
    if every % n == 0:
        return None
    return f"checks at every validation ({_epochs(every)}: trainer.check_val_every_n_epoch)", fix


def _checkpoint_problem(
    trainer: L.Trainer, checkpoint: ModelCheckpoint, n: int, owner: str
) -> Found | None:
    fix = f"Give the checkpoint every_n_epochs={n} (or a multiple), or set {owner}.every_n_epochs=1"
    if getattr(checkpoint, "_every_n_train_steps", 0) or getattr(
        checkpoint, "_train_time_interval", None
    ):
        return (
            "saves by steps or time (every_n_train_steps, train_time_interval)",
            "Save by epochs (every_n_epochs) for this metric, or monitor another metric",
        )
    m = getattr(checkpoint, "_every_n_epochs", 1)
    if m < 1:
        return None  # saves no top-k checkpoint: never compares the metric
    every = trainer.check_val_every_n_epoch
    if getattr(checkpoint, "_save_on_train_epoch_end", None):  # at epochs' ends only
        if every is None:
            return (
                "saves at epochs' ends, which validations counted in steps may not reach",
                "Save at validations (the checkpoint's save_on_train_epoch_end: false)",
            )
        aligned = m % math.lcm(every, n) == 0  # the end-of-epoch validation measured
        return None if aligned else (f"saves at the end of {_epochs(m)}", fix)
    inside = _inside_epochs(trainer, n, owner, "saves")
    if inside is not None:
        return inside
    if every is None:
        return None  # n == 1: every validation measured
    saved_at = math.lcm(every, m)  # at validations: those of every lcm(every, m) epochs
    if saved_at % n == 0:
        return None
    why = [f"trainer.check_val_every_n_epoch={every}"] if every > 1 else []
    why += [f"every_n_epochs={m}"] if m > 1 else []
    because = f" ({', '.join(why)})" if why else ""
    return f"saves at the end of {_epochs(saved_at)}{because}", fix
