"""A 2-epoch fit with Preemption and the kNN monitor, whose bank dataset sends SIGTERM to one
rank (``--rank``, at item ``--at``), saving what each rank did: the bank items it read, the
step it stopped after, whether a kNN figure was logged, and the calls of
``torch.distributed.broadcast`` (Lightning's per-step broadcast of its SIGTERM flag) counted
at the start of training and after each step.

Run as a script (Lightning's "ddp" strategy relaunches it once per extra device).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.utilities.exceptions import SIGTERMException  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from simclr_lightning import KNNMonitor, Preemption  # noqa: E402
from tests.ddp_helpers import ddp_trainer  # noqa: E402
from tests.helpers import FeatureData, FeatureModule, SignalAt  # noqa: E402

BANK, BATCH = 40, 4  # per rank: 5 training steps an epoch, 5 bank batches


class Data(FeatureData):
    def __init__(self, rank: int, at: int) -> None:
        gen = torch.Generator().manual_seed(2)
        x, y = torch.randn(BANK, 6, generator=gen), torch.randint(0, 3, (BANK,), generator=gen)
        super().__init__((x, y), (x[:8], y[:8]), batch_size=BATCH)
        self.bank = SignalAt(x, y, at=None, signum=signal.SIGTERM)
        self.rank, self.at = rank, at

    def setup(self, stage: str) -> None:
        if self.trainer.global_rank == self.rank:  # this process alone is signalled
            self.bank.at = self.at

    def eval_train_dataloader(self):
        return DataLoader(self.bank, batch_size=BATCH)


class Broadcasts(L.Callback):
    """``torch.distributed.broadcast``'s calls so far, at the start and after each step."""

    def __init__(self) -> None:
        self.calls, self.counts = 0, []
        plain = torch.distributed.broadcast

        def counting(*args, **kwargs):
            self.calls += 1
            return plain(*args, **kwargs)

        torch.distributed.broadcast = counting

    def on_train_start(self, trainer, pl_module):
        self.counts.append(self.calls)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.counts.append(self.calls)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rank", type=int, required=True, help="the rank that is signalled")
    parser.add_argument("--at", type=int, required=True, help="at this bank item")
    args = parser.parse_args()

    broadcasts = Broadcasts()
    callbacks = [KNNMonitor(k=5), Preemption(), broadcasts]
    trainer = ddp_trainer(
        args.devices,
        callbacks,
        max_epochs=2,
        num_sanity_val_steps=0,
        default_root_dir=str(args.out),
    )
    data = Data(args.rank, args.at)
    stopped = False
    try:
        trainer.fit(FeatureModule(6), datamodule=data)
    except SIGTERMException:
        stopped = True
    torch.save(
        {
            "read": data.bank.read,
            "stopped": stopped,
            "global_step": trainer.global_step,
            "knn_logged": "knn/val_top1" in trainer.callback_metrics,
            "broadcasts": broadcasts.counts,
        },
        args.out / f"rank{trainer.global_rank}_of{trainer.world_size}.pt",
    )


if __name__ == "__main__":
    main()
