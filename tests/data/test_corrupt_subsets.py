"""``skip_corrupt`` with a labelled training subset (``label_fraction`` / ``label_subset``): a bad
file's substitute is another image of the subset, never one outside it (whose label would leak
into semi-supervised training); and ``verify``'s full list of bad files is written even when
the trainer's root folder does not exist yet."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from simclr_lightning import (
    CorruptFilesError,
    CorruptImageWarning,
    ImageFolderDataModule,
    SimCLR,
    SimCLRAugmentation,
)
from simclr_lightning.data.subsets import class_balanced_subset
from tests.helpers import quiet_trainer

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:.*val does not exist. no validation"),
]

CLASSES = ("airplane", "cat", "dog")
PER_CLASS = 10
FRACTION = 0.4  # 4 of each class's 10 images: 12 labelled of 30
TINY = SimCLRAugmentation(image_size=16, blur_prob=0.0)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def as_array(image: Image.Image) -> torch.Tensor:
    """The decoded pixels unchanged (instead of a random crop), to tell which file was served."""
    return torch.from_numpy(np.array(image))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture
def labelled_folder(cifar_jpg_root, tmp_path) -> Path:
    """train/{airplane,cat,dog}: copies of 10 real CIFAR-10 JPEGs each (copies: some are cut)."""
    for name in CLASSES:
        (tmp_path / "train" / name).mkdir(parents=True)
        for src in sorted((cifar_jpg_root / "train" / name).iterdir())[:PER_CLASS]:
            shutil.copy(src, tmp_path / "train" / name / src.name)
    return tmp_path


def subset_files(root: Path, how: str) -> list[Path]:
    """The labelled subset's files, found without the data module: for ``fraction`` the
    class-balanced indices of a plain ImageFolder (they depend on the labels alone), for
    ``list`` the names a list file gives (every odd image of each class)."""
    files = [Path(p) for p, _ in ImageFolder(str(root / "train")).samples]
    if how == "fraction":
        return [
            files[i] for i in class_balanced_subset(ImageFolder(str(root / "train")), FRACTION, 0)
        ]
    return [f for f in files if sorted(f.parent.iterdir()).index(f) % 2 == 1]


def served_images(dm: ImageFolderDataModule, epochs: int) -> list[tuple[np.ndarray, int]]:
    dm.train_set.dataset.transform = as_array
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptImageWarning)
        for epoch in range(epochs):
            dm.train_order.seed = 7
            loader = dm.train_dataloader()
            loader.sampler.set_epoch(epoch)
            for images, labels in loader:
                out += list(zip(images.numpy(), labels.tolist(), strict=True))
        dm.teardown("fit")
    return out


@pytest.mark.parametrize(("how", "workers"), [("fraction", 0), ("list", 2)])
def test_a_bad_files_substitute_is_another_image_of_the_labelled_subset(
    labelled_folder, tmp_path, how, workers
):
    root = labelled_folder
    subset = subset_files(root, how)
    # one bad file in each class's labelled images (the 2nd), one outside the subset
    bad = [[f for f in subset if f.parent.name == name][1] for name in CLASSES]
    outside = sorted(set((root / "train").rglob("*.jpg")) - set(subset))
    bad.append(outside[0])
    for path in bad:
        truncate(path)
    settings: dict = {"label_fraction": FRACTION}
    if how == "list":
        listing = tmp_path / "subset.txt"
        listing.write_text("".join(f"{f.name}\n" for f in subset))
        settings = {"label_subset": str(listing)}
    dm = ImageFolderDataModule(
        str(root),
        task="classify",
        batch_size=4,
        num_workers=workers,
        persistent_workers=False,
        pin_memory=False,
        augmentation=TINY,
        skip_corrupt=True,
        **settings,
    )
    dm.setup("fit")
    files = [Path(p) for p, _ in dm.train_set.dataset.samples]
    assert [files[i] for i in dm.train_set.indices] == subset  # the view the loader indexes

    good = {f: pixels(f) for f in subset if f not in bad}
    label_of = {f: CLASSES.index(f.parent.name) for f in subset}
    served = served_images(dm, epochs=2)
    assert len(served) == 2 * len(subset)  # every image of the subset, twice: none dropped
    seen = []
    for image, label in served:
        matches = [f for f, want in good.items() if np.array_equal(image, want)]
        assert len(matches) == 1, "an image that is not a good file of the labelled subset"
        assert label == label_of[matches[0]]  # the substitute's own label, from the subset
        seen.append(matches[0])
    assert set(seen) == set(good)  # each good image of the subset served as itself too


def test_a_subset_with_one_good_image_serves_only_it(labelled_folder, tmp_path):
    """Three listed images, two of them bad: both bad slots are filled by the third."""
    root = labelled_folder
    listed = [sorted((root / "train" / name).iterdir())[3] for name in CLASSES]
    for path in listed[1:]:
        truncate(path)
    listing = tmp_path / "subset.txt"
    listing.write_text("".join(f"{f.name}\n" for f in listed))
    dm = ImageFolderDataModule(
        str(root),
        task="classify",
        batch_size=3,
        num_workers=0,
        pin_memory=False,
        augmentation=TINY,
        skip_corrupt=True,
        label_subset=str(listing),
    )
    dm.setup("fit")
    served = served_images(dm, epochs=1)
    assert len(served) == 3
    for image, label in served:
        assert np.array_equal(image, pixels(listed[0])) and label == 0


def test_verify_writes_the_full_list_into_a_root_folder_not_made_yet(cifar_jpg_root, tmp_path):
    """More than 20 bad files: all go to corrupt_files.txt in the trainer's root folder, which
    a run that stops at setup has not created yet."""
    root = tmp_path / "data"
    (root / "train" / "cat").mkdir(parents=True)
    sources = sorted((cifar_jpg_root / "train" / "cat").iterdir())[:30]
    bad = []
    for i, src in enumerate(sources):
        dest = root / "train" / "cat" / src.name
        shutil.copy(src, dest)
        if i % 4 != 0:  # 22 of 30 cut short
            truncate(dest)
            bad.append(str(dest))
    run_root = tmp_path / "runs" / "first"
    assert not run_root.exists()
    dm = ImageFolderDataModule(
        str(root), batch_size=4, num_workers=0, pin_memory=False, augmentation=TINY, verify=True
    )
    model = SimCLR(backbone="resnet18", head_hidden_dim=32, head_output_dim=16)
    trainer = quiet_trainer(max_epochs=1, default_root_dir=str(run_root))
    with pytest.raises(CorruptFilesError) as failure:
        trainer.fit(model, dm)
    err = failure.value
    assert "found 22 of 30 image files undecodable" in str(err)
    assert err.listing == run_root / "corrupt_files.txt"
    assert str(err.listing) in str(err)
    rows = (run_root / "corrupt_files.txt").read_text().splitlines()
    assert sorted(row.split("\t")[0] for row in rows) == sorted(bad)
    assert all(row.split("\t")[1] for row in rows)  # each with its reason
