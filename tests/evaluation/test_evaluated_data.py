"""A trained classifier is tested, validated and used on data like its training's: other
classes were scored against the wrong ones (ImageFolder numbers classes by their sorted names,
so one class fewer shifted every label after it) and other preprocessing lost accuracy, both
without a word; and the encoder's settings a checkpoint overrides are said to be ignored."""

from __future__ import annotations

import warnings

import pytest
import torch
from PIL import Image

from simclr_lightning import LinearEval
from simclr_lightning.errors import SettingError
from tests.evaluation.test_normalisation import CIFAR, data
from tests.helpers import quiet_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def image_folder(root, classes: tuple[str, ...]):
    gen = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for label in classes:
            (root / split / label).mkdir(parents=True)
            for i in range(4):
                pixels = torch.randint(0, 256, (16, 16, 3), generator=gen, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(root / split / label / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A LinearEval checkpoint trained on classes a, b, c at 16 px with CIFAR statistics."""
    root = image_folder(tmp_path_factory.mktemp("abc"), ("a", "b", "c"))
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(LinearEval(num_classes=3, lr=0.1), data(root, CIFAR, task="classify"))
    path = root / "linear.ckpt"
    trainer.save_checkpoint(path)
    return root, path


def evaluated(path, datamodule, command: str = "test") -> tuple[list[str], dict]:
    """The warnings and figures of ``command`` of the checkpoint at ``path``."""
    trainer = quiet_trainer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = getattr(trainer, command)
        run(LinearEval(num_classes=3), datamodule=datamodule, ckpt_path=path, weights_only=False)
    said = [str(w.message) for w in caught if "classifier" in str(w.message)]
    return said, dict(trainer.callback_metrics)


def test_the_classifiers_own_data_is_tested_quietly(classifier):
    root, path = classifier
    said, figures = evaluated(path, data(root, CIFAR, task="classify"))
    assert said == [] and "test/top1" in figures


@pytest.mark.parametrize("command", ["test", "validate"])
def test_data_with_another_number_of_classes_is_refused(classifier, tmp_path,
                                                        command):  # fmt: skip
    _, path = classifier
    two = image_folder(tmp_path, ("b", "c"))
    with pytest.raises(SettingError, match=(
        rf"^the classifier has 3 classes \(a, b, c\) but the {command} data has 2 \(b, c\): "
        r"its labels would be scored against other classes"
    )):  # fmt: skip
        evaluated(path, data(two, CIFAR, task="classify"), command)


def test_classes_in_another_order_are_refused(classifier):
    root, path = classifier
    reordered = data(root, CIFAR, task="classify")
    reordered.setup("test")
    reordered.val_set.classes = ["b", "a", "c"]  # a dataset of a user's, numbered otherwise
    with pytest.raises(SettingError, match=r"test data's class 0 is 'b', the classifier's class 1"):
        evaluated(path, reordered)


@pytest.mark.parametrize("command", ["test", "validate"])
def test_a_renamed_class_that_shifts_the_others_is_refused(classifier, tmp_path, command):
    """Folder ``a`` renamed ``d``: the sorted classes are b, c, d, so b's images were scored
    as the classifier's a with no error (test/top1 near 0 for a good classifier)."""
    _, path = classifier
    bcd = image_folder(tmp_path, ("b", "c", "d"))
    with pytest.raises(SettingError, match=(
        rf"^the {command} data's class 0 is 'b', the classifier's class 1: its labels would be "
        r"scored against other classes \(the data's: b, c, d; the classifier's: a, b, c\)"
    )):  # fmt: skip
        evaluated(path, data(bcd, CIFAR, task="classify"), command)


def test_classes_named_otherwise_are_scored_by_number_with_a_warning(classifier, tmp_path):
    _, path = classifier
    abd = image_folder(tmp_path, ("a", "b", "d"))
    said, figures = evaluated(path, data(abd, CIFAR, task="classify"))
    assert said == [
        "the test data's classes (a, b, d) are not the ones the classifier was trained on "
        "(a, b, c): they are scored by number, class 0 as 'a' and so on"
    ]
    assert "test/top1" in figures


def test_display_names_are_not_compared_with_the_data(classifier, tmp_path):
    """model.class_names may name the data's folders for people (n01440764 as tench): the
    classifier's own data is tested quietly, and predictions carry the display names."""
    root, _ = classifier
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    model = LinearEval(num_classes=3, class_names=["Ant", "Bee", "Cat"])
    trainer.fit(model, data(root, CIFAR, task="classify"))
    trainer.save_checkpoint(tmp_path / "named.ckpt")
    said, figures = evaluated(tmp_path / "named.ckpt", data(root, CIFAR, task="classify"))
    assert said == [] and "test/top1" in figures
    loaded = torch.load(tmp_path / "named.ckpt", weights_only=False)["linear_eval"]
    assert loaded["class_names"] == ["Ant", "Bee", "Cat"]
    assert loaded["data_class_names"] == ["a", "b", "c"]


def test_one_class_is_refused_without_advising_num_classes_1(tmp_path):
    """The count check said "set --model.num_classes 1", which LinearEval then refused."""
    one = image_folder(tmp_path, ("cats",))
    with pytest.raises(SettingError, match=(
        r"^the data has 1 class \(cats\): a classifier needs images of at least 2 classes"
    )):  # fmt: skip
        quiet_trainer(max_steps=1).fit(LinearEval(num_classes=3), data(one, CIFAR, task="classify"))


@pytest.mark.parametrize("command", ["test", "predict"])
def test_data_prepared_otherwise_warns_naming_the_settings(classifier, command):
    root, path = classifier
    said, _ = evaluated(path, data(root, None, task="classify", image_size=24), command)
    (message,) = said
    assert message.startswith(
        f"the classifier was trained on images prepared otherwise than the {command} data's: "
        "data.augmentation.image_size=24 (was 16); data.augmentation.mean=[0.485, 0.456, 0.406]"
        " (was [0.4914, 0.4822, 0.4465]); data.augmentation.std="
    )


def test_an_encoder_setting_the_checkpoint_overrides_is_said_to_be_ignored(tmp_path):
    from tests.test_checkpoint import save_simclr_checkpoint

    path = tmp_path / "simclr.ckpt"
    save_simclr_checkpoint(path, cifar_stem=True, in_channels=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LinearEval(str(path), num_classes=3)  # the defaults: nothing to say
        model = LinearEval(str(path), num_classes=3, backbone="resnet50", in_channels=2)
    said = [str(w.message) for w in caught if "ignored" in str(w.message)]
    assert said == [
        "model.backbone='resnet50', model.in_channels=2 ignored: the encoder is built as "
        "model.checkpoint's (backbone='resnet18', cifar_stem=True, in_channels=1, "
        "timm_kwargs=None), which its weights need"
    ]
    assert model.hparams.backbone == "resnet18" and model.hparams.in_channels == 1


def fit_warnings(model: LinearEval, root, ckpt_path=None) -> list[str]:
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0)  # a resume trains its 2nd step
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, data(root, CIFAR, task="classify"), ckpt_path=ckpt_path)
    return [str(w.message) for w in caught if str(w.message).startswith("model.")]


def test_settings_a_fit_would_ignore_are_said(classifier, tmp_path):
    """Without model.checkpoint the classifier learned on a random encoder, and backbone_lr
    without finetune trained nothing, both in silence; a resumed fit has its encoder."""
    from tests.test_checkpoint import save_simclr_checkpoint

    root, path = classifier
    assert fit_warnings(LinearEval(num_classes=3), root) == [
        "model.checkpoint is not set: LinearEval trains its classifier on a randomly initialised "
        "encoder (a baseline); give the SimCLR checkpoint to evaluate as --model.checkpoint"
    ]
    resumed = LinearEval(num_classes=3, backbone_lr=0.01)
    assert fit_warnings(resumed, root, ckpt_path=path) == [
        "model.backbone_lr=0.01 is ignored: the encoder is frozen; set model.finetune=true to "
        "train it at that rate"
    ]
    simclr = tmp_path / "simclr.ckpt"
    save_simclr_checkpoint(simclr, cifar_stem=True, in_channels=3)
    assert fit_warnings(LinearEval(str(simclr), num_classes=3, finetune=True,
                                   backbone_lr=0.01), root) == []  # fmt: skip


def test_a_checkpoint_saved_before_the_data_names_were_kept(classifier, tmp_path):
    """Without data_class_names, model.class_names may be display names: the classifier's own
    data is tested quietly (it was warned about), and its classes in another order refused."""
    root, path = classifier
    checkpoint = torch.load(path, weights_only=False)
    del checkpoint["linear_eval"]["data_class_names"]
    checkpoint["linear_eval"]["class_names"] = ["Ant", "Bee", "Cat"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    said, figures = evaluated(tmp_path / "old.ckpt", data(root, CIFAR, task="classify"))
    assert said == [] and "test/top1" in figures
    checkpoint["linear_eval"]["class_names"] = ["b", "a", "c"]
    torch.save(checkpoint, tmp_path / "old_reordered.ckpt")
    with pytest.raises(SettingError, match=r"test data's class 0 is 'a', the classifier's class 1"):
        evaluated(tmp_path / "old_reordered.ckpt", data(root, CIFAR, task="classify"))
