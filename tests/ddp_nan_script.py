"""A NaN on one process only, under real Lightning DDP: at step 3 one image of rank 0's batch
is NaN. Every rank must stop with the NaN error at the same step, whether the loss gathers
the embeddings (``--gather 1``: the NaN reaches every rank's loss) or not (``--gather 0``:
each rank's loss is its own). The watch lags two steps, as on a GPU, so both stop at step 5.

Run as a script (Lightning's "ddp" strategy relaunches it per device); each rank saves
``rank<r>_of<N>.pt``: the error it stopped with (None if it did not) and its global step.
The run without gathering comes last: a rank it leaves alone then fails fast, its peer gone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from simclr_lightning import SimCLR  # noqa: E402
from simclr_lightning.lagged_reads import LaggedReads  # noqa: E402
from tests.ddp_helpers import save_outcome, script_runs, stopping_trainer, tiny_simclr  # noqa: E402

NAN_STEP, LAG, PER_RANK = 3, 2, 4


class Lagging:
    """A marker of a device that is not done yet: the reads lag exactly ``LAG`` steps."""

    def synchronize(self) -> None:
        return None


class NanOnRankZero(SimCLR):
    def training_step(self, batch, batch_idx):
        (x_a, x_b), labels = batch
        if self.global_step == NAN_STEP and self.global_rank == 0:
            x_a = x_a.clone()
            x_a[0] = float("nan")  # one garbage image
        return super().training_step(((x_a, x_b), labels), batch_idx)


def run(args: argparse.Namespace) -> None:
    L.seed_everything(0, verbose=False)
    model = tiny_simclr(NanOnRankZero, batch_size=PER_RANK, gather_distributed=args.gather == 1)
    model._watch.reads = LaggedReads(LAG, marker=lambda device: Lagging())
    gen = torch.Generator().manual_seed(0)
    steps = NAN_STEP + LAG + 3
    data = [
        ((torch.randn(3, 16, 16, generator=gen), torch.randn(3, 16, 16, generator=gen)), i % 3)
        for i in range(args.devices * PER_RANK * steps)
    ]
    trainer = stopping_trainer(args.devices, max_steps=steps)
    loader = DataLoader(data, batch_size=PER_RANK)
    save_outcome(trainer, args.out, lambda: trainer.fit(model, loader), (FloatingPointError,))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gather", type=int, choices=[0, 1], default=1)
    for args in script_runs(parser):
        run(args)


if __name__ == "__main__":
    main()
