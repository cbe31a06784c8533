"""Did pretraining help? Weighted kNN top-1 on the whole held-out split for the encoder before
pretraining (as initialised, or as loaded) and after, beside chance, printed when training
ends."""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader

from simclr_lightning.callbacks.knn_monitor import labels_past_classes, refuse_other_class_count
from simclr_lightning.callbacks.signal_agreement import stop_requested
from simclr_lightning.data.class_names import says_unlabeled
from simclr_lightning.distributed import PassCutShort, RowCollector, encode_rows, shard_loader
from simclr_lightning.errors import SettingError, require
from simclr_lightning.evaluation.knn import knn_predict, top_k_accuracy
from simclr_lightning.last_checkpoint import resumed_checkpoint
from simclr_lightning.stop_position import epoch_in_progress, stopped_inside_epoch


def encode(trainer: L.Trainer, pl_module: L.LightningModule, loader: DataLoader):
    """Features ``pl_module(x)`` and labels of every image of ``loader``, each rank encoding
    its shard, gathered so every rank holds all rows once. A stop signal cuts the pass at its
    next batch (:class:`PassCutShort`): over 70,000 images it outlasted a scheduler's grace
    period, and a second SIGTERM too."""
    stop = partial(stop_requested, trainer)
    rows = encode_rows(trainer, pl_module, shard_loader(loader, trainer), RowCollector(), stop=stop)
    return rows.gather(trainer, pl_module.device)


class KNNReport(L.Callback):
    """Measures weighted kNN (cosine, ``k`` neighbours voting with ``exp(sim / temperature)``,
    as :class:`KNNMonitor`) of the held-out split against the un-augmented training split, once
    when training starts (the encoder as initialised) and once when it ends (also after an
    early stop; not after an error or a preemption, which raise), and prints both beside
    chance; a fit that trains nothing (resumed at its end) or runs under ``fast_dev_run`` (each
    measurement encodes both whole splits) measures nothing. Every held-out
    image counts, whatever ``limit_val_batches`` or ``data.val_subset`` say. Results are kept
    in ``self.results`` and sent to the loggers as ``knn_report/init_top1`` and
    ``knn_report/final_top1``.

    The first figure is named "randomly initialised encoder" only where the module's
    normalisation layers are as constructed (:func:`freshly_initialised`); weights loaded
    before the fit (``load_from_checkpoint``, ``load_state_dict``) are the "encoder at the
    start of the run". It is kept in checkpoints: a resumed run
    reports the encoder as the run began, not as it was when resumed. (Resumed from a
    checkpoint written without this callback, it measures and names the resumed encoder.)

    Args:
        k / temperature: of the weighted vote.
        num_classes: None reads the data module's ``num_classes`` (else 1 + the largest label).
    """

    def __init__(self, k: int = 200, temperature: float = 0.1, num_classes: int | None = None):
        require(k >= 1, "KNNReport.k", k, ">= 1")
        require(temperature > 0, "KNNReport.temperature", temperature, "> 0")
        self.k = k
        self.temperature = temperature
        self.num_classes = num_classes
        self.results: dict[str, float] = {}
        self._init: dict[str, float] | None = None
        self._start = LOADED

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """kNN top-1/top-5 of ``pl_module``'s features now, and the split sizes (the data
        module checked at setup: :func:`refuse_unreportable`)."""
        datamodule = trainer.datamodule
        bank, bank_labels = _labelled(
            *encode(trainer, pl_module, datamodule.eval_train_dataloader())
        )
        query, labels = _labelled(*encode(trainer, pl_module, datamodule.test_dataloader()))
        if not len(bank) or not len(query):
            raise RuntimeError("KNNReport needs labelled training and held-out images")
        told = self.num_classes or getattr(datamodule, "num_classes", None)
        num_classes = told or int(bank_labels.max()) + 1
        top = max(int(bank_labels.max()), int(labels.max()))  # every rank holds all rows
        if told and top >= told:  # a bare index error from the vote, or wrong figures
            raise SettingError(labels_past_classes("KNNReport", told, self.num_classes, top))
        scores = knn_predict(query, bank, bank_labels, num_classes, self.k, self.temperature)
        return {
            "top1": float(top_k_accuracy(scores, labels, 1)),
            "top5": float(top_k_accuracy(scores, labels, 5)),
            "bank": len(bank),
            "queries": len(query),
            "num_classes": num_classes,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"init": self._init, "start": self._start} if self._init is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._init = state_dict.get("init")
        self._start = state_dict.get("start", self._start)

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._init = None  # a checkpoint's figure, if any, is loaded after this
        if stage == "fit" and not trainer.fast_dev_run:
            refuse_unreportable(trainer.datamodule)
            refuse_other_class_count("KNNReport", self.num_classes, trainer.datamodule)
        self._start = LOADED

    def on_train_start(self, trainer, pl_module) -> None:
        # Not on_fit_start: a fit that trains nothing (resumed at max_epochs, as a requeued job
        # that had finished) would encode both splits for a report it never prints.
        if trainer.fast_dev_run:
            return
        if self._init is None:
            resumed = resumed_checkpoint(trainer)
            if resumed:
                start = f"encoder resumed from {os.path.basename(resumed)}"
            else:
                start = "randomly initialised encoder" if freshly_initialised(pl_module) else LOADED
            try:
                self._init = self.measure(trainer, pl_module)
            except PassCutShort as cut:  # the first step stops and saves (Preemption)
                rank_zero_info(f"KNNReport: no measurement: the run is stopping ({cut})")
                return
            self._start = start

    def on_train_end(self, trainer, pl_module) -> None:
        # Not on_fit_end: Lightning tears the strategy down before it, moving the module to the
        # CPU (a pass over ImageNet there takes hours) and leaving DDP unable to gather.
        if trainer.fast_dev_run:
            return
        if self._init is None:  # its start was cut short by a signal
            return
        try:
            final = self.measure(trainer, pl_module)
        except PassCutShort as cut:
            rank_zero_info(f"KNNReport: no report: the run is stopping ({cut})")
            return
        chance = 1.0 / final["num_classes"]
        self.results = {
            "chance_top1": chance,
            "init_top1": self._init["top1"],
            "final_top1": final["top1"],
            "init_top5": self._init["top5"],
            "final_top5": final["top5"],
            "queries": final["queries"],
            "bank": final["bank"],
        }
        for logger in trainer.loggers:
            logger.log_metrics(
                {f"knn_report/{k}": self.results[k] for k in ("init_top1", "final_top1")},
                step=trainer.global_step,
            )
        self._print(trainer)

    @rank_zero_only
    def _print(self, trainer: L.Trainer) -> None:
        r = self.results
        gain = 100 * (r["final_top1"] - r["init_top1"])
        rows = [
            (f"chance ({round(1 / r['chance_top1'])} classes)", r["chance_top1"], ""),
            (self._start, r["init_top1"], ""),
            (
                f"after {_method(trainer.lightning_module)} ({_epochs_trained(trainer)}, "
                f"{trainer.global_step} steps)",
                r["final_top1"],
                f"{gain:+.1f} points",
            ),
        ]
        lines = [
            f"kNN top-1 on all {r['queries']:,} held-out images (weighted, "
            f"k={min(self.k, r['bank'])}, "
            f"against {r['bank']:,} training images):"
        ]
        lines += [
            f"  {name:<40} {100 * value:5.1f}%  {note}".rstrip() for name, value, note in rows
        ]
        from simclr_lightning.cli_errors import end_progress_bars

        end_progress_bars()  # else the epoch's bar, closed after this, draws itself below
        print("\n".join(lines), flush=True)


LOADED = "encoder at the start of the run"  # weights of unknown origin: loaded, maybe trained


@torch.no_grad()
def freshly_initialised(module: nn.Module) -> bool:
    """Whether ``module`` has normalisation layers and all are as constructed: batch norms
    that never normalised a training batch (running mean 0, variance 1, nothing counted),
    layer and group norms of scale 1 and shift 0. Trained weights move them, so weights
    loaded before the fit, which nothing else records, are not called random; a module
    without such layers cannot tell, and is not."""
    told = False
    for m in module.modules():
        if isinstance(m, _BatchNorm) and m.running_mean is not None:
            fresh = m.running_mean.eq(0).all() & m.running_var.eq(1).all()
            if m.num_batches_tracked is not None:
                fresh &= m.num_batches_tracked.eq(0)
        elif isinstance(m, nn.LayerNorm | nn.GroupNorm) and m.weight is not None:
            fresh = m.weight.eq(1).all()
            if m.bias is not None:
                fresh &= m.bias.eq(0).all()
        else:
            continue
        if not fresh:
            return False
        told = True
    return told


def _epochs_trained(trainer: L.Trainer) -> str:
    """ "2 epochs", or "0.09 epochs" for a fit stopped inside its first (max_steps), which
    Lightning already counts as one."""
    done: float = trainer.current_epoch
    if stopped_inside_epoch(trainer):
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        done = epoch_in_progress(trainer) + batches / trainer.num_training_batches
    text = f"{done:.2f}".rstrip("0").rstrip(".")
    return f"{text} epoch" + ("" if text == "1" else "s")


def refuse_unreportable(datamodule: Any) -> None:
    """Refuse, before any pass, data the report cannot score: it failed with a traceback
    after encoding the whole training split."""
    name = type(datamodule).__name__
    if not hasattr(datamodule, "eval_train_dataloader"):
        problem = (
            f"a data module with eval_train_dataloader() (the training images unaugmented) and "
            f"test_dataloader() (all held-out images), as every SimCLRDataModule has; got {name}"
        )
    elif says_unlabeled(datamodule):
        problem = (
            f"labelled images, and the data module ({name}) has none (num_classes=None, e.g. "
            f"data.root/train without class folders)"
        )
    elif hasattr(datamodule, "val_set") and datamodule.val_set is None:
        problem = f"held-out images, and the data module ({name}) has none (e.g. no data.root/val)"
    else:
        return
    raise SettingError(
        f"KNNReport needs {problem}: remove the KNNReport callback (configs/quickstart.yaml "
        f"lists it)"
    )


def _labelled(features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    keep = labels >= 0
    return features[keep], labels[keep]


def _method(model) -> str:
    """What the run pretrained with: SimCLR, or supervised contrastive (SupCon) learning."""
    return "SupCon" if getattr(model, "hparams", {}).get("loss") == "supcon" else "SimCLR"
