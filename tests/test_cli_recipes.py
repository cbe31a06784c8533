"""The paper-detail recipes run through the CLI with their configs: supervised contrastive
pretraining, SimCLR v2 fine-tuning from the first head layer on 10% of the labels, a timm
encoder."""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch

from simclr_lightning import LinearEval, SimCLR, SupConLoss
from simclr_lightning.cli import cli_main
from tests.helpers import REPO

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = [
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.precision=32-true",
    "--trainer.enable_progress_bar=false",
    "--trainer.limit_val_batches=0",
]


def config(*names: str) -> list[str]:
    return [arg for name in names for arg in ("--config", str(REPO / "configs" / name))]


def small_images(root) -> list[str]:
    return [
        f"--data.root={root}",
        "--data.augmentation.image_size=32",
        "--data.batch_size=20",
        "--data.num_workers=0",
    ]


@pytest.mark.slow
def test_supcon_then_fine_tuning_from_the_first_head_layer(cifar_tiny, tmp_path):
    pretrain = cli_main(
        ["fit", *config("imagefolder.yaml", "supcon.yaml"), *small_images(cifar_tiny), *CPU]
        + ["--model.backbone=resnet18", "--model.cifar_stem=true", "--trainer.max_steps=2"]
        + [f"--trainer.default_root_dir={tmp_path}", "--data.augmentation.blur_prob=0"]
    )
    model = pretrain.model
    assert isinstance(model, SimCLR) and isinstance(model.criterion, SupConLoss)
    assert model.hparams.temperature == 0.1 and pretrain.trainer.global_step == 2
    assert torch.isfinite(pretrain.trainer.callback_metrics["train/loss"])
    ckpt = pretrain.trainer.checkpoint_callback.last_model_path

    finetune = cli_main(
        ["fit", *config("linear_eval.yaml", "finetune_semi.yaml"), *CPU]
        + ["--data=simclr_lightning.ImageFolderDataModule", *small_images(cifar_tiny)]
        + ["--data.task=classify", "--data.label_fraction=0.1", "--trainer.max_epochs=2"]
        + [f"--model.checkpoint={ckpt}", f"--trainer.default_root_dir={tmp_path / 'ft'}"]
    )
    classifier = finetune.model
    assert isinstance(classifier, LinearEval) and classifier.hparams.head_layers == 1
    assert len(finetune.datamodule.train_set) == 20  # 2 of the 20 images of each class
    assert classifier.feature_dim == 512 and finetune.trainer.global_step == 2
    pretrained_first = model.head.net[0].weight
    assert not torch.equal(classifier.projection[0].weight, pretrained_first)  # fine-tuned


@pytest.mark.slow
def test_timm_encoder_through_the_config(cifar_tiny, tmp_path):
    cli = cli_main(
        ["fit", *config("imagefolder.yaml", "timm.yaml"), *small_images(cifar_tiny), *CPU]
        + ["--model.backbone=timm:resnet10t", "--trainer.max_steps=1"]
        + [f"--trainer.default_root_dir={tmp_path}", "--data.augmentation.blur_prob=0"]
    )
    assert cli.model.hparams.backbone == "timm:resnet10t" and cli.trainer.global_step == 1


@pytest.mark.parametrize("name", ["quickstart.yaml", "quickstart_eval.yaml"])
def test_the_quick_start_checkpoints_refresh_last_ckpt_every_epoch(name, tmp_path):
    """Lightning refreshes save_last's file only when a top-k checkpoint is saved: with
    save_top_k 0 last.ckpt came at the end of the run only, and a killed run (out of memory,
    a lost node) had nothing to resume from."""
    import yaml
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.helpers import FeatureData, FeatureModule, quiet_trainer

    callbacks = yaml.safe_load((REPO / "configs" / name).read_text())["trainer"]["callbacks"]
    (args,) = [c["init_args"] for c in callbacks if c["class_path"].endswith("ModelCheckpoint")]

    class Seen(L.Callback):
        def __init__(self) -> None:
            self.at_epoch_start: list[bool] = []

        def on_train_epoch_start(self, trainer, pl_module):
            self.at_epoch_start.append((tmp_path / "last.ckpt").is_file())

    seen = Seen()
    saves = ModelCheckpoint(**{**args, "dirpath": tmp_path})
    trainer = quiet_trainer(max_epochs=3, enable_checkpointing=True, callbacks=[saves, seen])
    x, y = torch.randn(16, 6), torch.randint(0, 2, (16,))
    trainer.fit(FeatureModule(6), datamodule=FeatureData((x, y), (x, y)))
    assert seen.at_epoch_start == [False, True, True]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["epoch"] == 2


def test_the_fashion_mnist_overlay_keeps_the_quick_starts_checkpoint(fashion_mnist_dir):
    """README's Fashion-MNIST command replaced the quick start's last.ckpt (the file the
    quick start's evaluation and export read) with a one-channel encoder."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from simclr_lightning import KNNReport, MNISTDataModule

    cli = cli_main(
        [*config("quickstart.yaml", "fashion_mnist.yaml"), *CPU,
         f"--data.data_dir={fashion_mnist_dir}"],
        run=False,
    )  # fmt: skip
    saves = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)]
    folder = os.path.join("outputs", "fashion_mnist", "checkpoints")
    assert [os.path.relpath(c.dirpath) for c in saves] == [folder]
    assert any(isinstance(c, KNNReport) for c in cli.trainer.callbacks)
    assert isinstance(cli.datamodule, MNISTDataModule) and cli.model.hparams.in_channels == 1
