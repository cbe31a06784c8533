"""A few SimCLR epochs on an image folder of one image per class, saving the labels (so the image
ids) each rank trained on, step by step.

Run as a script: Lightning's "ddp" strategy relaunches it once per extra device; the library's
training loader shards by its own ResumableSampler (a DistributedSampler, which Lightning keeps
instead of injecting one).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from simclr_lightning import ImageFolderDataModule, SimCLR, SimCLRAugmentation  # noqa: E402
from tests.ddp_helpers import ddp_trainer, script_runs  # noqa: E402


class RecordIds(L.Callback):
    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        (x_a, x_b), labels = batch
        self.steps.append(
            {
                "epoch": trainer.current_epoch,
                "ids": labels.tolist(),
                "view_shape": tuple(x_a.shape),
                "view_dtype": str(x_a.dtype),
                "views_differ": not torch.equal(x_a, x_b),
            }
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--augment", choices=["cpu", "gpu"], required=True)
    parser.add_argument("--resident", action="store_true")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True)
    for args in script_runs(parser):
        run(args)


def run(args: argparse.Namespace) -> None:
    L.seed_everything(0, verbose=False)
    data = ImageFolderDataModule(
        args.root,
        augment=args.augment,
        resident=args.resident,
        augmentation=SimCLRAugmentation(image_size=8),
        batch_size=args.batch_size,
        num_workers=0,
    )
    model = SimCLR(cifar_stem=True, head_hidden_dim=16, head_output_dim=8, optimizer="sgd")
    record = RecordIds()
    trainer = ddp_trainer(
        args.devices, [record], max_epochs=args.epochs, limit_val_batches=0, log_every_n_steps=1
    )
    trainer.fit(model, datamodule=data)
    torch.save(
        {"steps": record.steps, "world": trainer.world_size},
        args.out / f"rank{trainer.global_rank}_of{trainer.world_size}.pt",
    )


if __name__ == "__main__":
    main()
