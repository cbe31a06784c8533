"""One item of a data module's dataset as stored, before its transform: what a figure shows.

A dataset's ``__getitem__`` gives normalised (or augmented) tensors, and each kind of dataset
keeps its pixels elsewhere (files, a uint8 array, a tensor), so code that shows images must not
depend on which data module made them.
"""

from __future__ import annotations

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets

from simclr_lightning.data.corrupt import load_rgb
from simclr_lightning.data.folders import UnlabeledImages
from simclr_lightning.data.image_files import ImageFiles
from simclr_lightning.data.mnist import IdxImages
from simclr_lightning.data.subsets import underlying

UNLABELED = -1  # the label the library's unlabeled datasets serve


def raw_image(dataset: Dataset, index: int) -> tuple[Image.Image, int]:
    """Item ``index`` of ``dataset`` untransformed: its RGB image and label (-1: unlabeled).

    Reads image folders (the bundled sample's too), image files, torchvision's CIFAR-10/100
    and the MNIST/Fashion-MNIST idx datasets (grayscale, converted to RGB), through
    ``Subset`` wrappers; anything else is a ``TypeError``.
    """
    dataset, indices = underlying(dataset, torch.tensor([index]))
    index = int(indices[0])
    if isinstance(dataset, datasets.CIFAR10):  # CIFAR100 is one too
        return Image.fromarray(dataset.data[index]), int(dataset.targets[index])
    if isinstance(dataset, IdxImages):
        pixels = dataset.images[index, 0].numpy()
        return Image.fromarray(pixels).convert("RGB"), int(dataset.labels[index])
    if isinstance(dataset, datasets.ImageFolder):
        path, label = dataset.samples[index]
        return load_rgb(path), int(label)
    if isinstance(dataset, (UnlabeledImages, ImageFiles)):
        return load_rgb(dataset.files[index]), UNLABELED
    raise TypeError(
        f"raw_image: a {type(dataset).__name__} keeps no images it can read; it reads image "
        f"folders, image files, CIFAR-10/100 and MNIST/Fashion-MNIST (through Subsets)"
    )
