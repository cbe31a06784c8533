"""The evaluation workflow on real CIFAR-10 JPEGs through the CLI: pretraining with the probe,
kNN monitor and embedding plot; linear evaluation from its checkpoint; backbone export."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from simclr_lightning.checkpoint import export_backbone
from simclr_lightning.cli import cli_main
from simclr_lightning.evaluation import LinearEval
from simclr_lightning.module import SimCLR
from tests.helpers import REPO, make_subset

CONFIGS = REPO / "configs"
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)  # ImageFolderDataModule's
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
CHANCE = 0.10
QUIET = [
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cifar_small(cifar_jpg_root, tmp_path_factory) -> Path:
    """100 train and 50 val images per class."""
    return make_subset(cifar_jpg_root, tmp_path_factory.mktemp("cifar_small"), 100, 50)


def read_csv_metrics(log_dir: Path) -> list[dict[str, str]]:
    with open(log_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def last_value(rows: list[dict[str, str]], name: str) -> float:
    values = [float(r[name]) for r in rows if r.get(name)]
    assert values, f"{name} was never logged"
    return values[-1]


@pytest.fixture(scope="module")
def pretrained(cifar_small, tmp_path_factory) -> dict:
    """Two SimCLR epochs (ResNet-18, standard stem, 32 px) on 1,000 images with the monitors."""
    out = tmp_path_factory.mktemp("pretrain")
    cli = cli_main(
        [
            "fit",
            "--seed_everything=0",
            "--model=simclr_lightning.SimCLR",
            "--model.backbone=resnet18",
            "--model.cifar_stem=false",  # 4x downsampling stem: what 2 CPU cores can afford
            "--model.zero_init_residual=false",  # 2 short epochs: see README (1)
            "--model.head_hidden_dim=512",
            "--model.optimizer=sgd",
            "--model.base_lr=0.06",
            "--model.warmup_epochs=0",
            "--data=simclr_lightning.ImageFolderDataModule",
            f"--data.root={cifar_small}",
            "--data.batch_size=25",
            "--data.num_workers=0",
            "--data.augmentation.image_size=32",
            "--data.augmentation.crop_scale=[0.5, 1.0]",  # mild views: the probe learns in
            "--data.augmentation.jitter_prob=0",  # 80 steps what it would in many more
            "--data.augmentation.grayscale_prob=0",
            "--data.augmentation.blur_prob=0",
            "--trainer.max_epochs=2",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.save_dir={out}",
            "--trainer.callbacks+=simclr_lightning.OnlineLinearProbe",
            "--trainer.callbacks.num_classes=10",
            "--trainer.callbacks+=simclr_lightning.KNNMonitor",
            "--trainer.callbacks.k=200",
            "--trainer.callbacks+=simclr_lightning.EmbeddingPlot",
            "--trainer.callbacks.every_n_epochs=2",
            *QUIET,
        ]
    )
    log_dir = Path(cli.trainer.logger.log_dir)
    return {"log_dir": log_dir, "ckpt": cli.trainer.checkpoint_callback.best_model_path}


@pytest.mark.slow
def test_pretraining_logs_probe_and_knn_above_chance(pretrained):
    rows = read_csv_metrics(pretrained["log_dir"])
    probe, knn = last_value(rows, "probe/val_top1"), last_value(rows, "knn/val_top1")
    print(f"probe/val_top1={probe:.3f} knn/val_top1={knn:.3f}")
    assert probe > CHANCE + 0.05
    assert knn > CHANCE + 0.05
    assert last_value(rows, "probe/val_top5") >= probe
    assert last_value(rows, "probe/val_top5") > 0.5  # chance is 0.5
    assert last_value(rows, "knn/val_top5") > 0.5  # chance is 0.5
    # Both logged once per epoch; kNN is logged every epoch at every_n_epochs=1.
    assert sum(1 for r in rows if r.get("knn/val_top1")) == 2
    plots = sorted((pretrained["log_dir"] / "embeddings").glob("*.png"))
    assert [p.name for p in plots] == ["epoch=001.png"]  # every_n_epochs=2
    image = np.asarray(Image.open(plots[0]).convert("RGB"))
    assert image.shape[0] == 512 and len(np.unique(image.reshape(-1, 3), axis=0)) > 10


def eval_images(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The val split preprocessed by hand: 32 px JPEGs, scaled to [0, 1], ImageNet-normalised."""
    classes = sorted(p.name for p in (root / "val").iterdir())
    xs, ys = [], []
    for y, name in enumerate(classes):
        for path in sorted((root / "val" / name).iterdir()):
            rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
            xs.append((torch.from_numpy(rgb).permute(2, 0, 1) - IMAGENET_MEAN) / IMAGENET_STD)
            ys.append(y)
    return torch.stack(xs), torch.tensor(ys)


@pytest.fixture(scope="module")
def linear_eval(pretrained, cifar_small, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("linear_eval")
    args = [
        f"--config={CONFIGS / 'linear_eval.yaml'}",
        "--data=simclr_lightning.ImageFolderDataModule",
        f"--data.root={cifar_small}",
        "--data.augmentation.image_size=32",
        "--data.batch_size=50",
        "--data.num_workers=0",
        "--trainer.precision=32",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={out}",
        *QUIET,
    ]
    cli = cli_main(
        [
            "fit",
            *args,
            f"--model.checkpoint={pretrained['ckpt']}",
            "--model.lr=0.02",
            "--trainer.max_epochs=3",
        ]
    )
    best = cli.trainer.checkpoint_callback.best_model_path
    tested = cli_main(["test", *args, f"--ckpt_path={best}"])
    return {"log_dir": Path(cli.trainer.logger.log_dir), "best": best, "test": tested}


@pytest.mark.slow
def test_linear_eval_from_pretraining_checkpoint(pretrained, linear_eval, cifar_small):
    rows = read_csv_metrics(linear_eval["log_dir"])
    val_top1 = max(float(r["val/top1"]) for r in rows if r.get("val/top1"))
    print(f"linear eval val/top1={val_top1:.3f}")
    assert val_top1 > CHANCE + 0.05
    assert last_value(rows, "val/top5") > 0.5
    assert last_value(rows, "train/loss_epoch") < 2.3  # below log(10): it learned

    # test/top1 of the best checkpoint, recomputed by hand on hand-made inputs.
    model = LinearEval.load_from_checkpoint(linear_eval["best"]).eval()
    x, y = eval_images(cifar_small)
    with torch.no_grad():
        logits = model(x)
    reported = linear_eval["test"].trainer.callback_metrics
    assert float(reported["test/top1"]) == pytest.approx((logits.argmax(1) == y).float().mean())
    top5 = (logits.topk(5, dim=1).indices == y[:, None]).any(1).float().mean()
    assert float(reported["test/top5"]) == pytest.approx(top5)
    assert float(reported["test/top1"]) == pytest.approx(val_top1)

    # The encoder was frozen, BatchNorm statistics included.
    pretrained_model = SimCLR.load_from_checkpoint(pretrained["ckpt"])
    for name, tensor in pretrained_model.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[name], tensor), name
    assert model.class_names == sorted(p.name for p in (cifar_small / "train").iterdir())


@pytest.mark.slow
def test_exported_backbone_loads_into_torchvision(pretrained, cifar_small, tmp_path):
    out = tmp_path / "encoder.pt"
    arch = export_backbone(pretrained["ckpt"], out)
    assert {k: arch[k] for k in ("backbone", "cifar_stem", "in_channels", "fc")} == {
        "backbone": "resnet18",
        "cifar_stem": False,
        "in_channels": 3,
        "fc": None,
    }
    # the encoder and its pretraining preprocessing beside it; no temporary left over
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["encoder.pt", "encoder.pt.preprocessing.json"]

    net = torchvision.models.resnet18()
    result = net.load_state_dict(torch.load(out, weights_only=True), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    net.fc = nn.Identity()
    encoder = SimCLR.load_from_checkpoint(pretrained["ckpt"]).backbone
    x, _ = eval_images(cifar_small)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x[:64]), encoder.eval()(x[:64]))


def test_config_fragments_instantiate(tmp_path):
    """monitors.yaml and wandb.yaml add to a main config as documented."""
    cli = cli_main(
        [
            f"--config={CONFIGS / 'cifar10.yaml'}",
            f"--config={CONFIGS / 'monitors.yaml'}",
            f"--config={CONFIGS / 'wandb.yaml'}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.logger.init_args.offline=true",
            "--trainer.logger.init_args.log_model=false",
            "--trainer.precision=32",
            *QUIET,
        ],
        run=False,
    )
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    for expected in ("OnlineLinearProbe", "KNNMonitor", "EmbeddingPlot", "ModelCheckpoint"):
        assert expected in names
    assert type(cli.trainer.logger).__name__ == "WandbLogger"
    cli = cli_main(
        [f"--config={CONFIGS / 'linear_eval.yaml'}", *QUIET, "--trainer.precision=32"], run=False
    )
    assert type(cli.model).__name__ == "LinearEval" and cli.datamodule.task == "classify"
