"""``skip_corrupt`` outside training: validation, test, predict and the kNN bank leave a file
that cannot be decoded out (no row) instead of serving another image, with its label, in its
place; ``resident`` says it left such files out; ``verify`` with ``skip_corrupt`` lists them as
a warning and goes on. Expectations come from the files written here with PIL."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from simclr_lightning import (
    CorruptImageWarning,
    ImageFilesDataModule,
    ImageFolderDataModule,
    SimCLRAugmentation,
)
from simclr_lightning.data.failed_batches import FailedBatch
from simclr_lightning.errors import SettingError

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 8


@pytest.fixture
def folder(tmp_path) -> tuple[Path, list[Path], list[Path]]:
    """train/ and val/ of classes a, b: 3 + 3 good PNGs each, and in each split a text file
    and an empty file named as images, in the middle of class a and b."""
    rng = np.random.default_rng(0)
    good, bad = [], []
    for split in ("train", "val"):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(3):
                path = tmp_path / split / name / f"{i}.png"
                Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)
                good.append(path)
        bad += [tmp_path / split / "a" / "1_notes.png", tmp_path / split / "b" / "1_empty.png"]
        bad[-2].write_text("not an image\n")
        bad[-1].write_bytes(b"")
    return tmp_path, good, bad


def data(root: Path, **kwargs) -> ImageFolderDataModule:
    settings = dict(batch_size=2, num_workers=0, augmentation=SimCLRAugmentation(image_size=SIZE))
    return ImageFolderDataModule(str(root), **(settings | {"skip_corrupt": True} | kwargs))


def labels_of(files: list[Path]) -> list[int]:
    """Each file's class folder's label."""
    return [["a", "b"].index(p.parent.name) for p in files]


def expected_rows(dm, files: list[Path]) -> tuple[torch.Tensor, list[int]]:
    """The evaluation view of each file, and its label."""
    transform = dm.eval_transform()
    images = torch.stack([transform(Image.open(p).convert("RGB")) for p in files])
    return images, labels_of(files)


def rows(loader) -> tuple[torch.Tensor, list[int]]:
    batches = list(loader)
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]).tolist()


def skip_messages(caught) -> list[str]:
    return [str(w.message) for w in caught if w.category is CorruptImageWarning]


@pytest.mark.parametrize("workers", [0, 2])
def test_evaluation_loaders_leave_bad_files_out_in_order(folder, workers):
    """A bad validation file's row was another image with that image's label (counted twice,
    and predict's rows shifted); now the rows are exactly the good files, in dataset order
    (predict, the kNN bank) or in validation's seeded order (validation, test)."""
    root, good, bad = folder
    dm = data(root, num_workers=workers, persistent_workers=False)
    dm.setup("fit")
    val_good = sorted(p for p in good if p.parts[-3] == "val")
    train_good = sorted(p for p in good if p.parts[-3] == "train")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for loader, files in (
            (dm.predict_dataloader(), val_good),
            (dm.eval_train_dataloader(), train_good),
        ):
            images, labels = rows(loader)
            want_images, want_labels = expected_rows(dm, files)
            assert labels == want_labels
            torch.testing.assert_close(images, want_images)
            dm.report_skipped()  # what the next batch transfer does
        val_images, val_labels = rows(dm.val_dataloader())  # a seeded order of the same rows
        dm.report_skipped()
        test_images, test_labels = rows(dm.test_dataloader())  # the same order, whole split
        dm.report_skipped()
    assert sorted(val_labels) == sorted(labels_of(val_good))
    assert len(val_images) == len(val_good)
    assert test_labels == val_labels
    torch.testing.assert_close(test_images, val_images)
    want_images, want_labels = expected_rows(dm, val_good)
    matches = [  # each test row is one good file's view, with its label
        [i for i, want in enumerate(want_images) if torch.allclose(image, want)]
        for image in test_images
    ]
    assert sorted(m[0] for m in matches) == list(range(len(val_good)))
    assert [want_labels[m[0]] for m in matches] == test_labels
    said = skip_messages(caught)
    assert sorted(m.split("'")[1] for m in said) == sorted(map(str, bad))  # once each
    assert all("left out, with no image in its place" in m and "\n" not in m for m in said)


def test_training_still_serves_substitutes(folder):
    """Training keeps its fixed length (its sampler and resume rely on it)."""
    root, good, bad = folder
    dm = data(root, drop_last=False)
    dm.setup("fit")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        served = sum(len(labels) for _, labels in dm.train_dataloader())
    assert served == 8  # 6 good + 2 bad training files, every slot filled
    assert all("served in its place" in m for m in skip_messages(caught))


def test_a_batch_of_only_bad_files_is_empty(folder):
    root, good, bad = folder
    for path in (root / "val" / "a").glob("[012].png"):
        path.write_bytes(b"")  # val/a's 4 files all bad; batches of 4: a's, then b's
    dm = data(root, batch_size=4)
    dm.setup("fit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptImageWarning)
        batches = list(dm.predict_dataloader())  # the files' order
    assert [len(y) for _, y in batches] == [0, 3]
    assert batches[0][0].shape == (0, 3, SIZE, SIZE) and batches[0][1].dtype == torch.long


@pytest.mark.parametrize("skip", [True, False])
def test_under_ddp_evaluation_batches_are_still_checked_together(folder, skip):
    """Under DDP evaluation samples pass CatchFailedSamples/CollateOrFail: with skip_corrupt a
    bad file is left out there too; without it the batch still becomes a FailedBatch."""
    root, good, bad = folder
    dm = data(root, skip_corrupt=skip)
    dm.setup("fit")
    dm.trainer = SimpleNamespace(world_size=2, num_devices=2)  # the flags a loader reads
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptImageWarning)
        batches = list(dm.test_dataloader())
    failed = [b for b in batches if isinstance(b, FailedBatch)]
    if skip:
        assert not failed and sum(len(y) for _, y in batches) == 6
    else:
        assert sorted(b.error.path for b in failed) == sorted(str(p) for p in bad[2:])


def test_resident_store_says_bad_files_were_left_out(folder):
    root, good, bad = folder
    dm = data(root, augment="gpu", resident=True, persistent_workers=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
    assert len(dm.device_store) == 6  # the good training files only
    said = skip_messages(caught)
    assert sorted(m.split("'")[1] for m in said) == sorted(str(p) for p in bad[:2])
    assert not any("served in its place" in m for m in said)
    assert all("left out" in m for m in said)


def test_a_batch_the_resident_store_cannot_fill_is_refused(folder):
    """The batch size was checked against the 8 training files, before the store left the 2
    bad ones out: a batch of 7 then gave no training batch, and the fit ended at once, exit 0."""
    root, _, _ = folder
    dm = data(root, augment="gpu", resident=True, persistent_workers=False, batch_size=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptImageWarning)
        with pytest.raises(SettingError, match=r"^data.batch_size=7 is larger than the 6 "):
            dm.setup("fit")


def test_verify_with_skip_lists_the_bad_files_and_goes_on(folder):
    """verify raised, suggesting data.skip_corrupt=true although it was set."""
    root, good, bad = folder
    dm = data(root, verify=True, drop_last=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
        served = sum(len(labels) for _, labels in dm.train_dataloader())
        val_rows = sum(len(labels) for _, labels in dm.test_dataloader())
        dm.teardown("fit")
    said = skip_messages(caught)
    assert len(said) == 1, said  # the one list: no second warning per file afterwards
    assert "data.verify=true found 4 of 16 image files undecodable" in said[0]
    assert all(repr(str(p)) in said[0] for p in bad) and "\n" not in said[0]
    assert "set data.skip_corrupt" not in said[0]
    assert served == 8 and val_rows == 6


def test_predict_files_verify_with_skip_warns_once_and_leaves_them_out(folder):
    root, good, bad = folder
    dm = ImageFilesDataModule([str(root / "val")], image_size=SIZE, skip_corrupt=True, verify=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("predict")
        paths = [p for _, batch in dm.predict_dataloader() for p in batch]
        dm.report_skipped()
    said = skip_messages(caught)
    assert len(said) == 1 and "found 2 of 8 image files undecodable" in said[0]
    assert sorted(paths) == sorted(str(p) for p in good if p.parts[-3] == "val")


@pytest.mark.parametrize("order", ["files", "test"])
@pytest.mark.parametrize("batch_size", [2, 3])
def test_under_ddp_rows_after_a_left_out_file_keep_their_positions(folder, batch_size, order):
    """8 validation files (2 bad) over 3 ranks, as Lightning shards them: rank r reads r, r+3,
    r+6 and rank 2's last is a padding repeat of file 0. The rows after a left-out file were
    numbered one lower, so that repeat could pass as a real file and count file 0 twice; now
    every good file counts exactly once, with its own label, over the ranks: in the files'
    order, and in the test loader's (a Subset in validation's seeded order, whose positions
    are mapped back to files through its indices)."""
    from torch.utils.data import DataLoader, DistributedSampler

    from simclr_lightning.distributed import real_rows, sample_positions

    root, good, bad = folder
    dm = data(root, batch_size=batch_size)
    dm.setup("fit")
    dataset = dm.test_dataloader().dataset if order == "test" else dm.val_set
    file_of = dataset.indices if order == "test" else list(range(len(dataset)))
    files = sorted(p for p in good + bad if p.parts[-3] == "val")
    want = {i: labels_of([p])[0] for i, p in enumerate(files) if p not in bad}
    counted = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptImageWarning)
        for rank in range(3):
            sampler = DistributedSampler(dataset, num_replicas=3, rank=rank, shuffle=False)
            loader = DataLoader(
                dataset,
                batch_size=batch_size,
                sampler=sampler,
                collate_fn=dm.test_dataloader().collate_fn,
            )
            for batch_idx, (_, labels) in enumerate(loader):
                keep = real_rows(loader, batch_idx, len(labels), labels.device)
                positions = sample_positions(loader, batch_idx, len(labels))
                kept = [file_of[p] for p in positions[keep].tolist()]
                counted += list(zip(kept, labels[keep].tolist(), strict=True))
    assert sorted(counted) == sorted(want.items())
