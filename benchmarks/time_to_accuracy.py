"""What speed buys: kNN top-1 on real CIFAR-10 after a fixed wall-clock budget of training.

    tar -xzf ../shared/data/cifar10-jpg.tar.gz -C /tmp
    python benchmarks/time_to_accuracy.py --root /tmp/cifar10-jpg --augment gpu --minutes 3
    python benchmarks/time_to_accuracy.py --root /tmp/cifar10-jpg --augment cpu --minutes 3
    # same number of epochs on both pipelines (the no-accuracy-cost check):
    python benchmarks/time_to_accuracy.py --root /tmp/cifar10-jpg \
        --epochs 24 --minutes 0 --augment cpu
    python benchmarks/time_to_accuracy.py --root /tmp/cifar10-jpg \
        --epochs 24 --minutes 0 --augment gpu
    python benchmarks/time_to_accuracy.py --root /tmp/cifar10-jpg --tiny   # CPU smoke run
    # --json out.json also writes the line's figures (and the training images/s) to a file:
    # once training ends (no kNN yet), again with the kNN; --stop-by T ends training in time
    # for the kNN before the wall-clock time T (a time guard that would kill the run)

The recipe of the issue's measurements: ResNet-18 with the CIFAR stem, batch 512, SGD with
lr 0.06 x B/128 (``base_lr`` 0.12 per 256), cosine decay, temperature 0.5, NT-Xent's mean
over the 2N views (lightly's, which the recipe was tuned with), bf16 on CUDA.
With ``--minutes`` the cosine schedule spans ``--epochs`` (choose the number that fits the
budget, as a user would) and training stops at the budget or the last epoch, whichever is
first. kNN: weighted, k=200, temperature 0.1, train split (no augmentation) as memory bank,
``val/`` as queries. Prints one line per run; compare runs made on the same device.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simclr_lightning import ImageFolderDataModule, SimCLR, SimCLRAugmentation  # noqa: E402
from simclr_lightning.data.transforms import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402
from simclr_lightning.evaluation.knn import knn_predict  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="CIFAR-10 in the ImageFolder layout")
    p.add_argument("--augment", choices=["cpu", "gpu"], default="gpu")
    p.add_argument("--epochs", type=int, default=65, help="length of the cosine schedule")
    p.add_argument("--minutes", type=float, default=3.0, help="training budget; 0: no limit")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--workers", type=int, default=16, help="loader workers (CPU pipeline)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="a few CPU steps: checks the code path")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.add_argument(
        "--stop-by",
        type=float,
        default=None,
        help="wall-clock time (time.time()) by which the run must have ended: training stops "
        "--reserve-s before it",
    )
    p.add_argument(
        "--reserve-s",
        type=float,
        default=45.0,
        help="seconds kept after training for the kNN over the whole train split and the exit",
    )
    return p.parse_args(argv)


class StopBy(L.Callback):
    """Ends training at the first step past ``stop_by - reserve_s`` (wall clock), so a run
    under a time guard ends with figures: Lightning's ``max_time`` counts from the fit's
    start, after the imports and the resident decode, and nothing of the kNN after it."""

    def __init__(self, stop_by: float, reserve_s: float) -> None:
        self.at = stop_by - reserve_s
        self.fired = False

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if time.time() >= self.at:
            self.fired = trainer.should_stop = True


def epochs_trained(trainer: L.Trainer) -> float:
    """Epochs trained, with the fraction of one that a time limit ended part way: Lightning's
    ``current_epoch`` counts such an epoch as done, so two runs cut at different steps of
    their last epoch read as equal."""
    per_epoch = trainer.num_training_batches
    if not per_epoch or math.isinf(per_epoch):  # an unsized loader: whole epochs only
        return float(trainer.current_epoch)
    return trainer.global_step / per_epoch


def write_json(path: str, figures: dict) -> None:
    """Atomically: the run's time guard may kill it at any moment."""
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    tmp.write_text(json.dumps(figures, indent=1))
    os.replace(tmp, path)


@torch.no_grad()
def features(model: SimCLR, loader, device) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    xs, ys = [], []
    for x, y in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            xs.append(model(x.to(device, non_blocking=True)).float())
        ys.append(y.to(device))
    return torch.cat(xs), torch.cat(ys)


def main(argv=None) -> None:
    a = parse_args(argv)
    cuda = torch.cuda.is_available() and not a.tiny
    device = torch.device("cuda" if cuda else "cpu")
    if a.tiny:  # on a shared small CPU, OpenMP threads spin-waiting for each other cost 10x
        torch.set_num_threads(1)
    L.seed_everything(a.seed)
    aug = SimCLRAugmentation(image_size=32, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    data = ImageFolderDataModule(
        a.root,
        augmentation=aug,
        batch_size=2 if a.tiny else a.batch_size,
        augment=a.augment,
        resident=a.augment == "gpu",
        num_workers=0 if a.tiny else a.workers,
        val_batch_size=4 if a.tiny else 1024,
    )
    model = SimCLR(
        backbone="resnet18",
        cifar_stem=True,
        head_hidden_dim=2048,
        temperature=0.5,
        loss_reduction="mean",  # lightly's loss, which this recipe was tuned with
        optimizer="sgd",
        base_lr=0.12,
        weight_decay=5e-4,
        warmup_epochs=0,
    )
    stop = StopBy(a.stop_by, a.reserve_s) if a.stop_by is not None else None
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        precision="bf16-mixed" if cuda else "32-true",
        benchmark=cuda,
        max_epochs=1 if a.tiny else a.epochs,
        limit_train_batches=3 if a.tiny else None,
        max_time={"minutes": a.minutes} if a.minutes > 0 and not a.tiny else None,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[stop] if stop is not None else None,
    )
    start = time.perf_counter()
    data.setup("fit")  # the resident copy is decoded here, outside the training budget
    setup_s = time.perf_counter() - start
    start = time.perf_counter()
    trainer.fit(model, data)
    train_s = time.perf_counter() - start
    name = torch.cuda.get_device_name() if cuda else "CPU"
    figures = dict(
        part="tta",
        device=name,
        torch=torch.__version__,
        cpu_cores=os.cpu_count(),
        augment=a.augment,
        seed=a.seed,
        batch_size=data.batch_size,
        workers=a.workers,
        epochs_planned=a.epochs,
        epochs_done=epochs_trained(trainer),
        steps_per_epoch=trainer.num_training_batches,
        minutes=a.minutes,
        stopped_by_deadline=bool(stop and stop.fired),
        steps=trainer.global_step,
        setup_s=setup_s,
        train_s=train_s,
        train_images_per_s=trainer.global_step * data.batch_size / train_s,
        stage="trained",  # no kNN yet: what a kill during the kNN leaves
    )
    if a.json:
        write_json(a.json, figures)
    figures.update(knn_top1=knn_top1(model, data, device, a.tiny), stage="done")
    if a.json:
        write_json(a.json, figures)
    print(
        f"device {name} | augment {a.augment} | epochs {figures['epochs_done']:g} of {a.epochs} "
        f"| setup {setup_s:.0f} s | train {train_s:.0f} s | {trainer.global_step} steps "
        f"| kNN top-1 {figures['knn_top1']:.2f}%"
    )


def knn_top1(model: SimCLR, data: ImageFolderDataModule, device, tiny: bool) -> float:
    """Weighted kNN top-1 (%) of ``val/`` against the train split, without augmentation."""
    model.to(device)
    bank_loader, query_loader = data.eval_train_dataloader(), data.val_dataloader()
    if tiny:
        bank_loader = [b for _, b in zip(range(4), bank_loader, strict=False)]
        query_loader = [b for _, b in zip(range(2), query_loader, strict=False)]
    bank_x, bank_y = features(model, bank_loader, device)
    query_x, query_y = features(model, query_loader, device)
    scores = knn_predict(query_x, bank_x, bank_y, 10, k=200, temperature=0.1)
    return 100 * (scores.argmax(1) == query_y).float().mean().item()


if __name__ == "__main__":
    main()
