"""Labelled subsets for semi-supervised fine-tuning (SimCLR's Table 7 protocol: 1% / 10% of the
ImageNet labels), drawn the same way on every rank."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from simclr_lightning.errors import SettingError, require


def dataset_labels(dataset: Dataset) -> list[int]:
    """The class of every image, without decoding any (torchvision's ``targets``, an idx file's
    ``labels``)."""
    for attr in ("targets", "labels"):
        labels = getattr(dataset, attr, None)
        if labels is not None:
            return [int(y) for y in labels]
    raise SettingError(
        f"data.label_fraction needs a labelled dataset; {type(dataset).__name__} has no labels"
    )


def class_balanced_subset(labels: Sequence[int], fraction: float, seed: int) -> list[int]:
    """Indices of ``fraction`` of each class's images (at least one per class), chosen by a
    ``seed``-ed permutation within each class: the same subset on every rank and every run."""
    require(0 < fraction <= 1, "data.label_fraction", fraction, "in (0, 1]")
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        if label >= 0:
            by_class.setdefault(label, []).append(index)
    generator = torch.Generator().manual_seed(seed)
    keep: list[int] = []
    for label in sorted(by_class):
        members = by_class[label]
        order = torch.randperm(len(members), generator=generator).tolist()
        count = max(1, round(fraction * len(members)))
        keep += [members[i] for i in order[:count]]
    return sorted(keep)


def listed_subset(dataset: Dataset, list_file: str) -> list[int]:
    """Indices of the images whose file names are listed in ``list_file`` (one per line), such
    as google-research/simclr's ``imagenet_subsets/1percent.txt``."""
    path = Path(list_file)
    require(path.is_file(), "data.label_subset", list_file, "an existing text file of file names")
    wanted = {line.strip() for line in path.read_text().splitlines() if line.strip()}
    samples = getattr(dataset, "samples", None)
    require(samples is not None, "data.label_subset", list_file, "used with an image folder")
    keep = [i for i, (file, _) in enumerate(samples) if Path(file).name in wanted]
    require(bool(keep), "data.label_subset", list_file, "a list naming images of data.root/train")
    return keep
