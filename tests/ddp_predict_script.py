"""``trainer.predict`` of a LinearEval over an image folder, saving each rank's predictions with
the dataset indices of their images (and rank 0 the model's weights).

Run as a script: Lightning's "ddp" strategy relaunches it once per extra device. Lightning
shards prediction data without padding, so with 9 images in batches of 4 rank 0 gets 5 images
(2 batches) and rank 1 gets 4 (1 batch). ``--files`` predicts ``ROOT/val`` through
``ImageFilesDataModule``; ``--csv`` adds a ``PredictionWriter``; ``--slow-rank0 S`` makes rank
0 take S seconds a batch, under a process-group timeout of 5 s once started; ``--fail-rank1``
makes rank 1 fail at its first batch.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import BasePredictionWriter  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402

from simclr_lightning import (  # noqa: E402
    ImageFilesDataModule,
    ImageFolderDataModule,
    PredictionWriter,
    SimCLRAugmentation,
)
from simclr_lightning.evaluation import LinearEval  # noqa: E402
from tests.ddp_helpers import image_folder_args  # noqa: E402

N_IMAGES, BATCH, CLASSES = 9, 4, 3


class RecordPredictions(BasePredictionWriter):
    def __init__(self) -> None:
        super().__init__(write_interval="batch")
        self.indices: list[int] = []
        self.predictions: list[torch.Tensor] = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, *args) -> None:
        self.indices += [int(i) for i in batch_indices]
        self.predictions.append(prediction.detach().cpu())


class FailRank1(L.Callback):
    """Rank 1 fails at its first batch with an error that is no bad file."""

    def on_predict_batch_start(self, trainer, *args) -> None:
        if trainer.global_rank == 1:
            raise RuntimeError("boom on rank 1")


class SlowRank0(L.Callback):
    """Rank 0 predicts slowly, past a process-group timeout of 5 s set once the processes
    have started (on a loaded machine, starting them takes longer than that)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def setup(self, trainer, pl_module, stage: str) -> None:
        torch.distributed.set_timeout(datetime.timedelta(seconds=5))

    def on_predict_batch_end(self, trainer, *args) -> None:
        if trainer.global_rank == 0:
            time.sleep(self.seconds)


def data_module(root: str, files: bool = False) -> L.LightningDataModule:
    if files:
        stats = dict(mean=(0.5,) * 3, std=(0.5,) * 3)
        return ImageFilesDataModule(
            str(Path(root) / "val"), batch_size=BATCH, image_size=16, **stats
        )
    augmentation = SimCLRAugmentation(image_size=16, mean=(0.5,) * 3, std=(0.5,) * 3)
    return ImageFolderDataModule(
        root, augmentation=augmentation, task="classify", batch_size=BATCH, num_workers=0
    )


def model() -> LinearEval:
    L.seed_everything(0, verbose=False)
    # a random classifier, not zeros: every image gets its own probabilities
    return LinearEval(
        num_classes=CLASSES,
        backbone="timm:test_resnet",
        cifar_stem=False,
        zero_init_classifier=False,
    )


def predict(
    linear_eval: LinearEval, root: str, devices: int, args: argparse.Namespace | None = None
) -> RecordPredictions:
    record, callbacks = RecordPredictions(), []
    if args is not None and args.csv:
        callbacks.append(PredictionWriter(args.csv))
    if args is not None and args.slow_rank0:
        callbacks.append(SlowRank0(args.slow_rank0))
    if args is not None and args.fail_rank1:
        callbacks.append(FailRank1())
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        # a rank left alone in a collective fails in seconds, not after gloo's 30 minutes
        strategy=DDPStrategy(timeout=datetime.timedelta(seconds=30)) if devices > 1 else "auto",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record, *callbacks],
    )
    data = data_module(root, files=args is not None and args.files)
    trainer.predict(linear_eval, datamodule=data, return_predictions=False)
    return record


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", action="store_true")
    parser.add_argument("--csv")
    parser.add_argument("--slow-rank0", type=float, default=0.0)
    parser.add_argument("--fail-rank1", action="store_true")
    args = image_folder_args(parser)
    linear_eval = model()
    record = predict(linear_eval, args.root, args.devices, args)
    rank, world = linear_eval.trainer.global_rank, linear_eval.trainer.world_size
    torch.save(
        {
            "indices": record.indices,
            "predictions": torch.cat(record.predictions),
            "batches": len(record.predictions),
            "state_dict": linear_eval.state_dict(),
            "world": world,
        },
        args.out / f"rank{rank}_of{world}.pt",
    )


if __name__ == "__main__":
    main()
