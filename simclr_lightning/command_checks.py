"""Checks of a command line before the Trainer is built or runs: trainer settings Lightning
takes and then fails on mid-run (a modulo by zero after the first step) or runs to nothing
with exit 0, and commands that would compute and keep nothing."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, EarlyStopping
from lightning.pytorch.utilities import rank_zero_warn

from simclr_lightning.errors import SettingError
from simclr_lightning.module import SimCLR


def _refuse(key: str, value: Any, allowed: str) -> None:
    raise SettingError(f"trainer.{key}={value!r} is invalid: {allowed}")


def check_trainer_settings(config: Mapping[str, Any], subcommand: str | None) -> None:
    """``check_val_every_n_epoch 0`` and ``val_check_interval 0`` crash with a traceback (at
    fit start, or after the first step, which no checkpoint keeps); a negative
    ``gradient_clip_val`` silently clips nothing and a negative ``log_every_n_steps`` logs
    every step; a fit of ``max_epochs 0``, ``max_steps 0`` or ``limit_train_batches 0``
    trained nothing and exited 0."""
    every = config.get("check_val_every_n_epoch")
    if every is not None and (isinstance(every, bool) or every < 1):
        _refuse("check_val_every_n_epoch", every, "must be >= 1, or null to validate by steps")
    interval = config.get("val_check_interval")
    if isinstance(interval, (int, float)) and not isinstance(interval, bool) and interval <= 0:
        _refuse(
            "val_check_interval",
            interval,
            "must be > 0: a fraction of an epoch (0.25) or a number of batches (1000)",
        )
    clip = config.get("gradient_clip_val")
    if clip is not None and clip < 0:
        _refuse("gradient_clip_val", clip, "must be >= 0 (0 or null: no clipping)")
    log_every = config.get("log_every_n_steps")
    if log_every is not None and log_every < 0:
        _refuse("log_every_n_steps", log_every, "must be >= 0 (0: never log)")
    if subcommand != "fit":
        return
    nothing = {"max_epochs": 0, "max_steps": 0, "limit_train_batches": 0}
    for key, none in nothing.items():
        value = config.get(key)
        if value is not None and not isinstance(value, bool) and value == none:
            _refuse(key, value, "a fit of it trains nothing: give a number above 0")


PREDICT_HOOKS = ("on_predict_batch_end", "on_predict_epoch_end", "on_predict_end")


def takes_predictions(callback: Any) -> bool:
    """A writer: Lightning's kind, or a user's callback or model with a predict hook of its
    own (not Lightning's other callbacks: a progress bar or ThroughputMonitor writes no rows)."""
    if isinstance(callback, BasePredictionWriter):
        return True
    base = L.LightningModule if isinstance(callback, L.LightningModule) else Callback
    own = any(getattr(type(callback), h) is not getattr(base, h) for h in PREDICT_HOOKS)
    return own and not type(callback).__module__.startswith("lightning.pytorch.callbacks")


def check_command(subcommand: str, model: Any, ckpt_path: Any, callbacks: list) -> None:
    """LightningCLI drops what ``trainer.predict`` returns: without a writer callback the
    command read every image, computed every row, kept none and exited 0. An
    ``EarlyStopping`` patience below 0 is taken by Lightning as 0. A SimCLR
    ``validate``/``test``/``predict`` without ``--ckpt_path`` runs a randomly initialised
    encoder: a baseline sometimes, a forgotten checkpoint more often."""
    if subcommand == "predict" and not any(map(takes_predictions, [model, *callbacks])):
        raise SettingError(
            "simclr-lightning predict keeps nothing without a writer callback: add "
            "--trainer.callbacks+=simclr_lightning.PredictionWriter --trainer.callbacks.output "
            "predictions.csv (a LinearEval checkpoint's classes), or "
            "simclr_lightning.FeatureWriter with output features.npz (a SimCLR checkpoint's "
            "encoder features)"
        )
    for callback in callbacks:  # Lightning takes any patience; below 0 it stops as 0 does
        if isinstance(callback, EarlyStopping) and callback.patience < 0:
            raise SettingError(
                f"trainer.callbacks (EarlyStopping): patience={callback.patience} is invalid: "
                f"must be >= 0, the checks with no improvement before it stops"
            )
    if isinstance(model, SimCLR) and subcommand != "fit" and not ckpt_path:
        rank_zero_warn(
            f"{subcommand} of a SimCLR model without --ckpt_path: its encoder is randomly "
            f"initialised (a baseline); give the pretrained checkpoint as --ckpt_path",
            category=UserWarning,
        )
