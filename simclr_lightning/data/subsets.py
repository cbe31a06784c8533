"""Which images a run uses, drawn the same way on every rank: seeded class-balanced orders of a
validation split, labelled training subsets for semi-supervised fine-tuning (SimCLR's
Table 7 protocol: 1% / 10% of the ImageNet labels), and what a file that cannot be decoded
gives with ``data.skip_corrupt``: a substitute in training, no row in evaluation."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Subset, default_collate

from simclr_lightning.data.corrupt import SkipCorrupt
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
    as google-research/simclr's ``imagenet_subsets/1percent.txt``. Names are matched without
    their folder, so a listed name that matches no file, or several (in different classes),
    is warned about: either means the list is not of this folder."""
    path = Path(list_file)
    require(path.is_file(), "data.label_subset", list_file, "an existing text file of file names")
    wanted = {line.strip() for line in path.read_text().splitlines() if line.strip()}
    samples = getattr(dataset, "samples", None)
    require(samples is not None, "data.label_subset", list_file, "used with an image folder")
    keep = [i for i, (file, _) in enumerate(samples) if Path(file).name in wanted]
    require(bool(keep), "data.label_subset", list_file, "a list naming images of data.root/train")
    counts = Counter(Path(samples[i][0]).name for i in keep)
    unmatched = sorted(wanted - set(counts))
    repeated = sorted(name for name, count in counts.items() if count > 1)
    if unmatched or repeated:
        rank_zero_warn(
            f"data.label_subset={list_file!r}: {name_problems(unmatched, repeated, counts)}"
        )
    return keep


def name_problems(unmatched: list[str], repeated: list[str], counts: Counter) -> str:
    """One line on the listed names that match no file and those that match several."""
    parts = []
    if unmatched:
        parts.append(
            f"{len(unmatched)} of its names match no image of data.root/train "
            f"(e.g. {unmatched[0]!r}) and are not trained on"
        )
    if repeated:
        parts.append(
            f"{len(repeated)} match more than one image (e.g. {repeated[0]!r}: "
            f"{counts[repeated[0]]} files), all of which are trained on"
        )
    return "; ".join(parts)


class SkipsCorruptFiles:
    """Mixin for a map-style dataset of image files whose ``read_item`` reads one sample: with
    ``skip`` set, an undecodable file's sample is replaced by :class:`SkipCorrupt`'s choice,
    or with ``leave_out`` (evaluation, :func:`leaves_out_corrupt`) is None: no row."""

    skip: SkipCorrupt | None = None
    # the indices substitutes come from (None: all); see :func:`substitutes_within`
    substitutes: Sequence[int] | None = None
    leave_out = False
    transform: Callable | None = None

    def read_item(self, index: int):
        raise NotImplementedError

    def __getitem__(self, index: int):
        if self.skip is None:
            return self.read_item(index)
        if self.leave_out:
            return self.skip.read_or_leave_out(self.read_item, index)
        return self.skip.fetch(self.read_item, index, self.substitutes)


class CollateLeavingOut:
    """An evaluation loader's ``collate_fn``: the batch of the samples that are not None (files
    left out); when all are, an empty one shaped as ``transform`` makes images (labels -1)."""

    def __init__(self, transform: Callable | None) -> None:
        self.transform = transform

    def __call__(self, samples: list) -> Any:
        kept = [sample for sample in samples if sample is not None]
        if kept:
            return default_collate(kept)
        blank = Image.new("RGB", (8, 8))
        image = self.transform(blank) if self.transform else torch.from_numpy(np.asarray(blank))
        return tuple(part[:0] for part in default_collate([(image, -1)]))


def underlying(dataset: Dataset, indices: Tensor) -> tuple[Dataset, Tensor]:
    """The dataset under any Subsets (``indices`` mapped through them) and wrappers that hold
    theirs as ``dataset`` (DDP's failure catcher, the training order's), and ``indices`` as
    indices of it; a dataset that skips bad files is not looked through."""
    inner, mapped = dataset, indices.long()
    while isinstance(inner, Subset) or (
        getattr(inner, "skip", None) is None and hasattr(inner, "dataset")
    ):
        if isinstance(inner, Subset):
            mapped = torch.as_tensor(inner.indices, dtype=torch.long)[mapped]
        inner = inner.dataset
    return inner, mapped


def left_out(dataset: Dataset, indices: Tensor) -> Tensor:
    """Mask of ``indices`` (of ``dataset``, through any Subsets and wrappers) whose files
    ``skip_corrupt`` has found bad: those an evaluation loader left out of their batch."""
    inner, mapped = underlying(dataset, indices)
    skip = getattr(inner, "skip", None)
    if skip is None:
        return torch.zeros(len(mapped), dtype=torch.bool)
    return skip.flags[mapped] > 0


def leaves_out_corrupt(dataset: Dataset) -> CollateLeavingOut | None:
    """The ``collate_fn`` of an evaluation loader over ``dataset`` (or a Subset of it), which
    from now on leaves its bad files out instead of replacing them: a validation, test or
    kNN-bank row must be of its own file (a substitute would count another image, with its
    label, twice) and a prediction row too. None (the default collate) for other datasets.

    Rows are dropped from their batch; ``distributed.sample_positions`` takes the left-out
    files' positions out of the batch's (:func:`left_out`), so the rows after them, a DDP
    padding repeat too, keep their own."""
    inner = dataset
    while isinstance(inner, Subset):
        inner = inner.dataset
    if not isinstance(inner, SkipsCorruptFiles) or inner.skip is None:
        return None
    inner.leave_out = True
    return CollateLeavingOut(inner.transform)


def substitutes_within(dataset: Dataset, indices: list[int]) -> list[int]:
    """``indices``, the only images of ``dataset`` a loader will index (a labelled subset),
    once a dataset that skips bad files draws their substitutes from them alone: an image
    outside the subset, and its label, must not be served in a bad one's place."""
    if isinstance(dataset, SkipsCorruptFiles):
        dataset.substitutes = tuple(indices)
    return indices


def labelled_record(data: Any) -> dict | None:
    """The settings that choose a data module's labelled training images, for its
    checkpoints (a list file by its contents, wherever it lies); None where it trains on
    every image (``label_fraction`` 1 too)."""
    subset, fraction = getattr(data, "label_subset", None), getattr(data, "label_fraction", None)
    if subset is not None:
        try:
            return {"label_subset": hashlib.sha1(Path(subset).read_bytes()).hexdigest()}
        except OSError:  # read when the subset is drawn, which says what is wrong
            return {"label_subset": str(subset)}
    if fraction is None or fraction == 1:
        return None
    return {"label_fraction": fraction, "label_seed": data.label_seed}


def check_same_labels(state: dict, now: dict | None, trainer: Any) -> None:
    """Refuse a resume that would train on other labelled images than its checkpoint's run
    (whose data module ``state`` records them; older checkpoints do not): a semi-supervised
    result is the protocol's on one subset (another ``label_seed`` drew 16 of 40 images from
    outside it, in silence). A fit only: test, validate and predict train on nothing."""
    fitting = getattr(getattr(trainer, "state", None), "fn", "fit") == "fit"  # (no Trainer)
    if not fitting or "labelled" not in state or state["labelled"] == now:
        return

    def said(record: dict | None) -> str:
        if record is None:
            return "every training image"
        if "label_subset" in record:
            return f"a data.label_subset list (sha1 {record['label_subset'][:12]})"
        return ", ".join(f"data.{key}={value!r}" for key, value in record.items())

    raise SettingError(
        f"the checkpoint's run trained on {said(state['labelled'])}, this one would on "
        f"{said(now)}: resume with the checkpoint's labelled images (its settings), or start "
        f"a new run"
    )
