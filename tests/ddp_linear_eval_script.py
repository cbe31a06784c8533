"""Linear evaluation (frozen encoder) for two epochs, saving the classifier and the figures.

Run as a script (Lightning's "ddp" strategy relaunches it once per extra device). With
--devices 1 each training batch is the concatenation, in rank order, of the per-rank batches
the 2-device run sees (Lightning shuffles DDP training data with seed 0 at epoch 0 and seed 0
+ epoch after). Some training images are unlabelled, so the two ranks hold different numbers
of labelled rows at most steps; the 37 validation images are not a multiple of 2, so the
2-device run also has DistributedSampler's padding repeat to leave out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from simclr_lightning.evaluation import LinearEval  # noqa: E402
from tests.ddp_helpers import ddp_trainer, random_images, training_order  # noqa: E402

WORLD, PER_RANK, STEPS, EPOCHS = 2, 6, 3, 2
N_VAL, CLASSES = 37, 6
UNLABELLED = [1, 2, 4, 9, 16, 23, 30]  # training images without a label


def images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return random_images(n, seed, CLASSES)


class Data(L.LightningDataModule):
    def __init__(self, devices: int) -> None:
        super().__init__()
        self.devices = devices

    def train_dataloader(self):
        n = WORLD * PER_RANK * STEPS
        x, y = images(n, seed=1)
        y[UNLABELLED] = -1
        epoch = self.trainer.current_epoch
        order, batch = training_order(self.devices, WORLD, n, PER_RANK, STEPS, epoch)
        return DataLoader([(x[i], y[i]) for i in order], batch_size=batch, shuffle=False)

    def val_dataloader(self):
        x, y = images(N_VAL, seed=3)
        y[5] = -1
        return DataLoader(list(zip(x, y, strict=True)), batch_size=5)

    def test_dataloader(self):  # the same images: test/* must equal val/*
        return self.val_dataloader()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    L.seed_everything(0, verbose=False)
    # 0.5 at the global batch of 12 (2 x 6, or 12 on one process): the rule must read the
    # global batch, not the per-process one, for the runs to match
    lr = 0.5 * 256 / (WORLD * PER_RANK)
    model = LinearEval(
        num_classes=CLASSES, cifar_stem=True, lr=lr, lr_scaling="linear", zero_init_classifier=False
    )
    trainer = ddp_trainer(
        args.devices,
        [],
        max_epochs=EPOCHS,
        num_sanity_val_steps=0,
        reload_dataloaders_every_n_epochs=1,  # the single process's order changes per epoch
    )
    data = Data(args.devices)
    trainer.fit(model, datamodule=data)
    metrics = {k: v.item() for k, v in trainer.callback_metrics.items() if "/" in k}
    trainer.test(model, datamodule=data, verbose=False)
    metrics |= {k: v.item() for k, v in trainer.callback_metrics.items() if "test/" in k}
    x, y = images(N_VAL, seed=3)
    y[5] = -1
    model.eval()
    with torch.no_grad():
        features = model.projection(model.backbone(x))  # what the classifier saw
    torch.save(
        {
            "metrics": metrics,
            "val_features": features,
            "val_labels": y,
            "head": {k: v.clone() for k, v in model.head.state_dict().items()},
            "steps": trainer.global_step,
            "peak_lr": trainer.lr_scheduler_configs[0].scheduler.base_lrs,
            "world": trainer.world_size,
        },
        args.out / f"rank{trainer.global_rank}_of{trainer.world_size}.pt",
    )


if __name__ == "__main__":
    main()
