"""``load_from_checkpoint`` of another class's checkpoint names both classes: Lightning rebuilt
the model from the other class's hyperparameters, and the error was the first one refused
(``model.head_layers=2 is invalid`` for a SimCLR checkpoint loaded as LinearEval)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from simclr_lightning import LinearEval, SimCLR
from simclr_lightning.errors import CheckpointError
from tests.helpers import quiet_trainer
from tests.test_checkpoint import save_simclr_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


class MySimCLR(SimCLR):
    """A user's subclass: it loads the library's checkpoints, which load as it too."""


class KwargsSimCLR(SimCLR):
    """A user's subclass that passes its arguments on: Lightning gives such an ``__init__``
    every saved hyperparameter, the recorded ``_class_path`` too."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)


# What LightningCLI records with the hyperparameters of the model it builds
CLI_RECORD = {
    "_instantiator": "lightning.pytorch.cli.instantiate_module",
    "_class_path": "simclr_lightning.SimCLR",
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("loading")
    save_simclr_checkpoint(root / "simclr.ckpt", cifar_stem=True, in_channels=3)
    model = LinearEval(str(root / "simclr.ckpt"), num_classes=3)
    trainer = quiet_trainer(max_steps=1)
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    pairs = list(zip(images, [0, 1, 2, 0], strict=True))
    trainer.fit(model, torch.utils.data.DataLoader(pairs, batch_size=4))
    trainer.save_checkpoint(root / "linear.ckpt")
    return root


def test_a_simclr_checkpoint_loaded_as_linear_eval_says_how_to_evaluate_it(checkpoints):
    path = checkpoints / "simclr.ckpt"
    with pytest.raises(CheckpointError, match=(
        rf"^checkpoint_path='{path}' is a checkpoint of simclr_lightning.module.SimCLR, not of "
        rf"LinearEval: load it with SimCLR.load_from_checkpoint; to evaluate its encoder give it "
        rf"as LinearEval\(checkpoint='{path}'\)$"
    )):  # fmt: skip
        LinearEval.load_from_checkpoint(path)


def test_a_linear_eval_checkpoint_loaded_as_simclr_names_its_class(checkpoints):
    with pytest.raises(CheckpointError, match=(
        r"is a checkpoint of simclr_lightning.evaluation.linear_eval.LinearEval, not of SimCLR: "
        r"load it with LinearEval.load_from_checkpoint$"
    )):  # fmt: skip
        SimCLR.load_from_checkpoint(checkpoints / "linear.ckpt")


def test_own_and_related_classes_load(checkpoints):
    simclr = SimCLR.load_from_checkpoint(checkpoints / "simclr.ckpt")
    mine = MySimCLR.load_from_checkpoint(checkpoints / "simclr.ckpt")
    assert type(mine) is MySimCLR
    for name, weight in simclr.state_dict().items():
        torch.testing.assert_close(mine.state_dict()[name], weight)
    linear = LinearEval.load_from_checkpoint(checkpoints / "linear.ckpt")
    assert linear.head.weight.any()  # trained: the loaded weights, not the zero init


def test_a_class_path_a_checkpoint_names_is_not_imported(checkpoints, tmp_path, monkeypatch):
    """The class check imported the module a checkpoint's ``_class_path`` named: a file could
    run code on load, which Lightning's own check (imported modules only) guards against."""
    (tmp_path / "planted_module.py").write_text(
        f"open({str(tmp_path / 'ran')!r}, 'w').close()\nclass X:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    checkpoint = torch.load(checkpoints / "simclr.ckpt", weights_only=False)
    checkpoint["hyper_parameters"]["_class_path"] = "planted_module.X"
    torch.save(checkpoint, tmp_path / "planted.ckpt")
    SimCLR.load_from_checkpoint(tmp_path / "planted.ckpt")  # Lightning ignores the name here
    assert not (tmp_path / "ran").exists() and "planted_module" not in sys.modules


def test_called_on_an_instance_it_still_refuses(checkpoints):
    """A plain classmethod over Lightning's restricted one loaded a new model and dropped it:
    ``model.load_from_checkpoint(path)`` left ``model`` untrained without a word."""
    model = LinearEval(num_classes=3)
    with pytest.raises(TypeError, match="cannot be called on an instance"):
        model.load_from_checkpoint(checkpoints / "linear.ckpt")


def test_a_subclass_taking_kwargs_reloads_its_own_checkpoint(tmp_path):
    """SimCLR refused the ``_class_path`` the checkpoint records: ``TypeError: unexpected
    keyword argument '_class_path'``."""
    saved = save_simclr_checkpoint(tmp_path / "own.ckpt", False, 3, cls=KwargsSimCLR)
    loaded = KwargsSimCLR.load_from_checkpoint(tmp_path / "own.ckpt")
    assert type(loaded) is KwargsSimCLR and loaded.hparams.head_output_dim == 8
    for name, weight in saved.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], weight)
    assert type(SimCLR.load_from_checkpoint(tmp_path / "own.ckpt")) is SimCLR


@pytest.mark.parametrize("cls", [MySimCLR, KwargsSimCLR])
def test_subclasses_load_a_checkpoint_the_cli_wrote(checkpoints, tmp_path, cls):
    """Lightning builds a CLI checkpoint through its instantiator, which refused any class but
    the recorded one and its subclasses: ``The class 'simclr_lightning.SimCLR' requested by
    the checkpoint does not resolve to an already imported subclass of MySimCLR``."""
    checkpoint = torch.load(checkpoints / "simclr.ckpt", weights_only=False)
    checkpoint["hyper_parameters"].update(CLI_RECORD)
    torch.save(checkpoint, tmp_path / "cli.ckpt")
    loaded = cls.load_from_checkpoint(tmp_path / "cli.ckpt")
    assert type(loaded) is cls and loaded.hparams.cifar_stem
    for name, weight in checkpoint["state_dict"].items():
        torch.testing.assert_close(loaded.state_dict()[name], weight)
    assert type(SimCLR.load_from_checkpoint(tmp_path / "cli.ckpt")) is SimCLR


def test_kwargs_subclasses_it_cannot_name_still_load(checkpoints, tmp_path):
    """A class defined in a function, or one a script recorded as ``__main__.Kw`` and another
    process imports from its module: Lightning passed the recorded ``_class_path`` to their
    ``**kwargs`` (``TypeError: unexpected keyword argument '_class_path'``)."""

    class Local(SimCLR):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)

    saved = save_simclr_checkpoint(tmp_path / "local.ckpt", False, 3, cls=Local)
    loaded = Local.load_from_checkpoint(tmp_path / "local.ckpt", map_location="cpu")
    assert type(loaded) is Local
    for name, weight in saved.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], weight)
    checkpoint = torch.load(checkpoints / "simclr.ckpt", weights_only=False)
    for record in (CLI_RECORD, {"_class_path": "__main__.KwargsSimCLR"}):
        checkpoint["hyper_parameters"].update(record)
        torch.save(checkpoint, tmp_path / "other.ckpt")
        for cls in (Local, KwargsSimCLR):
            loaded = cls.load_from_checkpoint(tmp_path / "other.ckpt", temperature=0.7)
            assert type(loaded) is cls and loaded.hparams.cifar_stem
            assert loaded.hparams.temperature == 0.7  # an override still applies
            torch.testing.assert_close(
                loaded.state_dict()["backbone.conv1.weight"],
                checkpoint["state_dict"]["backbone.conv1.weight"],
            )


def test_loggers_get_the_architecture_linear_eval_read_from_its_checkpoint(tmp_path):
    """Lightning logs ``hparams_initial``, taken before the checkpoint's architecture was read:
    an evaluation of a 1-channel, ImageNet-stem encoder was logged as the defaults (CIFAR
    stem, 3 channels), where the model and its own checkpoints had the right ones."""
    from lightning.pytorch.loggers import CSVLogger

    save_simclr_checkpoint(tmp_path / "simclr.ckpt", cifar_stem=False, in_channels=1)
    model = LinearEval(str(tmp_path / "simclr.ckpt"), num_classes=3)
    assert model.backbone.conv1.weight.shape == (64, 1, 7, 7)
    logger = CSVLogger(tmp_path / "logs")
    logger.log_hyperparams(model.hparams_initial)
    logger.save()
    logged = (Path(logger.log_dir) / "hparams.yaml").read_text()
    assert "cifar_stem: false" in logged and "in_channels: 1" in logged
