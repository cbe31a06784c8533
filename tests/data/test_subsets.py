"""Which images a run uses: validation served in a seeded class-stratified order (so whatever
part of it a run uses, data.val_subset or trainer.limit_val_batches, is a class-balanced random
sample), and labelled training subsets for semi-supervised fine-tuning: class-balanced, seeded,
identical on every rank, or given by a file list as google-research/simclr's
imagenet_subsets/*.txt."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch

from simclr_lightning import ImageFolderDataModule, SimCLRAugmentation
from simclr_lightning.data.subsets import class_balanced_subset, stratified_order
from tests.helpers import quiet_trainer


def test_every_prefix_is_class_balanced():
    sizes = [50, 30, 20, 7]
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(3))]
    order = stratified_order(labels, seed=0)
    assert sorted(order.tolist()) == list(range(len(labels)))  # each image once
    total = len(labels)
    for m in range(1, total + 1):  # brute force over every prefix
        seen = torch.bincount(labels[order[:m]], minlength=len(sizes)).tolist()
        for c, n in enumerate(sizes):
            assert abs(seen[c] - m * n / total) <= 1.0, (m, c, seen)
    assert torch.equal(order, stratified_order(labels, seed=0))
    assert not torch.equal(order, stratified_order(labels, seed=1))
    # random within a class: not the class's images in their dataset order
    first = [i for i in order.tolist() if labels[i] == 0]
    assert first != sorted(first)


class LabelRecorder(L.Callback):
    def __init__(self) -> None:
        self.labels: list[int] = []

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ):
        self.labels += batch[1].tolist()


class Encoder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def validation_step(self, batch, batch_idx):
        return None


def test_limit_val_batches_sees_every_class(cifar_tiny):
    """The sorted folder starts with 10 airplanes; one batch of 10 must hold all 10 classes."""
    views = SimCLRAugmentation(image_size=32)
    data = ImageFolderDataModule(str(cifar_tiny), batch_size=10, num_workers=0, augmentation=views)
    recorder = LabelRecorder()
    quiet_trainer(limit_val_batches=1, callbacks=[recorder]).validate(Encoder(), data)
    assert sorted(recorder.labels) == list(range(10))


def test_val_subset_is_balanced_and_test_keeps_the_whole_split(cifar_tiny):
    data = ImageFolderDataModule(str(cifar_tiny), batch_size=8, num_workers=0, val_subset=20)
    data.setup("validate")
    labels = torch.cat([y for _, y in data.val_dataloader()])
    assert torch.bincount(labels).tolist() == [2] * 10
    # test: the whole split (no val_subset cut) in validation's order, not the folder's
    test_labels = torch.cat([y for _, y in data.test_dataloader()])
    assert torch.bincount(test_labels).tolist() == [10] * 10
    assert torch.equal(test_labels[:20], labels)
    assert sorted(test_labels[:10].tolist()) == list(range(10))


# -- labelled subsets for semi-supervised fine-tuning -------------------------------------------


def folder_module(root: Path, **kwargs) -> ImageFolderDataModule:
    aug = SimCLRAugmentation(image_size=32)
    return ImageFolderDataModule(
        str(root), task="classify", augmentation=aug, batch_size=2, num_workers=0, **kwargs
    )


@pytest.mark.parametrize(("fraction", "per_class"), [(0.1, 2), (0.25, 5), (0.01, 1), (1.0, 20)])
def test_label_fraction_keeps_that_share_of_every_class(cifar_tiny, fraction, per_class):
    data = folder_module(cifar_tiny, label_fraction=fraction)
    data.setup("fit")
    subset = data.train_set
    samples = subset.dataset.samples
    chosen = [samples[i] for i in subset.indices]
    assert Counter(label for _, label in chosen) == {c: per_class for c in range(10)}
    assert len({path for path, _ in chosen}) == len(chosen)  # no image twice


def test_label_subset_is_seeded_and_the_same_on_every_rank(cifar_tiny):
    def chosen(seed: int) -> list[int]:
        data = folder_module(cifar_tiny, label_fraction=0.25, label_seed=seed)
        data.setup("fit")
        return data.train_set.indices

    assert chosen(0) == chosen(0)  # every rank (and every run) computes the same subset
    assert chosen(0) != chosen(1)
    dataset = torch.utils.data.TensorDataset(torch.zeros(30))
    dataset.targets = [i % 3 for i in range(30)]
    picks = [class_balanced_subset(dataset, 0.5, seed) for seed in range(20)]
    counts = Counter(i for p in picks for i in p)
    assert set(counts) == set(range(30))  # a random choice, not the first images of a class


def test_label_subset_file_names_the_images(cifar_tiny, tmp_path):
    names = ["0000.jpg", "0003.jpg"]  # in every class folder of the CIFAR copy
    listing = tmp_path / "1percent.txt"
    listing.write_text("\n".join(names) + "\n")
    data = folder_module(cifar_tiny, label_subset=str(listing))
    data.setup("fit")
    chosen = [data.train_set.dataset.samples[i][0] for i in data.train_set.indices]
    assert sorted({Path(p).name for p in chosen}) == names and len(chosen) == 20


def test_subsets_are_for_classification_only(cifar_tiny, tmp_path):
    with pytest.raises(
        ValueError, match="data.label_fraction=0.1 is invalid: must be unset unless"
    ):
        ImageFolderDataModule(str(cifar_tiny), label_fraction=0.1)
    with pytest.raises(
        ValueError, match=r"data.label_fraction=0.0 is invalid: must be in \(0, 1\]"
    ):
        folder_module(cifar_tiny, label_fraction=0.0)
    data = folder_module(cifar_tiny, label_subset=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="data.label_subset=.*missing.txt"):
        data.setup("fit")


def test_label_subset_warns_of_names_matching_no_file_or_several(tmp_path):
    """Names are matched without their folder: ones matching nothing were ignored, and one
    name could pick images of several classes, without a word."""
    from PIL import Image

    for name, files in (("a", ["0", "1", "2"]), ("b", ["0", "3"])):
        (tmp_path / "train" / name).mkdir(parents=True)
        for file in files:
            Image.new("RGB", (8, 8), (int(file) * 40, 0, 0)).save(
                tmp_path / "train" / name / f"{file}.png"
            )
    listing = tmp_path / "subset.txt"
    listing.write_text("1.png\n0.png\n9.png\na/2.png\n")
    data = folder_module(tmp_path, label_subset=str(listing))
    with pytest.warns(UserWarning) as caught:
        data.setup("fit")
    said = [str(w.message) for w in caught if "data.label_subset" in str(w.message)]
    assert len(said) == 1 and "\n" not in said[0]
    assert "2 of its names match no image of data.root/train (e.g. '9.png')" in said[0]
    assert "1 match more than one image (e.g. '0.png': 2 files)" in said[0]
    chosen = sorted(data.train_set.dataset.samples[i][0] for i in data.train_set.indices)
    expected = [tmp_path / "train" / "a" / "0.png", tmp_path / "train" / "a" / "1.png"]
    assert chosen == sorted(map(str, expected + [tmp_path / "train" / "b" / "0.png"]))

    listing.write_text("1.png\n3.png\n")  # every name matches one image: no warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folder_module(tmp_path, label_subset=str(listing)).setup("fit")
    assert not [w for w in caught if "data.label_subset" in str(w.message)]


def test_a_resume_with_other_labelled_images_is_refused_before_any_step(tmp_path):
    """Resumed with another data.label_seed (or fraction), a semi-supervised fit trained on
    images outside its checkpoint's labelled subset without a word: the checkpoint did not
    record which subset it had."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from simclr_lightning import LinearEval
    from simclr_lightning.errors import SettingError
    from tests.helpers import write_png_folder

    write_png_folder(tmp_path / "images", 16, 8, splits=("train", "val"))

    def fit(ckpt_path=None, callbacks=(), **labels):
        data = ImageFolderDataModule(str(tmp_path / "images"), SimCLRAugmentation(image_size=8),
                                     batch_size=2, num_workers=0, task="classify",
                                     **({"label_fraction": 0.5} | labels))  # fmt: skip
        trainer = quiet_trainer(max_epochs=2, limit_val_batches=0, callbacks=list(callbacks),
                                enable_checkpointing=bool(callbacks))  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no model.checkpoint: a random encoder here
            trainer.fit(LinearEval(num_classes=2, cifar_stem=False), data, ckpt_path=ckpt_path)
        return trainer

    fit(callbacks=[ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=3, save_top_k=-1)])
    ckpt = tmp_path / "step=3.ckpt"
    for changed, said in [
        ({"label_seed": 7}, "data.label_fraction=0.5, data.label_seed=7"),
        ({"label_fraction": 0.25}, "data.label_fraction=0.25, data.label_seed=0"),
        ({"label_fraction": None}, "every training image"),
    ]:
        with pytest.raises(SettingError, match=(
            r"^the checkpoint's run trained on data.label_fraction=0.5, data.label_seed=0, "
            rf"this one would on {said}: resume with the checkpoint's labelled images"
        )):  # fmt: skip
            fit(ckpt, **changed)
    assert fit(ckpt).global_step == 8  # the same subset: 4 steps an epoch
    # validate and test train on nothing: the README's "fine-tune 10%, then test" (refused)
    data = ImageFolderDataModule(str(tmp_path / "images"), SimCLRAugmentation(image_size=8),
                                 batch_size=2, num_workers=0, task="classify")  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        done = quiet_trainer().validate(LinearEval(num_classes=2, cifar_stem=False), data, ckpt)
    assert "val/top1" in done[0]
    old = torch.load(ckpt, weights_only=False)
    del old["ImageFolderDataModule"]["labelled"]  # a checkpoint from before it was recorded
    torch.save(old, tmp_path / "old.ckpt")
    assert fit(tmp_path / "old.ckpt", label_seed=7).global_step == 8
