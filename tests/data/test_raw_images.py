"""raw_image gives the stored pixels and label of any data module's item, whatever the dataset
keeps: checked against the pixels written (or read independently), not against the library."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset, TensorDataset
from torchvision import datasets

from simclr_lightning import (
    CIFARDataModule,
    ImageFilesDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
    SampleDataModule,
    SimCLRAugmentation,
)
from simclr_lightning.data import raw_image, sample_root
from simclr_lightning.data.failed_batches import CatchFailedSamples
from simclr_lightning.data.mnist import IdxImages
from tests.helpers import check_cifar_files_against, write_cifar_batches

pytestmark = pytest.mark.filterwarnings("ignore:.*does not exist. no validation:UserWarning")

SMALL = dict(batch_size=2, num_workers=0, augmentation=SimCLRAugmentation(image_size=8))


def write_pngs(folder: Path, count: int, seed: int) -> list[np.ndarray]:
    """``count`` random 8 x 6 RGB PNGs ``0.png``..., and their pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = [rng.integers(0, 256, (6, 8, 3), dtype=np.uint8) for _ in range(count)]
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"{i}.png")
    return pixels


def assert_item(found: tuple[Image.Image, int], pixels: np.ndarray, label: int) -> None:
    image, found_label = found
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), pixels)
    assert found_label == label and type(found_label) is int


# augment gpu: the training split serves undecoded bytes, not images
@pytest.mark.parametrize("augment", ["cpu", "gpu"])
def test_image_folder_items_are_the_files_pixels_and_class(tmp_path, augment):
    cats = write_pngs(tmp_path / "train" / "cat", 3, 0)
    dogs = write_pngs(tmp_path / "train" / "dog", 2, 1)
    val = write_pngs(tmp_path / "val" / "dog", 2, 2)
    dm = ImageFolderDataModule(str(tmp_path), augment=augment, **SMALL)
    with pytest.warns(UserWarning, match="no folder for training class"):
        dm.setup("fit")
    for index, (pixels, label) in enumerate([(p, 0) for p in cats] + [(p, 1) for p in dogs]):
        assert_item(raw_image(dm.train_set, index), pixels, label)
    for index, pixels in enumerate(val):  # val/ lacks cat: dog keeps train/'s label 1
        assert_item(raw_image(dm.val_set, index), pixels, 1)
    bank = dm.eval_train_dataloader().dataset
    assert_item(raw_image(bank, 4), dogs[1], 1)


def test_subsets_map_the_index_to_the_item_they_serve(tmp_path):
    cats = write_pngs(tmp_path / "train" / "cat", 4, 0)
    dm = ImageFolderDataModule(str(tmp_path), **SMALL)
    dm.setup("fit")
    nested = Subset(Subset(dm.train_set, [3, 1, 2]), [2, 0])  # items 2 and 3
    assert_item(raw_image(nested, 0), cats[2], 0)
    assert_item(raw_image(nested, 1), cats[3], 0)
    assert_item(raw_image(Subset(dm.train_set, torch.tensor([1])), 0), cats[1], 0)
    # under DDP an evaluation loader wraps its dataset so a bad file stops every process
    assert_item(raw_image(CatchFailedSamples(nested), 1), cats[3], 0)


def test_unlabeled_images_and_image_files_have_label_minus_one(tmp_path):
    pixels = write_pngs(tmp_path / "train", 3, 0)  # images directly in train/: unlabeled
    dm = ImageFolderDataModule(str(tmp_path), **SMALL)
    dm.setup("fit")
    assert_item(raw_image(dm.train_set, 2), pixels[2], -1)
    files = ImageFilesDataModule(paths=[str(tmp_path / "train" / "1.png")], image_size=8)
    files.predict_dataloader()  # makes its dataset (the model's preprocessing is known then)
    assert_item(raw_image(files.dataset, 0), pixels[1], -1)


def test_the_bundled_sample_is_read_from_its_jpegs():
    dm = SampleDataModule(batch_size=2, num_workers=0)
    dm.setup("fit")
    for split, per_class, dataset in (
        ("train", 300, dm.train_set),
        ("val", 100, dm.val_set),
    ):
        first_bird = sorted((sample_root() / split / "bird").iterdir())[0]  # class 2 of 10
        pixels = np.asarray(Image.open(first_bird).convert("RGB"))
        assert_item(raw_image(dataset, 2 * per_class), pixels, 2)


@pytest.fixture
def cifar_dir(tmp_path, monkeypatch) -> tuple[Path, np.ndarray, list[int], np.ndarray, list[int]]:
    """A small cifar-10-batches-py/ in torchvision's pickle format (random images, stored as
    the format's CHW rows), with torchvision's md5 table pointed at these files."""
    rng = np.random.default_rng(0)
    batches = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    rows = {name: rng.integers(0, 256, (2, 3 * 32 * 32), dtype=np.uint8) for name in batches}
    labels = {name: rng.integers(0, 10, 2).tolist() for name in batches}
    written = {name: (rows[name], labels[name]) for name in batches}
    table = write_cifar_batches(tmp_path / "cifar-10-batches-py", written, list("abcdefghij"))
    check_cifar_files_against(table, monkeypatch)
    hwc = {name: rows[name].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1) for name in batches}
    train = np.concatenate([hwc[name] for name in batches[:5]])
    train_labels = [label for name in batches[:5] for label in labels[name]]
    return tmp_path, train, train_labels, hwc["test_batch"], labels["test_batch"]


@pytest.mark.parametrize("augment", ["cpu", "gpu"])  # gpu: the notebook's GPU_RUN data
def test_cifar_items_are_its_arrays(cifar_dir, augment):
    data_dir, train, train_labels, test, test_labels = cifar_dir
    dm = CIFARDataModule(str(data_dir), batch_size=2, num_workers=0, augment=augment)
    dm.setup("fit")
    for index in range(len(train)):
        assert_item(raw_image(dm.train_set, index), train[index], train_labels[index])
    bank = dm.eval_train_dataloader().dataset
    assert_item(raw_image(bank, 9), train[9], train_labels[9])
    for index in range(len(test)):
        assert_item(raw_image(dm.val_set, index), test[index], test_labels[index])


def test_cifar100_items_are_its_arrays():
    cifar = datasets.CIFAR100.__new__(datasets.CIFAR100)  # no CIFAR-100 files offline
    cifar.data = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    cifar.targets = [97, 5, 42]
    assert_item(raw_image(cifar, 2), cifar.data[2], 42)
    assert_item(raw_image(Subset(cifar, [1]), 0), cifar.data[1], 5)


def test_idx_images_become_rgb_with_equal_channels():
    gray = np.random.default_rng(0).integers(0, 256, (3, 5, 4), dtype=np.uint8)
    dataset = IdxImages(gray, np.array([7, 1, 4], dtype=np.uint8))
    assert_item(raw_image(dataset, 1), np.repeat(gray[1][..., None], 3, axis=2), 1)


def test_fashion_mnist_items_are_the_idx_files_pixels(fashion_mnist_dir):
    dm = MNISTDataModule(str(fashion_mnist_dir), dataset="fashion_mnist", batch_size=2)
    dm.setup("validate")
    # Independent reader: the idx layout by hand (16-byte image and 8-byte label headers).
    images = gzip.decompress((fashion_mnist_dir / "t10k-images-idx3-ubyte.gz").read_bytes())
    labels = gzip.decompress((fashion_mnist_dir / "t10k-labels-idx1-ubyte.gz").read_bytes())
    for index in (0, 1234, 9999):
        start = 16 + 28 * 28 * index
        gray = np.frombuffer(images[start : start + 28 * 28], dtype=np.uint8).reshape(28, 28)
        pixels = np.repeat(gray[..., None], 3, axis=2)
        assert_item(raw_image(dm.val_set, index), pixels, labels[8 + index])


def test_other_datasets_are_a_one_line_type_error():
    tensors = TensorDataset(torch.zeros(2, 3, 4, 4), torch.zeros(2))
    with pytest.raises(TypeError, match="a TensorDataset keeps no images") as err:
        raw_image(Subset(tensors, [0]), 0)
    assert "\n" not in str(err.value)
