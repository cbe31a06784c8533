"""``load_from_checkpoint`` of another class's checkpoint names both classes: Lightning rebuilt
the model from the other class's hyperparameters, and the error was the first one refused
(``model.head_layers=2 is invalid`` for a SimCLR checkpoint loaded as LinearEval)."""

from __future__ import annotations

import sys

import pytest
import torch

from simclr_lightning import LinearEval, SimCLR
from simclr_lightning.errors import CheckpointError
from tests.helpers import quiet_trainer
from tests.test_checkpoint import save_simclr_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


class MySimCLR(SimCLR):
    """A user's subclass: it loads the library's checkpoints, which load as it too."""


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
