"""One SimCLR epoch with the online probe and the kNN monitor, saving what they logged.

Run as a script (Lightning's "ddp" strategy relaunches it once per extra device). With
--devices 1 each training batch is the concatenation, in rank order, of the per-rank batches
the 2-device run sees (Lightning shuffles DDP training data with seed 0 at epoch 0).
Validation (37 images) and the kNN bank (41 images) are not multiples of 2, so the 2-device
run also has DistributedSampler's padding repeats to leave out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import simclr_lightning.callbacks.knn_monitor as knn_monitor  # noqa: E402
from simclr_lightning import KNNMonitor, KNNReport, OnlineLinearProbe, SimCLR  # noqa: E402
from tests.ddp_helpers import (  # noqa: E402
    FreezeBatchNorm,
    ddp_trainer,
    random_images,
    script_runs,
    training_order,
)

WORLD, PER_RANK, STEPS = 2, 4, 2
N_VAL, N_BANK, CLASSES = 37, 41, 4


def images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return random_images(n, seed, CLASSES)


class Data(L.LightningDataModule):
    def __init__(self, devices: int) -> None:
        super().__init__()
        self.devices = devices

    def train_dataloader(self):
        n = WORLD * PER_RANK * STEPS
        a, y = images(n, seed=1)
        b, _ = images(n, seed=2)
        y[3] = -1  # an unlabeled image in the probe's batches
        order, batch = training_order(self.devices, WORLD, n, PER_RANK, STEPS, epoch=0)
        samples = [((a[i], b[i]), y[i]) for i in order]
        return DataLoader(samples, batch_size=batch, shuffle=False)

    def val_dataloader(self):
        x, y = images(N_VAL, seed=3)
        y[5] = -1
        return DataLoader(list(zip(x, y, strict=True)), batch_size=5)

    def test_dataloader(self):  # KNNReport's held-out split
        return self.val_dataloader()

    def eval_train_dataloader(self):
        x, y = images(N_BANK, seed=4)
        y[7] = -1
        return DataLoader(list(zip(x, y, strict=True)), batch_size=6)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bank-dtype", default="float32")
    plain = knn_monitor.sharded_knn_predict, knn_monitor.top_k_accuracy
    for args in script_runs(parser):
        run(args, *plain)


def run(args: argparse.Namespace, plain_knn, plain_accuracy) -> None:
    seen = {}

    def recording_knn(query, shard, shard_labels, shard_index, *rest):
        scores = plain_knn(query, shard, shard_labels, shard_index, *rest)
        seen.update(query=query, shard=shard, shard_labels=shard_labels, shard_index=shard_index)
        seen["scores"] = scores
        return scores

    knn_monitor.sharded_knn_predict = recording_knn

    def recording_accuracy(scores, labels, k):
        seen["query_labels"] = labels
        return plain_accuracy(scores, labels, k)

    knn_monitor.top_k_accuracy = recording_accuracy

    L.seed_everything(0, verbose=False)
    model = SimCLR(
        cifar_stem=True,
        head_hidden_dim=64,
        head_output_dim=16,
        optimizer="sgd",
        base_lr=0.5,
        warmup_epochs=0,
    )
    probe = OnlineLinearProbe(num_classes=CLASSES, optimizer="sgd", lr=0.5)
    report = KNNReport(k=10, num_classes=CLASSES)
    knn = KNNMonitor(num_classes=CLASSES, k=10, bank_dtype=args.bank_dtype)
    callbacks = [FreezeBatchNorm(), probe, knn, report]
    trainer = ddp_trainer(args.devices, callbacks, max_epochs=1, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=Data(args.devices))
    metrics = {k: v.item() for k, v in trainer.callback_metrics.items() if "/" in k}
    torch.save(
        {
            "metrics": metrics,
            "probe": {k: v.clone() for k, v in probe.classifier.state_dict().items()},
            "probe_steps": probe.steps,
            "knn": {name: value.cpu() for name, value in seen.items()},
            "report": report.results,
            "world": trainer.world_size,
        },
        args.out / f"rank{trainer.global_rank}_of{trainer.world_size}.pt",
    )


if __name__ == "__main__":
    main()
