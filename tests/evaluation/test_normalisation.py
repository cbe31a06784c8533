"""Linear evaluation prepares images as pretraining did: SimCLR checkpoints record the data's
normalisation and image size, and LinearEval warns when its data differs (a frozen encoder then
sees inputs unlike any it learned on, and accuracy drops with no error)."""

from __future__ import annotations

import warnings

import pytest
import torch
from PIL import Image

from simclr_lightning import ImageFolderDataModule, LinearEval, SimCLR, SimCLRAugmentation
from tests.helpers import quiet_trainer

pytestmark = pytest.mark.usefixtures("one_thread")

CIFAR = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))  # not the ImageNet defaults
MISMATCH = "was pretrained on images prepared otherwise"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """2 classes of 6 random 16 px images each, in train/ and val/."""
    root = tmp_path_factory.mktemp("norm")
    gen = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(6):
                pixels = torch.randint(0, 256, (16, 16, 3), generator=gen, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(root / split / label / f"{i}.png")
    return root


def data(root, stats, task: str = "pretrain", image_size: int = 16) -> ImageFolderDataModule:
    mean, std = stats if stats else (None, None)
    aug = SimCLRAugmentation(image_size=image_size, mean=mean, std=std)
    return ImageFolderDataModule(str(root), augmentation=aug, batch_size=4, task=task)


@pytest.fixture(scope="module")
def pretrained(folder, tmp_path_factory):
    """A SimCLR checkpoint of 1 step on data normalised with CIFAR-10's statistics."""
    path = tmp_path_factory.mktemp("ckpt") / "simclr.ckpt"
    model = SimCLR(head_hidden_dim=16, head_output_dim=8, optimizer="sgd", warmup_epochs=0)
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(model, data(folder, CIFAR))
    trainer.save_checkpoint(path)
    return path


def linear_eval_warnings(checkpoint, folder, stats, image_size: int = 16) -> list[str]:
    """The preparation warnings of one LinearEval step from ``checkpoint`` on ``folder``."""
    model = LinearEval(str(checkpoint), num_classes=2, lr=0.1)
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, data(folder, stats, task="classify", image_size=image_size))
    return [str(w.message) for w in caught if MISMATCH in str(w.message)]


def test_a_pretraining_checkpoint_records_the_datas_normalisation(pretrained):
    record = torch.load(pretrained, weights_only=True)["pretraining"]["preprocessing"]
    assert record["mean"] == pytest.approx(list(CIFAR[0]))
    assert record["std"] == pytest.approx(list(CIFAR[1]))


def test_linear_eval_with_pretrainings_normalisation_is_quiet(pretrained, folder):
    assert linear_eval_warnings(pretrained, folder, CIFAR) == []


def test_linear_eval_with_other_normalisation_warns_naming_both(pretrained, folder):
    (message,) = linear_eval_warnings(pretrained, folder, None)  # ImageNet's defaults
    assert f"model.checkpoint={str(pretrained)!r}" in message
    # ImageNet's, the data module's default, and pretraining's
    assert "data.augmentation.mean=[0.485, 0.456, 0.406] (was [0.4914, 0.4822, 0.4465])" in message
    assert "data.augmentation.std=" in message and "image_size" not in message


def test_statistics_quoted_to_more_digits_are_the_same(pretrained, folder):
    """CIFAR-10's statistics to 8 digits against the 4 of pretraining: the warning named
    values it printed as equal."""
    eight = ((0.49139968, 0.48215827, 0.44653124), (0.24703233, 0.24348505, 0.26158768))
    assert linear_eval_warnings(pretrained, folder, eight) == []


def test_linear_eval_at_another_image_size_warns(pretrained, folder):
    """An encoder pretrained on 16 px crops evaluated at 24 px: only the normalisation was
    compared before, and the 224 px default on a 32 px CIFAR encoder said nothing."""
    (message,) = linear_eval_warnings(pretrained, folder, CIFAR, image_size=24)
    assert "data.augmentation.image_size=24 (was 16)" in message and "mean" not in message


def test_a_linear_eval_checkpoint_keeps_the_record_for_the_next_evaluation(
    pretrained, folder, tmp_path
):
    model = LinearEval(str(pretrained), num_classes=2, lr=0.1)
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(model, data(folder, CIFAR, task="classify"))
    trainer.save_checkpoint(tmp_path / "linear.ckpt")
    (message,) = linear_eval_warnings(tmp_path / "linear.ckpt", folder, None)
    assert "(was [0.4914, 0.4822, 0.4465])" in message


def test_a_checkpoint_without_the_record_is_not_checked(pretrained, folder, tmp_path):
    """Checkpoints from before the record (and plain state dicts) have nothing to compare."""
    ckpt = torch.load(pretrained, weights_only=True)
    del ckpt["pretraining"]
    torch.save(ckpt, tmp_path / "old.ckpt")
    assert linear_eval_warnings(tmp_path / "old.ckpt", folder, None) == []
