"""The one-weight model of tests/callbacks/test_preemption_leftovers.py, and its 2-process DDP
fit as a real process (Lightning starts rank 1):

    python -m tests.preemption_leftover_runs FOLDER AT   # rank 1 alone: SIGTERM in batch AT
    python -m tests.preemption_leftover_runs FOLDER      # resume from FOLDER/last.ckpt

Each rank appends ``<rank> <batches trained>`` to FOLDER/batches.txt when its fit ends or
stops; rank 0 saves the final weight as FOLDER/w.pt."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, TensorDataset

from simclr_lightning import Preemption
from tests.helpers import quiet_trainer

BATCHES = 5  # per epoch and process, 2 epochs
ACCUMULATE = 3  # steps after batches 3, 5 (the epoch's partial accumulation), 8, 10


class Weight(L.LightningModule):
    """One weight; every batch has the same gradient, so which batches a resumed epoch reads
    does not matter, and a lost (or repeated) batch's gradient shows in the weight. Process
    ``rank`` sends ``signum`` to itself in its ``at``-th training batch."""

    def __init__(self, at: int | None = None, signum: int = signal.SIGTERM, rank: int = 0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.at, self.signum, self.rank, self.batches = at, signum, rank, 0

    def training_step(self, batch, batch_idx):
        self.batches += 1
        if self.batches == self.at and self.global_rank == self.rank:
            os.kill(os.getpid(), self.signum)
        return (self.w * batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader(processes: int = 1) -> DataLoader:
    """``BATCHES`` batches of 2 an epoch in each of ``processes`` processes."""
    return DataLoader(TensorDataset(torch.ones(2 * BATCHES * processes, 1)), batch_size=2)


def ddp_fit(folder: Path, at: int | None) -> None:
    model = Weight(at=at, rank=1)
    trainer = quiet_trainer(
        devices=2,
        strategy="ddp",
        max_epochs=2,
        accumulate_grad_batches=ACCUMULATE,
        default_root_dir=folder,
        callbacks=[Preemption()],
    )
    resume = None if at else str(folder / "last.ckpt")
    try:
        trainer.fit(model, loader(processes=2), ckpt_path=resume)
    finally:
        with open(folder / "batches.txt", "a") as f:
            f.write(f"{trainer.global_rank} {model.batches}\n")
    if trainer.is_global_zero:
        torch.save(model.w.detach(), folder / "w.pt")


if __name__ == "__main__":
    try:
        ddp_fit(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else None)
    except SIGTERMException:
        sys.exit(143)
