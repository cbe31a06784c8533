"""A callback the preemption tests put into real CLI runs: it appends each finished step to a
file (so a test knows when to send its signal) and slows steps down (so the signal lands
while training)."""

from __future__ import annotations

import time

import lightning as L


class StepLog(L.Callback):
    def __init__(self, path: str, delay: float = 0.1) -> None:
        self.path = path
        self.delay = delay

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_step}\n")
        time.sleep(self.delay)
