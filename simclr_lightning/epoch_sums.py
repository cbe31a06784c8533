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

    def add(self, epoch: int, values: Tensor) -> None:
        if self.epoch is None:  # the epoch trained next is the one the checkpoint was in
            self.epoch = epoch
        elif self.epoch != epoch:
            self.sums, self.epoch = torch.zeros_like(values), epoch
        self.sums = self.sums.to(values.device) + values

    def of(self, epoch: int) -> Tensor | None:
        """The sums of ``epoch``; None when none of its steps ran in this fit or before it."""
        return self.sums if self.epoch == epoch else None

    def reset(self) -> None:
        """A later fit counts its epochs afresh."""
        self.epoch = -1

    def state_dict(self) -> dict[str, Any]:
        return {"train_sums": self.sums.cpu(), "train_sums_epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "train_sums" in state:
            self.sums = state["train_sums"].float().clone()
            self.epoch = state.get("train_sums_epoch")
