"""Saves every rank's global random state in checkpoints and restores it on resume."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from simclr_lightning.resume import (
    gather_per_rank,
    global_rng_states,
    own_rank,
    set_global_rng_states,
)


class RNGState(Callback):
    """Python, numpy, torch and CUDA random states of every rank, in the checkpoint.

    They are restored just before the first training batch after a resume, not when the
    checkpoint is read: setting up the run (the model, loaders, the sanity check) draws
    numbers the interrupted run had drawn long before, and the state saved after step k is
    the one step k+1 started from. The ``simclr-lightning`` command adds it to every run.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "_trainer", None)
        states = global_rng_states()
        return {"ranks": gather_per_rank(trainer, states) if trainer is not None else [states]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self._pending is not None:
            set_global_rng_states(own_rank(self._pending["ranks"], trainer))
            self._pending = None
