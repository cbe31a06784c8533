"""A short SimCLR run under Lightning's "ddp" strategy (gloo on CPU) that checkpoints every few
steps and saves each rank's per-step loss; with ``--ckpt`` it resumes from that checkpoint.

Run as a script: Lightning relaunches it once per extra device, as it does for any user.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from simclr_lightning import ImageFolderDataModule, RNGState, SimCLRAugmentation  # noqa: E402
from tests.test_resume import NoisySimCLR, Trace  # noqa: E402


class SplitRanks(L.Callback):
    """Ranks draw different dropout masks and noise from here on: seed_everything (which
    Lightning repeats in every process as it sets up DDP) gives them one stream, and any
    rank-dependent draw splits it. Each rank must then get its own state back."""

    def on_train_start(self, trainer, pl_module):
        rank = trainer.global_rank
        random.seed(rank)
        np.random.seed(rank)
        torch.manual_seed(100 + rank)


class EpochLoss(L.Callback):
    """Each finished epoch's ``train/loss_epoch``: Lightning reduces it after the epoch's end
    hooks, so it is read when the next epoch starts and when training ends."""

    def __init__(self) -> None:
        self.means: dict[int, float] = {}

    def on_train_epoch_start(self, trainer, pl_module):
        self._read(trainer, trainer.current_epoch - 1)

    def on_train_end(self, trainer, pl_module):
        self._read(trainer, trainer.current_epoch - 1)

    def _read(self, trainer, epoch: int) -> None:
        if epoch >= 0 and "train/loss_epoch" in trainer.callback_metrics:
            self.means[epoch] = float(trainer.callback_metrics["train/loss_epoch"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--augment", choices=["cpu", "gpu"], required=True)
    parser.add_argument("--ckpt-dir", required=True)
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    torch.set_num_threads(1)
    L.seed_everything(5, verbose=False)
    data = ImageFolderDataModule(
        args.root,
        augment=args.augment,
        augmentation=SimCLRAugmentation(image_size=16),
        batch_size=3,
        num_workers=0,
    )
    model = NoisySimCLR(
        cifar_stem=False, warmup_epochs=1, base_lr=0.3, head_hidden_dim=32, head_output_dim=16
    )
    trace, epoch_loss = Trace(), EpochLoss()
    every = ModelCheckpoint(args.ckpt_dir, "{step}", every_n_train_steps=2, save_top_k=-1)
    trainer = L.Trainer(  # tests.ddp_helpers.ddp_trainer's setup, with checkpoints
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SplitRanks(), trace, epoch_loss, RNGState(), every],
        max_epochs=2,
        limit_val_batches=0,
        precision="32-true",
    )
    trainer.fit(model, datamodule=data, ckpt_path=args.ckpt)
    torch.save(
        {"rows": trace.rows, "world": trainer.world_size, "epoch_loss": epoch_loss.means},
        args.out / f"rank{trainer.global_rank}_of{trainer.world_size}.pt",
    )


if __name__ == "__main__":
    main()
