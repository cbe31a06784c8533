"""A training epoch's running sums (loss, hits, rows) that survive a resume from any step."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class EpochSums:
    """Sums added at every step, kept on the device and read once at the epoch's end, tagged
    with the number of the epoch they belong to. A new epoch is told by that number, not by
    ``on_train_epoch_start``, which Lightning skips after a resume from an epoch's last batch;
    and the sums go into checkpoints, so that a mid-epoch resume reports the whole epoch, not
    the part after the resume."""

    def __init__(self, size: int) -> None:
        self.sums = torch.zeros(size)
        self.epoch: int | None = -1  # None: from a checkpoint that did not record it
        self.loaded = False  # from the checkpoint this fit resumes

    def add(self, epoch: int, values: Tensor) -> None:
        if self.epoch is None:  # the epoch trained next is the one the checkpoint was in
            self.epoch = epoch
        elif self.epoch != epoch:
            self.sums, self.epoch = torch.zeros_like(values), epoch
        self.sums = self.sums.to(values.device) + values

    def of(self, epoch: int) -> Tensor | None:
        """The sums of ``epoch``; None when none of its steps ran in this fit or before it."""
        return self.sums if self.epoch == epoch else None

    def start_fit(self) -> None:
        """At a fit's start: one not resumed from a checkpoint counts its epochs afresh. Not
        at the previous fit's end: a checkpoint saved after it (``ModelCheckpoint``'s at the
        fit's end, ``trainer.save_checkpoint``) would hold no sums of its last epoch."""
        if not self.loaded:
            self.epoch = -1
        self.loaded = False

    def state_dict(self) -> dict[str, Any]:
        return {"train_sums": self.sums.cpu(), "train_sums_epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "train_sums" in state:
            self.sums = state["train_sums"].float().clone()
            self.epoch = state.get("train_sums_epoch")
            self.loaded = True


class ResumedEpochMean:
    """``module.log(name, value, on_step=True, on_epoch=True)`` whose epoch figure covers the
    whole epoch after a resume from its middle. Lightning keeps its running mean out of
    checkpoints, so a resumed epoch's figure (``<name>_epoch``, what a ``ModelCheckpoint`` or
    ``EarlyStopping`` on it sees after a requeue) averaged only the batches after the resume.
    Here the epoch's weighted sum goes into checkpoints, and the first step after a resume
    logs its mean once more, weighted by the images it stands for (Lightning's mean is
    weighted by batch size), before the step's own value. One device add a step: the image
    count is the host's."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.epoch: int | None = -1
        self.total: Tensor | float = 0.0  # value x images, this epoch
        self.images = 0
        self._resumed = False

    def log(self, module: Any, value: Tensor, batch_size: int) -> None:
        epoch = module.current_epoch
        if self._resumed and self.epoch == epoch and self.images:
            mean = float(self.total) / self.images  # a host value from the checkpoint
            module.log(self.name, mean, on_step=True, on_epoch=True, batch_size=self.images)
        self._resumed = False
        module.log(self.name, value, on_step=True, on_epoch=True, batch_size=batch_size)
        if epoch != self.epoch:
            self.epoch, self.total, self.images = epoch, 0.0, 0
        self.total = self.total + value.detach().float() * batch_size
        self.images += batch_size

    def start(self) -> None:
        """A fit starts: an earlier fit's sums are not this one's (a checkpoint's are)."""
        if not self._resumed:
            self.epoch = -1

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "total": float(self.total), "images": self.images}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.total, self.images = state["epoch"], state["total"], state["images"]
        self._resumed = True
