"""An image folder's splits share train/'s class numbering: val/ without a training class (or
train/ with an extra class) must not shift the labels of the classes sorted after it."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simclr_lightning import ImageFolderDataModule, SimCLRAugmentation
from simclr_lightning.errors import SettingError

TRAIN = ["airplane", "bird", "cat"]
# each image one flat grey, unique over the tree: a served image names its file
PLAIN = SimCLRAugmentation(image_size=8, mean=(0.0,) * 3, std=(1.0,) * 3, blur_prob=0.0)


def flat_grey_tree(root: Path, splits: dict[str, list[str]]) -> dict[int, str]:
    """Two 8x8 flat-grey PNGs per class folder of each split; the grey level -> class name."""
    owner, grey = {}, 10
    for split, classes in splits.items():
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for k in range(2):
                Image.fromarray(np.full((8, 8, 3), grey, np.uint8)).save(
                    root / split / name / f"{k}.png"
                )
                owner[grey], grey = name, grey + 10
    return owner


def served_labels(loader, owner: dict[int, str]) -> list[tuple[str, int]]:
    """(class folder of the file, label served with it) for every image the loader serves."""
    pairs = []
    for x, y in loader:
        for image, label in zip(x, y.tolist(), strict=True):
            pairs.append((owner[round(float(image.mean()) * 255)], label))
    return pairs


@pytest.mark.parametrize("task", ["pretrain", "classify"])
@pytest.mark.parametrize("stray", [False, True], ids=["val-lacks-a-class", "stray-train-folder"])
def test_validation_labels_follow_the_training_classes(tmp_path, task, stray):
    """val/ holds airplane and cat only: its cat images carry train/'s index of cat, not the
    index of bird (what numbering val/'s own folders gave). A training class sorted first
    that val/ lacks (aardvark): val/ must number past it as train/ does. (Hidden folders, such
    as Jupyter's, are none, and an empty one is refused: tests/data/test_folder_layout.py.)"""
    train = ["aardvark", *TRAIN] if stray else TRAIN
    owner = flat_grey_tree(tmp_path, {"train": train, "val": ["airplane", "cat"]})
    dm = ImageFolderDataModule(
        str(tmp_path), augmentation=PLAIN, task=task, batch_size=2, num_workers=0
    )
    lacking = "aardvark, bird" if stray else "bird"
    with pytest.warns(UserWarning, match=f"has no folder for training class\\(es\\) {lacking}"):
        dm.setup("fit")
    expected = {name: sorted(train).index(name) for name in train}  # independent of the code
    # every loader that serves the held-out split (validation, test and KNNReport) and the
    # kNN bank's training split
    for loader in (dm.val_dataloader(), dm.test_dataloader(), dm.eval_train_dataloader()):
        pairs = served_labels(loader, owner)
        assert pairs and all(label == expected[name] for name, label in pairs)
    val_pairs = sorted(served_labels(dm.test_dataloader(), owner))
    airplane, cat = expected["airplane"], expected["cat"]
    assert val_pairs == [("airplane", airplane)] * 2 + [("cat", cat)] * 2
    if not stray:
        assert (airplane, cat) == (0, 2)  # val/'s own numbering gave cat 1: bird's index
    assert dm.val_set.classes == sorted(train)  # predictions name train/'s classes


def test_a_validation_class_training_lacks_is_an_error(tmp_path):
    flat_grey_tree(tmp_path, {"train": TRAIN, "val": ["airplane", "cat", "dog"]})
    dm = ImageFolderDataModule(str(tmp_path), augmentation=PLAIN, batch_size=2, num_workers=0)
    message = (
        f"data.root='{tmp_path}': {tmp_path / 'val' / 'dog'} is not a class of train/: val/ may "
        f"only hold the training classes (airplane, bird, cat)"
    )
    with pytest.raises(SettingError) as err:
        dm.setup("fit")
    assert str(err.value) == message


def test_a_missing_validation_class_is_warned_about_once(tmp_path):
    flat_grey_tree(tmp_path, {"train": TRAIN, "val": ["airplane", "cat"]})
    dm = ImageFolderDataModule(
        str(tmp_path), augmentation=PLAIN, batch_size=2, num_workers=0, verify=True
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")  # verify reads val/ too, then setup builds it
        dm.make_dataset("val", None)
    assert [str(w.message).count("bird") for w in caught] == [1]
