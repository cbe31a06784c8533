"""What the CLI runs of the multi-process tests load by class path: fixed two-view data (no
random augmentation, so one process can replay exactly what several saw) and a callback that
writes each rank's per-step losses, sample ids and how Lightning saw the cluster."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

IMAGES = 16


class PairData(L.LightningDataModule):
    """``IMAGES`` fixed pairs of 3x16x16 views labelled by their index; ``order`` lists the
    indices to serve (repeats allowed), in that order, unshuffled."""

    def __init__(self, batch_size: int = 4, order: list[int] | None = None) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.order = list(range(IMAGES)) if order is None else order

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(1)
        views_a = torch.randn(IMAGES, 3, 16, 16, generator=gen)
        views_b = torch.randn(IMAGES, 3, 16, 16, generator=gen)
        samples = [((views_a[i], views_b[i]), i) for i in self.order]
        return DataLoader(samples, batch_size=self.batch_size, shuffle=False)


class LossRecorder(L.Callback):
    """Writes ``<out>/rank<global rank>.json``: every step's loss and sample ids, and the
    cluster as Lightning saw it."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.steps: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({"loss": outputs["loss"].item(), "ids": batch[1].tolist()})

    def on_train_end(self, trainer, pl_module):
        self.out.mkdir(parents=True, exist_ok=True)
        record = {
            "world_size": trainer.world_size,
            "num_nodes": trainer.num_nodes,
            "node_rank": trainer.node_rank,
            "global_rank": trainer.global_rank,
            "environment": type(getattr(trainer.strategy, "cluster_environment", None)).__name__,
            "batchnorm": sorted(
                {type(m).__name__ for m in pl_module.modules() if "BatchNorm" in type(m).__name__}
            ),
            "steps": self.steps,
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
