"""Labelled subsets for semi-supervised fine-tuning: class-balanced, seeded, identical on every
rank, or given by a file list as google-research/simclr's imagenet_subsets/*.txt."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from simclr_lightning import ImageFolderDataModule, SimCLRAugmentation
from simclr_lightning.data.subsets import class_balanced_subset


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
    labels = [i % 3 for i in range(30)]
    picks = [class_balanced_subset(labels, 0.5, seed) for seed in range(20)]
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
