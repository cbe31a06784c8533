"""Training speed in the progress bar: images per second, the figure a user compares across
machines, batch sizes and ``data.augment`` settings."""

from __future__ import annotations

import math
import time

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput
from torch import Tensor

from simclr_lightning.errors import require


def batch_images(batch) -> int:
    """Images in a training batch: the labels' length for ``(inputs, labels)`` (a SimCLR batch
    of N images holds 2N views and N labels), else the leading size of the first tensor."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], Tensor):
        return len(batch[1])
    while isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    return len(batch) if isinstance(batch, Tensor) else 0


class ImagesPerSecond(L.Callback):
    """Logs ``train/images_per_sec`` (shown as ``images/s`` in the progress bar): training
    images of all processes per second of training, a rolling mean over about the last
    ``window`` steps, built on Lightning's
    :class:`~lightning.fabric.utilities.throughput.Throughput`. Time spent in validation (and
    its monitors) is left out; each epoch starts a new window.

    The clock is read only every ``log_every_n_steps`` steps, after the device has finished
    the step: on a GPU that wait is a host sync, which every step would stall the queue the
    host keeps ahead of the GPU (and slow the run it measures).

    Args:
        window: steps in the rolling mean (>= 2), in whole multiples of
            ``log_every_n_steps``; nothing is shown before the first of them in an epoch.
        log_every_n_steps: how often the clock is read and the value updated.
    """

    def __init__(self, window: int = 20, log_every_n_steps: int = 10) -> None:
        require(window >= 2, "ImagesPerSecond.window", window, ">= 2")
        require(
            log_every_n_steps >= 1, "ImagesPerSecond.log_every_n_steps", log_every_n_steps, ">= 1"
        )
        self.window = window
        self.log_every_n_steps = log_every_n_steps
        self.value: float | None = None  # the last images/s computed
        self._window_epoch: int | None = None  # the epoch the current window measures

    def _now(self, pl_module: L.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start_window(trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # A run resumed mid-epoch (or from an epoch's last batch) gets no on_train_epoch_start
        # from Lightning: its window starts at its first batch.
        if self._window_epoch != trainer.current_epoch:
            self._start_window(trainer, pl_module)

    def _start_window(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._window_epoch = trainer.current_epoch
        readings = max(2, math.ceil(self.window / self.log_every_n_steps) + 1)
        self._throughput = Throughput(world_size=trainer.world_size, window_size=readings)
        self._images = 0
        self._batches = 0
        self._paused = 0.0
        self._start = self._now(pl_module)
        self._throughput.update(time=0.0, batches=0, samples=0)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._pause_start = self._now(pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if getattr(self, "_start", None) is not None and not trainer.sanity_checking:
            self._paused += self._now(pl_module) - self._pause_start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._images += batch_images(batch)
        self._batches += 1
        if self._batches % self.log_every_n_steps:
            return
        elapsed = self._now(pl_module) - self._start - self._paused
        self._throughput.update(time=elapsed, batches=self._batches, samples=self._images)
        rates = self._throughput.compute()  # rates once the window is full
        key = "samples_per_sec" if trainer.world_size > 1 else "device/samples_per_sec"
        if key not in rates:
            return
        self.value = float(rates[key])
        # Host tensors, not floats: Lightning makes a float a tensor on the module's device, a
        # blocking host-to-device copy; a CPU tensor stays on the CPU.
        rate = torch.tensor(self.value)
        pl_module.log("train/images_per_sec", rate, on_step=True, prog_bar=False)
        shown = torch.tensor(round(self.value, 1))
        pl_module.log("images/s", shown, on_step=True, prog_bar=True, logger=False)
