"""Which images a run uses, drawn the same way on every rank: seeded class-balanced orders of a
validation split, and labelled training subsets for semi-supervised fine-tuning (SimCLR's
Table 7 protocol: 1% / 10% of the ImageNet labels)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from simclr_lightning.errors import SettingError, require


def dataset_labels(dataset: Dataset) -> Tensor | None:
    """Every label of a dataset without reading its images (``targets`` of torchvision's
    datasets, ``labels`` of the idx datasets), or None when it keeps none."""
    for attr in ("targets", "labels"):
        labels = getattr(dataset, attr, None)
        if labels is not None and len(labels) == len(dataset):
            return torch.as_tensor(labels, dtype=torch.long)
    return None


def stratified_order(labels: Tensor, seed: int) -> Tensor:
    """A seeded random order of ``range(len(labels))`` that interleaves the classes in
    proportion to their sizes: every prefix is a class-balanced random sample of the whole
    split (within one image per class), so a validation pass cut short (``limit_val_batches``)
    still sees every class, never only the first classes of a sorted folder."""
    generator = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(len(labels), generator=generator)
    labels = labels[shuffled]
    # Image j of its class (in the shuffled order) is placed at (j + 0.5) / class size: equal
    # keys, one per class and round, keep the random order among them (stable sort).
    key = torch.empty(len(labels), dtype=torch.float64)
    for label in labels.unique():
        where = (labels == label).nonzero().squeeze(1)
        key[where] = (torch.arange(len(where), dtype=torch.float64) + 0.5) / len(where)
    return shuffled[key.argsort(stable=True)]


def class_balanced_subset(dataset: Dataset, fraction: float, seed: int) -> list[int]:
    """Indices of ``fraction`` of each class's images (at least one per class), chosen by a
    ``seed``-ed permutation within each class: the same subset on every rank and every run."""
    require(0 < fraction <= 1, "data.label_fraction", fraction, "in (0, 1]")
    labels = dataset_labels(dataset)
    if labels is None:
        raise SettingError(
            f"data.label_fraction needs labelled data; {type(dataset).__name__} has no labels"
        )
    generator = torch.Generator().manual_seed(seed)
    keep: list[int] = []
    for label in labels.unique().tolist():
        if label < 0:  # unlabeled images are never part of a labelled subset
            continue
        members = (labels == label).nonzero().squeeze(1)
        order = torch.randperm(len(members), generator=generator)
        count = max(1, round(fraction * len(members)))
        keep += members[order[:count]].tolist()
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
