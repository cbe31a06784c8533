"""Which validation images a run looks at: seeded, class-balanced orders of a whole split."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset


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
