"""A damaged CIFAR folder is named in one line and re-fetched with data.download=true; the
predict data module rejects image sizes and resize ratios that cannot work."""

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision import datasets

from simclr_lightning import CIFARDataModule, ImageFilesDataModule
from simclr_lightning.cli_errors import user_error
from simclr_lightning.errors import DataFileError, SettingError
from tests.helpers import check_cifar_files_against, write_cifar_batches

BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
PER_BATCH = 3
CLASS_NAMES = [str(i) for i in range(10)]


@pytest.fixture
def cifar_dir(tmp_path, monkeypatch) -> Path:
    """A small cifar-10-batches-py/ in torchvision's pickle format (random images), with
    torchvision's md5 table pointed at these files so its real integrity check runs on them;
    torchvision's download is replaced by a recorder (no network)."""
    folder = tmp_path / "cifar-10-batches-py"
    rng = np.random.default_rng(0)
    batches = {
        name: (
            rng.integers(0, 256, (PER_BATCH, 3 * 32 * 32), dtype=np.uint8),
            rng.integers(0, 10, PER_BATCH).tolist(),
        )
        for name in BATCHES
    }
    check_cifar_files_against(write_cifar_batches(folder, batches, CLASS_NAMES), monkeypatch)
    return folder


def record_downloads(monkeypatch, restore_from: dict[str, bytes] | None = None) -> list:
    """Replace CIFAR10.download: record each call and (optionally) write the intact files back,
    as extracting the archive again would."""
    calls = []

    def download(self):
        calls.append(self.root)
        for name, content in (restore_from or {}).items():
            (Path(self.root) / self.base_folder / name).write_bytes(content)

    monkeypatch.setattr(datasets.CIFAR10, "download", download)
    return calls


def truncate(path: Path) -> bytes:
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    return content


def assert_one_line_run_error(err: BaseException, *parts: str) -> str:
    message, code = user_error(err)
    assert code == 1 and "\n" not in str(err) and message == str(err)
    for part in parts:
        assert part in message, (part, message)
    return message


def test_damaged_cifar_batch_is_named_offline(cifar_dir, monkeypatch):
    calls = record_downloads(monkeypatch)
    truncate(cifar_dir / "data_batch_3")
    dm = CIFARDataModule(str(cifar_dir.parent), download=False, batch_size=2, num_workers=0)
    dm.prepare_data()  # offline: nothing to fetch, setup names the file
    with pytest.raises(DataFileError) as info:
        dm.setup("fit")
    assert_one_line_run_error(
        info.value,
        f"data.data_dir={str(cifar_dir.parent)!r}",
        f"{cifar_dir / 'data_batch_3'} is truncated or damaged",
        "set data.download=true",
    )
    assert calls == []


def test_missing_cifar_batch_is_named(cifar_dir, monkeypatch):
    record_downloads(monkeypatch)
    (cifar_dir / "test_batch").unlink()
    dm = CIFARDataModule(str(cifar_dir.parent), download=False, batch_size=2, num_workers=0)
    with pytest.raises(FileNotFoundError) as info:
        dm.setup("validate")
    assert_one_line_run_error(info.value, f"{cifar_dir / 'test_batch'} is missing", "download")


def test_download_true_fetches_a_damaged_folder_again(cifar_dir, monkeypatch):
    good = truncate(cifar_dir / "data_batch_2")
    calls = record_downloads(monkeypatch, restore_from={"data_batch_2": good})
    dm = CIFARDataModule(str(cifar_dir.parent), download=True, batch_size=2, num_workers=0)
    dm.prepare_data()
    assert calls == [str(cifar_dir.parent)]
    assert (cifar_dir / "data_batch_2").read_bytes() == good
    dm.setup("fit")
    assert len(dm.train_set) == 5 * PER_BATCH and len(dm.val_set) == PER_BATCH


def test_download_true_leaves_an_intact_folder_alone(cifar_dir, monkeypatch):
    calls = record_downloads(monkeypatch)
    CIFARDataModule(str(cifar_dir.parent), download=True, num_workers=0).prepare_data()
    assert calls == []


def test_damage_a_download_cannot_mend_says_delete_the_folder(cifar_dir, monkeypatch):
    """torchvision's download() fetches only when a data batch fails its check: a damaged
    batches.meta (or a fetch that did not mend the file) ends in one line saying what to do."""
    calls = record_downloads(monkeypatch)  # mends nothing
    truncate(cifar_dir / "batches.meta")
    dm = CIFARDataModule(str(cifar_dir.parent), download=True, num_workers=0)
    with pytest.raises(DataFileError) as info:
        dm.prepare_data()
    assert calls == [str(cifar_dir.parent)]
    assert_one_line_run_error(
        info.value, f"{cifar_dir / 'batches.meta'} is truncated", f"delete {cifar_dir}/"
    )


@pytest.fixture
def image_dir(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png"
        )
    return tmp_path


@pytest.mark.parametrize(
    "setting,value",
    [
        ("image_size", 0),
        ("image_size", -8),
        ("image_size", 2.5),
        ("resize_ratio", 0),
        ("resize_ratio", -0.5),
        ("resize_ratio", 1.14),  # 256/224 the other way round: not a crop share
        ("resize_ratio", math.nan),
    ],
)
def test_predict_data_rejects_bad_sizes_and_ratios(image_dir, setting, value):
    with pytest.raises(SettingError) as info:
        ImageFilesDataModule(str(image_dir), **{setting: value})
    message, code = user_error(info.value)
    assert code == 2 and "\n" not in message
    assert message.startswith(f"data.{setting}={value!r} is invalid: must be ")


@pytest.mark.parametrize(
    "kwargs,side",
    [
        (dict(image_size=16, resize_ratio=0.5), 16),
        (dict(image_size=1, resize_ratio=1), 1),
        (dict(image_size=None, resize_ratio=None), 224),  # nothing recorded: the default
    ],
)
def test_predict_data_serves_good_sizes(image_dir, kwargs, side):
    dm = ImageFilesDataModule(str(image_dir), batch_size=3, **kwargs)
    images, paths = next(iter(dm.predict_dataloader()))
    assert images.shape == (3, 3, side, side) and len(paths) == 3
