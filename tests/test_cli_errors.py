"""Every user error through ``simclr-lightning``: one line on stderr naming the setting or file,
the value and what to do, no traceback, exit 2 for usage errors and 1 for the others."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from simclr_lightning.checkpoint import export_backbone
from simclr_lightning.cli import cli_main, main
from tests.helpers import REPO, make_subset

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "--seed_everything=0",
    "--model=SimCLR",
    "--model.backbone=timm:test_resnet",
    "--model.cifar_stem=false",
    "--model.head_hidden_dim=16",
    "--model.head_output_dim=8",
    "--model.optimizer=sgd",
    "--model.base_lr=0.01",
    "--model.warmup_epochs=0",
    "--data=ImageFolderDataModule",
    "--data.batch_size=8",
    "--data.num_workers=0",
    "--data.augmentation.image_size=16",
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.precision=32-true",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=0",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]
EVAL = [
    f"--config={REPO / 'configs' / 'linear_eval.yaml'}",
    "--data=ImageFolderDataModule",
    "--data.task=classify",
    "--data.batch_size=8",
    "--data.num_workers=0",
    "--data.augmentation.image_size=16",
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.precision=32-true",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=1",
    "--trainer.limit_val_batches=0",
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
]


@pytest.fixture(scope="module")
def files(cifar_jpg_root, tmp_path_factory) -> dict[str, Path]:
    """A tiny labelled image folder, an unlabeled one, a real SimCLR checkpoint (one step),
    its truncated and empty copies, and a checkpoint of something else."""
    root = tmp_path_factory.mktemp("cli_errors")
    data = make_subset(cifar_jpg_root, root / "data", 2, 1)  # 20 train, 10 val images
    unlabeled = root / "unlabeled" / "train"
    unlabeled.mkdir(parents=True)
    for image in sorted((data / "train").rglob("*.jpg"))[:16]:
        (unlabeled / f"{image.parent.name}_{image.name}").symlink_to(image.resolve())
    run = root / "run"
    cli_main(["fit", *TINY, f"--data.root={data}", f"--trainer.default_root_dir={run}"])
    simclr = next(run.rglob("*.ckpt"))
    blob = simclr.read_bytes()
    (root / "truncated.ckpt").write_bytes(blob[: len(blob) // 2])
    (root / "empty.ckpt").write_bytes(b"")
    torch.save({"weight": torch.zeros(3)}, root / "other.pt")
    full = torch.load(simclr, map_location="cpu", weights_only=False)
    saved_keys = ("optimizer_states", "lr_schedulers", "loops", "callbacks")
    weights = {k: v for k, v in full.items() if k not in saved_keys}  # save_weights_only's
    torch.save(weights, root / "weights.ckpt")
    export_backbone(simclr, root / "exported.pt")  # a plain state dict
    (root / "text.ckpt").write_text("hello\n")
    # YAML a user mistyped: a list left open, a key indented under a value
    (root / "bad.yaml").write_text("seed_everything: 0\ntrainer:\n  max_steps: 1\nmodel: [open\n")
    (root / "model.yaml").write_text("class_path: SimCLR\ninit_args:\n  base_lr: 1\n   x: 1\n")
    (root / "trainer_typo.yaml").write_text("trainer:\n  max_epoch: 2\n")  # max_epochs
    (root / "knn_report.yaml").write_text(
        "trainer:\n  callbacks:\n    - class_path: simclr_lightning.KNNReport\n"
    )
    return {
        "data": data,
        "unlabeled": unlabeled.parent,
        "simclr": simclr,
        "truncated": root / "truncated.ckpt",
        "empty": root / "empty.ckpt",
        "other": root / "other.pt",
        "missing": root / "missing.ckpt",
        "weights": root / "weights.ckpt",
        "exported": root / "exported.pt",
        "text": root / "text.ckpt",
        "bad_yaml": root / "bad.yaml",
        "model_yaml": root / "model.yaml",
        "trainer_typo": root / "trainer_typo.yaml",
        "knn_report": root / "knn_report.yaml",
        "root": root,
    }


def fit(*extra: str) -> list[str]:
    return ["fit", *TINY, "--data.root={data}", "--trainer.default_root_dir={root}/fit", *extra]


def fit_on(data: str, *extra: str) -> list[str]:
    """``fit`` on another data module than the image folder (its own location setting)."""
    tiny = [a for a in TINY if not a.startswith("--data")]
    return ["fit", *tiny, f"--data={data}", "--data.batch_size=8", "--data.num_workers=0", *extra]


def validate(*extra: str) -> list[str]:
    return ["validate", *TINY, "--data.root={data}", "--trainer.default_root_dir={root}/v", *extra]


def evaluate(*extra: str) -> list[str]:
    return ["fit", *EVAL, "--data.root={data}", "--trainer.default_root_dir={root}/eval", *extra]


# (name, arguments, exit code, substrings the line must hold)
CASES = [
    # model settings
    ("unknown model option", fit("--model.bogus=3"), 2, ["model.bogus", "SimCLR"]),
    ("loss not a choice", fit("--model.loss=foo"), 2, ["model.loss='foo'", "ntxent"]),
    ("optimizer", fit("--model.optimizer=rmsprop"), 2, ["model.optimizer='rmsprop'", "lars"]),
    ("backbone", fit("--model.backbone=resnet99"), 2, ["model.backbone='resnet99'", "resnet18"]),
    ("timm model", fit("--model.backbone=timm:no_such_net"), 2, ["timm:no_such_net"]),
    ("temperature", fit("--model.temperature=0"), 2, ["model.temperature=0", "> 0"]),
    ("base_lr", fit("--model.base_lr=-1"), 2, ["model.base_lr=-1", "> 0"]),
    ("head_layers", fit("--model.head_layers=0"), 2, ["model.head_layers=0", ">= 1"]),
    ("warmup < 0", fit("--model.warmup_epochs=-1"), 2, ["model.warmup_epochs=-1", ">= 0"]),
    ("final_lr_ratio", fit("--model.final_lr_ratio=2"), 2, ["model.final_lr_ratio=2", "[0, 1]"]),
    ("grad cache", fit("--model.grad_cache_chunks=0"), 2, ["model.grad_cache_chunks=0"]),
    ("cifar stem on timm", fit("--model.cifar_stem=true"), 2, ["model.cifar_stem=True"]),
    (
        "model typo points to its class's settings",
        fit("--model.tempertaure=0.1"),
        2,
        [
            "model.tempertaure is not a setting of simclr_lightning.SimCLR: did you mean "
            "model.temperature? (settings: simclr-lightning fit --model.help SimCLR)",
        ],
    ),
    (
        "model setting of no class points to the group's help",
        ["fit", "--model.tempertaure=0.1"],
        2,
        [
            "model.tempertaure is given before any model class: give --model CLASS, or the "
            "--config that names one, before the model's settings",
            "(settings: simclr-lightning fit --model.help CLASS_PATH_OR_NAME)",
        ],
    ),
    (
        "LightningCLI's --optimizer would drop SimCLR's own",
        fit("--optimizer=torch.optim.SGD", "--optimizer.lr=0.5"),
        2,
        ["--optimizer is not used with SimCLR, which sets its own", "model.base_lr"],
    ),
    (
        "LightningCLI's --lr_scheduler alone was dropped silently",
        fit("--lr_scheduler=torch.optim.lr_scheduler.ConstantLR"),
        2,
        ["--lr_scheduler is not used with SimCLR", "model.warmup_epochs"],
    ),
    (
        "momentum",
        fit("--model.momentum=-1"),
        2,
        ["model.momentum=-1.0 is invalid: must be in [0, 1)"],
    ),
    ("LARS eta", fit("--model.lars_eta=0"), 2, ["model.lars_eta=0.0 is invalid: must be > 0"]),
    (
        "misspelt class name",
        fit("--data=ImageFoldrDataModule"),
        2,
        ["data='ImageFoldrDataModule' is invalid", "did you mean ImageFolderDataModule?"],
    ),
    (
        "misspelt logger",  # the close name was only looked for among simclr_lightning's
        fit("--trainer.logger=CSVLoger"),
        2,
        ["trainer.logger='CSVLoger' is invalid", "did you mean CSVLogger?"],
    ),
    (
        "misspelt Lightning callback",
        fit("--trainer.callbacks+=EarlyStoping"),
        2,
        ["trainer.callbacks='EarlyStoping' is invalid", "did you mean EarlyStopping?"],
    ),
    (
        "misspelt class path",
        fit("--data=simclr_lightning.ImageFoldrDataModule"),
        2,
        [
            "simclr_lightning has no ImageFoldrDataModule: did you mean ImageFolderDataModule? "
            "(settings: simclr-lightning fit --data.help CLASS_PATH_OR_NAME)"
        ],
    ),
    # data settings and data
    (
        "data typo points to its class's settings",
        fit("--data.batchsize=3"),
        2,
        [
            "data.batchsize is not a setting of simclr_lightning.ImageFolderDataModule: did you "
            "mean data.batch_size? (settings: simclr-lightning fit --data.help "
            "ImageFolderDataModule)"
        ],
    ),
    (
        "typo in a data setting's group",
        fit("--data.augmentaton.image_size=8"),
        2,
        [
            "data.augmentaton.image_size is not a setting of simclr_lightning."
            "ImageFolderDataModule: did you mean data.augmentation.image_size?"
        ],
    ),
    (
        "unknown data setting with no close one",
        fit("--data.zzz.image_size=8"),
        2,
        [
            "data.zzz.image_size is not a setting of simclr_lightning.ImageFolderDataModule "
            "(settings: simclr-lightning fit --data.help ImageFolderDataModule)"
        ],
    ),
    ("batch size", fit("--data.batch_size=1"), 2, ["data.batch_size=1"]),
    ("task", fit("--data.task=foo"), 2, ["data.task='foo'"]),
    ("workers", fit("--data.num_workers=-1"), 2, ["data.num_workers=-1", ">= 0"]),
    (
        "mean of 2 channels",
        fit("--data.augmentation.mean=[0.5,0.5]", "--data.augmentation.std=[0.2,0.2]"),
        2,
        ["data.augmentation.mean=(0.5, 0.5)", "3 values (one per channel"],
    ),
    (
        "blur kernel wider than the views",
        fit("--data.augmentation.blur_kernel_size=99"),
        2,
        ["data.augmentation.blur_kernel_size=99", "[1, 31]"],
    ),
    (
        "jitter strength",
        fit("--data.augmentation.jitter_strength=3"),
        2,
        ["data.augmentation.jitter_strength=3", "[0, 2.5]"],
    ),
    ("data class", fit("--data=NoSuchData"), 2, ["data='NoSuchData'", "class name"]),
    ("missing data dir", fit("--data.root={root}/nowhere"), 1, ["data.root=", "nowhere"]),
    ("no train folder", fit("--data.root={root}"), 1, ["data.root=", "no train/ folder"]),
    ("batch > images", fit("--data.batch_size=64"), 2, ["data.batch_size=64", "larger"]),
    (
        "missing CIFAR-10",
        fit_on("CIFARDataModule", "--data.data_dir={root}/nowhere"),
        1,
        ["data.data_dir=", "nowhere", "cifar-10-batches-py/", "data.download=true"],
    ),
    (
        "missing CIFAR-100",
        fit_on("CIFARDataModule", "--data.dataset=cifar100", "--data.data_dir={root}"),
        1,
        ["data.data_dir=", "cifar100", "cifar-100-python/", "data.download=true"],
    ),
    (
        "missing MNIST",
        fit_on("MNISTDataModule", "--data.data_dir={root}/nowhere", "--model.in_channels=1"),
        1,
        ["data.data_dir=", "nowhere", "train-images-idx3-ubyte", "data.download=true"],
    ),
    # trainer and command line
    (
        "max_epochs type",
        fit("--trainer.max_epochs=abc"),
        2,
        ["trainer.max_epochs='abc'", "int", "(settings: simclr-lightning fit --help)"],
    ),
    ("unknown argument", fit("--foo=1"), 2, ["foo is not a setting (settings: simclr-lightning"]),
    (
        "a union's types, not its last one",
        fit("--trainer.precision=bf32-mixed"),
        2,
        ["trainer.precision='bf32-mixed' is invalid: must be one of 64, 32, 16,", "'bf16-mixed'"],
    ),
    (
        "bool or int",
        fit("--seed_everything=1.5"),
        2,
        ["seed_everything='1.5'", "must be bool or int"],
    ),
    (
        "a model setting's union, inside the model's class union",
        fit("--model.head_hidden_dim=abc"),
        2,
        ["model.head_hidden_dim='abc' is invalid: must be int or null (settings: "],
    ),
    (
        "int, float or null",
        fit("--trainer.limit_train_batches=abc"),
        2,
        ["trainer.limit_train_batches='abc' is invalid: must be int, float or null"],
    ),
    (
        "devices of the wrong kind",
        fit("--trainer.devices=abc"),
        2,
        ["trainer.devices selected with CPUAccelerator should be an int > 0"],
    ),
    (
        "EarlyStopping of a metric nothing logs",
        fit("--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor=val/top1"),
        2,
        ["Early stopping conditioned on metric val/top1 which is not available", "train/loss"],
    ),
    (
        "callback in the config and again on the command line",
        fit("--config={knn_report}", "--trainer.callbacks+=simclr_lightning.KNNReport"),
        2,
        ["trainer.callbacks: two KNNReport callbacks have the same state key", "give it once"],
    ),
    ("two unknown arguments", fit("--foo=1", "--bar", "2"), 2, ["arguments: --foo=1 --bar 2"]),
    # trainer settings Lightning takes, then fails on mid-run (a modulo by zero) or runs to
    # nothing with exit 0
    (
        "validate every 0 epochs",
        fit("--trainer.check_val_every_n_epoch=0"),
        2,
        ["trainer.check_val_every_n_epoch=0 is invalid: must be >= 1"],
    ),
    (
        "validate every 0 batches",
        fit("--trainer.val_check_interval=0"),
        2,
        ["trainer.val_check_interval=0 is invalid: must be > 0"],
    ),
    (
        "negative clipping",
        fit("--trainer.gradient_clip_val=-1"),
        2,
        ["trainer.gradient_clip_val=-1.0 is invalid: must be >= 0"],
    ),
    (
        "negative log interval",
        fit("--trainer.log_every_n_steps=-1"),
        2,
        ["trainer.log_every_n_steps=-1 is invalid: must be >= 0 (0: never log)"],
    ),
    (
        "negative patience",
        fit(
            "--trainer.callbacks+=EarlyStopping",
            "--trainer.callbacks.monitor=train/loss",
            "--trainer.callbacks.patience=-3",
        ),
        2,
        ["trainer.callbacks (EarlyStopping): patience=-3 is invalid: must be >= 0"],
    ),
    (
        "a fit of no epochs",
        fit("--trainer.max_epochs=0"),
        2,
        ["trainer.max_epochs=0 is invalid: a fit of it trains nothing"],
    ),
    (
        "a fit of no batches",
        fit("--trainer.limit_train_batches=0"),
        2,
        ["trainer.limit_train_batches=0 is invalid: a fit of it trains nothing"],
    ),
    (
        "predict with no writer",
        [
            "predict",
            *TINY,
            "--data.root={data}",
            "--ckpt_path={simclr}",
            "--trainer.default_root_dir={root}/predict",
        ],  # fmt: skip
        2,
        ["simclr-lightning predict keeps nothing without a writer callback", "FeatureWriter"],
    ),
    (
        "test of a classifier never trained",
        [
            "test",
            *EVAL,
            "--data.root={data}",
            "--model.checkpoint={simclr}",
            "--model.num_classes=2",
            "--trainer.default_root_dir={root}/untrained",
        ],
        2,
        ["test of a LinearEval whose classifier was never trained", "--ckpt_path"],
    ),
    (
        "abbreviated setting refused",  # argparse would take it for trainer.max_epochs
        fit("--trainer.max_epoch=2"),
        2,
        ["trainer.max_epoch is not a setting: did you mean trainer.max_epochs? (settings: "],
    ),
    (
        "config file's misspelt key",
        fit("--config={trainer_typo}"),
        2,
        [
            "trainer.max_epoch is not a setting: did you mean trainer.max_epochs? (settings: "
            "simclr-lightning fit --help)"
        ],
    ),
    ("missing config", fit("--config=nope.yaml"), 2, ["config", "nope.yaml", "does not exist"]),
    (
        "config of bad YAML",
        fit("--config={bad_yaml}"),
        2,
        [
            "config file {bad_yaml} is not valid YAML, line 4, column 8: while parsing a flow "
            "sequence, did not find expected ',' or ']' at line 5, column 1"
        ],
    ),
    (
        "model config file of bad YAML",
        fit("--model={model_yaml}"),
        2,
        ["model config file {model_yaml} is not valid YAML, line 4, column 5: mapping values"],
    ),
    (
        "accumulation",
        fit("--trainer.accumulate_grad_batches=4"),
        2,
        ["trainer.accumulate_grad_batches=4", "model.grad_cache_chunks=4"],
    ),
    # callbacks
    (
        "kNN bank dtype",
        fit("--trainer.callbacks+=KNNMonitor", "--trainer.callbacks.bank_dtype=float8"),
        2,
        ["bank_dtype", "float8"],
    ),
    (
        "probe lr",
        fit("--trainer.callbacks+=OnlineLinearProbe", "--trainer.callbacks.lr=0"),
        2,
        ["OnlineLinearProbe.lr=0", "> 0"],
    ),
    (
        "callback typo points to its class's settings",
        fit("--trainer.callbacks+=OnlineLinearProbe", "--trainer.callbacks.lrr=0"),
        2,
        [
            "trainer.callbacks.lrr is not a setting of simclr_lightning.OnlineLinearProbe: did "
            "you mean trainer.callbacks.lr?",
            "(settings: simclr-lightning fit --trainer.callbacks.help OnlineLinearProbe)",
        ],
    ),
    (
        "probe on unlabeled data",
        fit("--trainer.callbacks+=OnlineLinearProbe", "--data.root={unlabeled}"),
        2,
        ["OnlineLinearProbe needs labelled images", "num_classes=None"],
    ),
    (
        "kNN on unlabeled data",
        fit("--trainer.callbacks+=KNNMonitor", "--data.root={unlabeled}"),
        2,
        ["KNNMonitor needs labelled images", "num_classes=None"],
    ),
    # checkpoints
    ("resume missing", fit("--ckpt_path={missing}"), 1, ["ckpt_path=", "missing.ckpt", "exist"]),
    (
        "resume truncated",
        fit("--ckpt_path={truncated}"),
        1,
        ["ckpt_path=", "truncated.ckpt", "truncated or corrupt"],
    ),
    ("resume empty", fit("--ckpt_path={empty}"), 1, ["empty.ckpt", "is empty (0 bytes)"]),
    (
        "a logger's own refusal of its settings",
        fit(
            "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
            "--trainer.logger.offline=true",
            "--trainer.logger.log_model=true",
        ),
        2,
        [
            "trainer.logger (WandbLogger): Providing log_model=True and offline=True is an "
            "invalid configuration",
            "Hint: Set `offline=False`",
        ],
    ),  # fmt: skip
    (
        "a Lightning callback's own refusal of its settings",
        fit(
            "--trainer.callbacks+=EarlyStopping",
            "--trainer.callbacks.monitor=train/loss",
            "--trainer.callbacks.mode=maximum",
        ),
        2,
        ["trainer.callbacks (EarlyStopping): `mode` can be min, max, got maximum"],
    ),  # fmt: skip
    (
        "an overlay before the config it adds to",
        [
            "fit",
            f"--config={REPO / 'configs' / 'monitors.yaml'}",
            f"--config={REPO / 'configs' / 'quickstart.yaml'}",
        ],
        2,
        [
            "monitors.yaml appends to trainer.callbacks (callbacks+:), and --config ",
            "quickstart.yaml, given after it, sets them anew, dropping what it added: give "
            "--config ",
        ],
    ),  # fmt: skip
    (
        "an overlay before the config it adds to, with -c",
        [
            "fit",
            "-c",
            str(REPO / "configs" / "monitors.yaml"),
            "-c",
            str(REPO / "configs" / "quickstart.yaml"),
        ],
        2,
        ["monitors.yaml appends to trainer.callbacks (callbacks+:)"],
    ),  # fmt: skip
    (
        "help of a misspelt class",
        ["fit", "--model.help", "SimCLRR"],
        2,
        ["model.help='SimCLRR' is invalid: must be a class name", "did you mean SimCLR?"],
    ),
    (
        "best in a new process",
        validate("--ckpt_path=best"),
        2,
        ["ckpt_path='best' is invalid for a command", "same Python process", "or last"],
    ),
    (
        "hpc without its file",
        fit("--ckpt_path=hpc"),
        2,
        ["ckpt_path='hpc' is invalid here", "holds no hpc_ckpt_<n>.ckpt", "or last"],
    ),
    (
        "a monitor of a metric no callback of the run logs",
        fit("--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor=knn/val_top1"),
        2,
        [
            "EarlyStopping(monitor='knn/val_top1') watches a metric only KNNMonitor logs, and the "
            "run has no KNNMonitor",
            "--trainer.callbacks+=simclr_lightning.KNNMonitor",
        ],
    ),  # fmt: skip
    (
        "pretraining on single views",
        fit("--data.task=classify"),
        2,
        ["SimCLR pretrains on two augmented views", "set data.task=pretrain"],
    ),
    (
        "resume weights only",
        fit("--ckpt_path={weights}"),
        1,
        ["ckpt_path=", "weights.ckpt", "holds only the weights", "last.ckpt"],
    ),
    (
        "resume an exported encoder",
        fit("--ckpt_path={exported}"),
        1,
        ["ckpt_path=", "exported.pt", "is not a checkpoint Lightning wrote", "--model.checkpoint"],
    ),
    (
        "validate an exported encoder",
        validate("--ckpt_path={exported}"),
        1,
        ["ckpt_path=", "exported.pt", "is not a checkpoint Lightning wrote (a plain state dict"],
    ),
    (
        "eval checkpoint of text",
        evaluate("--model.checkpoint={text}"),
        1,
        ["model.checkpoint=", "text.ckpt", "truncated or corrupt"],
    ),
    (
        "eval checkpoint exported from another encoder",
        evaluate("--model.checkpoint={exported}"),
        1,
        [
            "model.checkpoint=",
            "exported.pt",
            "does not fit a resnet18",
            "keys missing, e.g.",
            "--model.backbone",
            "--model.timm_kwargs",
        ],
    ),  # fmt: skip
    (
        "eval checkpoint missing",
        evaluate("--model.checkpoint={missing}"),
        1,
        ["model.checkpoint=", "missing.ckpt", "does not exist"],
    ),
    (
        "eval checkpoint truncated",
        evaluate("--model.checkpoint={truncated}"),
        1,
        ["model.checkpoint=", "truncated.ckpt", "truncated or corrupt"],
    ),
    (
        "eval checkpoint not SimCLR",
        evaluate("--model.checkpoint={other}"),
        1,
        ["model.checkpoint=", "other.pt", "does not fit a resnet18 encoder", "--model.cifar_stem"],
    ),
    (
        "eval head_layers too deep",
        evaluate("--model.checkpoint={simclr}", "--model.head_layers=5"),
        2,
        ["model.head_layers=5", "<= 3"],
    ),
    (
        "eval num_classes unlike the data's",
        evaluate("--model.checkpoint={simclr}", "--model.num_classes=3"),
        2,
        [
            "model.num_classes=3 but the data has 10 classes (airplane, automobile, bird, cat, "
            "deer and 5 more): set --model.num_classes 10"
        ],
    ),
    (
        "test of a SimCLR checkpoint",
        ["test", *TINY, "--data.root={data}", "--ckpt_path={simclr}"],
        2,
        [
            "a SimCLR (pretraining) model has no test step for simclr-lightning test",
            "simclr-lightning fit --config configs/linear_eval.yaml --model.checkpoint {simclr},",
            "simclr-lightning test --config configs/linear_eval.yaml --ckpt_path LINEAR_CKPT",
            "--config configs/monitors.yaml --ckpt_path {simclr}",
        ],
    ),
    (
        "SimCLR checkpoint as eval --ckpt_path",
        evaluate("--ckpt_path={simclr}"),
        1,
        ["ckpt_path=", ".ckpt", "checkpoint of simclr_lightning.SimCLR", "--model.checkpoint"],
    ),
    # callbacks' and the trainer's own settings
    (
        "plot every 0 epochs",
        fit("--trainer.callbacks+=EmbeddingPlot", "--trainer.callbacks.every_n_epochs=0"),
        2,
        ["EmbeddingPlot.every_n_epochs=0 is invalid: must be >= 1"],
    ),
    (
        "predictions to a .txt file",
        fit("--trainer.callbacks+=PredictionWriter", "--trainer.callbacks.output=p.txt"),
        2,
        ["PredictionWriter.output='p.txt' is invalid", ".csv"],
    ),
    (
        "barebones with logging",
        fit("--trainer.barebones=true", "--trainer.log_every_n_steps=1"),
        2,
        ["trainer: ", "barebones=True", "log_every_n_steps=1"],
    ),
    # nothing given for a whole group, or a required setting
    ("no model", ["fit"], 2, ["model is required: give --model SimCLR", "configs/quickstart"]),
    (
        "no data",
        [
            "fit",
            "--model=SimCLR",
            "--trainer.accelerator=cpu",
            "--trainer.max_steps=1",
            "--trainer.default_root_dir={root}/nodata",
        ],  # fmt: skip
        2,
        ["data is required: give --data ImageFolderDataModule --data.root DIR"],
    ),
    (
        "no data.root",
        [
            "fit",
            "--model=SimCLR",
            "--data=ImageFolderDataModule",
            "--trainer.default_root_dir={root}/noroot",
        ],  # fmt: skip
        2,
        ["error: data.root is required"],
    ),  # fmt: skip
    # a list of loggers (the W&B overlay's) with one that refuses its settings: jsonargparse
    # reported every type trainer.logger allows, 70 lines with the list printed whole
    (
        "wandb offline with log_model",
        fit(
            f"--config={REPO / 'configs' / 'wandb.yaml'}",
            "--trainer.logger.init_args.offline=true",
            "--trainer.logger.init_args.save_dir={root}/wandb",
        ),  # fmt: skip
        2,
        ["trainer.logger (WandbLogger): Providing log_model=True and offline=True is an invalid"],
    ),
    # a loss that overflows in the first step
    (
        "NaN loss",
        fit("--model.base_lr=1e30", "--trainer.limit_train_batches=3"),
        1,
        ["train/loss is nan", "model.base_lr"],
    ),
]


def run_main(args: list[str], files: dict[str, Path], monkeypatch, capsys) -> tuple[int, str]:
    args = [a.format(**{k: str(v) for k, v in files.items()}) for a in args]
    monkeypatch.setattr(sys, "argv", ["simclr-lightning", *args])
    monkeypatch.delenv("SIMCLR_DEBUG", raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "code", "wanted"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_prints_one_line(args, code, wanted, files, monkeypatch, capsys):
    exit_code, err = run_main(args, files, monkeypatch, capsys)
    wanted = [text.format(**{k: str(v) for k, v in files.items()}) for text in wanted]
    errors = [line for line in err.splitlines() if "error:" in line]
    print(errors)  # the table of inputs and lines in the report comes from -s output
    assert "Traceback" not in err
    assert len(errors) == 1, err
    line = errors[0]
    assert line.startswith("simclr-lightning: error: "), line
    assert "Namespace(" not in line and "Given value" not in line
    for text in wanted:
        assert text in line, (text, line)
    assert exit_code == code


def test_warmup_longer_than_the_run_warns_before_training(files, monkeypatch):
    args = fit("--model.warmup_epochs=10", "--trainer.max_epochs=1")
    args = [a.format(**{k: str(v) for k, v in files.items()}) for a in args]
    with pytest.warns(UserWarning, match=r"model\.warmup_epochs=10 is longer than the run") as w:
        cli = cli_main(args)
    message = next(str(x.message) for x in w if "longer than the run" in str(x.message))
    assert "trainer.limit_train_batches" not in message
    assert "trainer.max_epochs=1 (2 optimizer steps, 1 epochs)" in message
    assert "model.warmup_epochs <= 1" in message
    assert cli.trainer.global_step == 2  # a warning: the run itself goes on


def subprocess_run(args: list[str], files: dict[str, Path], **env: str):
    args = [a.format(**{k: str(v) for k, v in files.items()}) for a in args]
    return subprocess.run(
        [sys.executable, "-m", "simclr_lightning", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        timeout=120,
    )


def test_real_process_prints_one_line_and_exit_code(files):
    """A parse error prints exactly one line; an __init__ error (after the seed and precision
    log lines) ends with exactly one error line."""
    parsed = subprocess_run(fit("--model.loss=foo"), files)
    assert parsed.returncode == 2
    assert parsed.stderr.strip().splitlines() == [
        "simclr-lightning: error: model.loss='foo' is invalid: must be one of 'ntxent', "
        "'supcon' (settings: simclr-lightning fit --model.help SimCLR)"
    ]
    built = subprocess_run(fit("--model.backbone=resnet99"), files)
    assert built.returncode == 2
    lines = built.stderr.strip().splitlines()
    assert "Traceback" not in built.stderr
    assert [line for line in lines if "error" in line.lower()] == lines[-1:]
    assert lines[-1] == (
        "simclr-lightning: error: model.backbone='resnet99' is invalid: must be one of "
        "resnet18, resnet34, resnet50 or timm:<model name>"
    )


def test_error_after_a_progress_bar_starts_its_own_line(files):
    """The bar (stdout) and the error (stderr) share a terminal: the error is not printed at
    the end of the bar's last ``\\r`` update. One pipe for both stands in for the terminal."""
    args = fit("--model.base_lr=1e30", "--trainer.limit_train_batches=3")
    args = [a.format(**{k: str(v) for k, v in files.items()}) for a in args]
    args.append("--trainer.enable_progress_bar=true")
    run = subprocess.run(
        [sys.executable, "-m", "simclr_lightning", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert run.returncode == 1
    assert "Epoch 0:" in run.stdout  # the bar ran
    errors = [line for line in run.stdout.split("\n") if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("simclr-lightning: error: train/loss is nan")


def test_simclr_debug_shows_the_traceback(files):
    run = subprocess_run(fit("--model.backbone=resnet99"), files, SIMCLR_DEBUG="1")
    assert run.returncode == 1
    assert "Traceback (most recent call last)" in run.stderr
    assert "SettingError: model.backbone='resnet99'" in run.stderr


def test_a_bug_keeps_its_traceback(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise KeyError("a bug, not a user error")

    monkeypatch.setattr("simclr_lightning.cli.cli_main", broken)
    with pytest.raises(KeyError, match="a bug"):
        main()
    assert "error:" not in capsys.readouterr().err


def test_devices_that_do_not_match_torchrun_are_one_line(files, monkeypatch, capsys):
    """torchrun --nproc_per_node 2 with --trainer.devices 1: Lightning's ValueError came as a
    traceback from every process (SLURM's --ntasks-per-node and --nodes alike)."""
    launched = dict(TORCHELASTIC_RUN_ID="x", RANK="0", GROUP_RANK="0", LOCAL_RANK="0")
    launched |= dict(LOCAL_WORLD_SIZE="2", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    for name, value in (launched | {"MASTER_PORT": "29561"}).items():
        monkeypatch.setenv(name, value)
    code, err = run_main(fit("--trainer.strategy=ddp"), files, monkeypatch, capsys)
    assert "Traceback" not in err and code == 2
    assert err.strip().splitlines()[-1] == (
        "simclr-lightning: error: You set trainer.devices=1 and trainer.num_nodes=1 in "
        "Lightning, but the product (1 * 1) does not match the world size (2)."
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine has a gpu backend")
def test_a_gpu_recipe_on_a_machine_without_one_names_the_setting(files, monkeypatch, capsys):
    """Lightning's "No supported gpu backend found!" named neither trainer.accelerator nor
    what this machine can run."""
    code, err = run_main(fit("--trainer.accelerator=gpu"), files, monkeypatch, capsys)
    assert code == 2
    assert err.splitlines()[-1] == (
        "simclr-lightning: error: trainer.accelerator='gpu' is invalid on this machine, which "
        "has no CUDA or MPS device: use --trainer.accelerator cpu, or auto (a GPU where there "
        "is one)"
    )


@pytest.mark.parametrize(
    ("setting", "owner", "package"),
    [
        ("--trainer.accelerator=tpu", "trainer.accelerator (XLAAccelerator)", "torch_xla"),
        ("--trainer.logger=MLFlowLogger", "trainer.logger (MLFlowLogger)", "mlflow"),
    ],
)
def test_a_package_a_setting_needs_is_one_line(setting, owner, package, files, monkeypatch,
                                                capsys):  # fmt: skip
    """A logger's or accelerator's missing package came as a 70-line traceback."""
    import importlib.util

    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    code, err = run_main(fit(setting), files, monkeypatch, capsys)
    assert "Traceback" not in err and code == 1
    line = err.splitlines()[-1]
    assert line.startswith(f"simclr-lightning: error: {owner}: needs {package}>="), line
    need = line.split("needs ")[1].split(",")[0]  # the version is Lightning's to require
    assert line.endswith(f"which is not installed here: pip install '{need}', or choose another")


def test_a_mistyped_strategy_is_given_the_close_name(files, monkeypatch, capsys):
    code, err = run_main(fit("--trainer.strategy=dpp"), files, monkeypatch, capsys)
    assert code == 2
    line = err.splitlines()[-1]
    assert line.startswith(
        "simclr-lightning: error: trainer.strategy='dpp' is invalid: did you mean ddp? give "
        "auto, ddp, "
    )
    assert "ddp_spawn_find_unused" not in line and "or a Strategy class" in line
