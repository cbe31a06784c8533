"""Settings every process must refuse at once, under real Lightning DDP: each rank saves the
error it stopped with and its step, and the test checks that all stop with the same one-line
error instead of aborting in gloo or leaving a peer in a collective.

``--short``: batches of different sizes, without Lightning's DistributedSampler (as a custom
sampler or an iterable dataset gives them): rank 1 runs one image short at the epoch's last
batch (``last``) or at every batch (``all``). With the embeddings gathered every rank must
stop; without gathering (``--gather 0``) the sizes are allowed and the epoch trains through.
``--unwritable 1``: a ModelCheckpoint folder only rank 0 tries to write (it is the one that
saves), refused before the first step on every rank.

Run as a script (Lightning's "ddp" strategy relaunches it per device); each rank saves
``rank<r>_of<N>.pt``: the error it stopped with (None if it did not) and its global step.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from simclr_lightning.errors import SettingError  # noqa: E402
from tests.ddp_helpers import save_outcome, script_runs, stopping_trainer, tiny_simclr  # noqa: E402

PER_RANK, BATCHES = 4, 3


def rank_data(rank: int, short: str) -> DataLoader:
    """Rank 0: three batches of 4. Rank 1: 4, 4, 3 (``last``) or three batches of 3 (``all``)."""
    gen = torch.Generator().manual_seed(rank)
    batch_size = PER_RANK - 1 if rank == 1 and short == "all" else PER_RANK  # "none": equal
    n = batch_size * BATCHES - (1 if rank == 1 and short == "last" else 0)
    images = [
        ((torch.randn(3, 16, 16, generator=gen), torch.randn(3, 16, 16, generator=gen)), i % 3)
        for i in range(n)
    ]
    return DataLoader(images, batch_size=batch_size)


def run(args: argparse.Namespace) -> None:
    L.seed_everything(0, verbose=False)
    model = tiny_simclr(batch_size=PER_RANK, gather_distributed=args.gather == 1)
    unwritable = args.out / "a_file" / "checkpoints"  # under a file: even root cannot write
    (args.out / "a_file").touch()
    saves = [ModelCheckpoint(unwritable)] if args.unwritable else []
    trainer = stopping_trainer(
        args.devices,
        use_distributed_sampler=False,
        max_epochs=1,
        enable_checkpointing=bool(saves),
        callbacks=saves,
    )
    # the launching process is rank 0; Lightning gives each relaunched one LOCAL_RANK
    data = rank_data(int(os.environ.get("LOCAL_RANK", 0)), args.short)
    save_outcome(trainer, args.out, lambda: trainer.fit(model, data), (SettingError,))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gather", type=int, choices=[0, 1], default=1)
    parser.add_argument("--short", choices=["none", "last", "all"], default="last")
    parser.add_argument("--unwritable", type=int, choices=[0, 1], default=0)
    for args in script_runs(parser):
        run(args)


if __name__ == "__main__":
    main()
