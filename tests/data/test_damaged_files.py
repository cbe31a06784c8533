"""A damaged Fashion-MNIST idx file (cut short, not gzip, another format) stops the run with
one line naming data.data_dir, the file and how to get it back: exit 1, no traceback."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest

from simclr_lightning.cli import main
from simclr_lightning.data import MNISTDataModule
from simclr_lightning.errors import DataFileError

FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def damaged_copy(source: Path, dest: Path, name: str, content: bytes) -> Path:
    dest.mkdir()
    for file in FILES:
        shutil.copy(source / file, dest / file)
    (dest / name).write_bytes(content)
    return dest


def cases(source: Path) -> dict[str, tuple[str, bytes, str]]:
    images = (source / FILES[0]).read_bytes()
    labels = gzip.decompress((source / FILES[1]).read_bytes())
    return {
        "gzip cut short": (FILES[0], images[: len(images) // 3], "cannot be read (EOFError"),
        "not gzip": (FILES[0], b"<html>not found</html>", "cannot be read (BadGzipFile"),
        "idx body cut": (FILES[1], gzip.compress(labels[:-10]), "is truncated: its header says"),
        "not idx": (FILES[1], gzip.compress(b"\x00\x00\x0d\x01" + labels[4:]), "is not an idx"),
        "header only": (FILES[1], gzip.compress(b"\x00\x00\x08\x03\x00"), "is truncated: 5 bytes"),
    }


@pytest.mark.parametrize(
    "case", ["gzip cut short", "not gzip", "idx body cut", "not idx", "header only"]
)
def test_damaged_idx_file_names_the_file_and_the_fix(fashion_mnist_dir, tmp_path, case):
    name, content, problem = cases(fashion_mnist_dir)[case]
    root = damaged_copy(fashion_mnist_dir, tmp_path / "fm", name, content)
    dm = MNISTDataModule(str(root), dataset="fashion_mnist", batch_size=8, num_workers=0)
    with pytest.raises(DataFileError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert message.startswith(f"data.data_dir={str(root)!r}: {root / name} {problem}")
    assert "apt-get install --reinstall dataset-fashion-mnist" in message
    assert "\n" not in message


def test_cli_prints_one_line_and_exits_1(fashion_mnist_dir, tmp_path, capsys, monkeypatch):
    name, content, _ = cases(fashion_mnist_dir)["gzip cut short"]
    root = damaged_copy(fashion_mnist_dir, tmp_path / "fm", name, content)
    args = [
        "fit",
        "--model=SimCLR",
        "--model.in_channels=1",
        "--data=MNISTDataModule",
        "--data.dataset=fashion_mnist",
        f"--data.data_dir={root}",
        "--data.num_workers=0",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
    ]
    monkeypatch.setattr("sys.argv", ["simclr-lightning", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("simclr-lightning: error: data.data_dir="), err
    assert f"{root / name} cannot be read (EOFError" in err[0]


def test_images_and_labels_of_different_sets_are_named(fashion_mnist_dir, tmp_path):
    test_labels = (fashion_mnist_dir / FILES[3]).read_bytes()  # 10,000 labels for 60,000 images
    root = damaged_copy(fashion_mnist_dir, tmp_path / "fm", FILES[1], test_labels)
    dm = MNISTDataModule(str(root), dataset="fashion_mnist", batch_size=8, num_workers=0)
    with pytest.raises(DataFileError) as info:
        dm.setup("fit")
    assert str(info.value) == (
        f"data.data_dir={str(root)!r}: {root / FILES[0]} holds 60000 images but {FILES[1]} "
        f"10000 labels: the two files are of different sets; replace them"
    )
