"""Saves every rank's global random state in checkpoints and restores it on resume."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from simclr_lightning.data.loaders import training_position
from simclr_lightning.resume import (
    gather_per_rank,
    global_rng_states,
    own_rank,
    set_global_rng_states,
)


class RNGState(Callback):
    """Python, numpy, torch and CUDA random states of every rank, in the checkpoint.

    They are restored where the interrupted run stood when it saved them, not when the
    checkpoint is read (setting up the run draws numbers the interrupted run had drawn long
    before):

    - from a mid-epoch checkpoint, just before the first training batch: the state saved
      after step k is the one step k+1 started from;
    - from an end-of-epoch checkpoint, when ``fit`` starts: the uninterrupted run went on to
      create the next epoch's loader iterator, which draws from the global generator (a
      ``DataLoader`` without ``generator=`` takes its workers' base seed there, a shuffling
      one its order), and a resumed run creates that iterator before its first batch. The
      sanity check in between runs in Lightning's ``isolate_rng``.

    The ``simclr-lightning`` command adds it to every run.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "_trainer", None)
        states = global_rng_states()
        if trainer is None:
            return {"ranks": [states]}
        _, batches = training_position(trainer)
        return {"ranks": gather_per_rank(trainer, states), "epoch_end": batches == 0}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is not None and self._pending.get("epoch_end", False):
            self._restore(trainer)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self._pending is not None:  # mid-epoch (or a checkpoint older than "epoch_end")
            self._restore(trainer)

    def _restore(self, trainer: L.Trainer) -> None:
        assert self._pending is not None
        states = own_rank(self._pending["ranks"], trainer)
        if states is not None:  # else a rank the saving run had not: its own seeded state
            set_global_rng_states(states)
        self._pending = None
