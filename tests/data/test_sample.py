"""The CIFAR-10 sample in the package: what scripts/make_sample.py draws, byte for byte, and
what pip installs."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from simclr_lightning import SampleDataModule, sample_root
from tests.conftest import SHARED_DATA
from tests.helpers import REPO

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


def test_sample_is_small_balanced_and_copied_from_cifar(cifar_jpg_root):
    files = tree(sample_root())
    assert sum(len(b) for b in files.values()) <= 5 * 2**20
    counts = Counter(tuple(Path(name).parts[:2]) for name in files)
    assert counts == {
        (s, c): n for s in ("train", "val") for c in CLASSES for n in [300 if s == "train" else 100]
    }
    for name, data in files.items():  # the archive's own bytes: no re-encoding
        assert (cifar_jpg_root / name).read_bytes() == data, name
    # a seeded draw over each class, not its first files
    cats = sorted(Path(n).name for n in files if n.startswith("train/cat/"))
    assert cats != [f"{i:04d}.jpg" for i in range(300)]
    assert int(cats[-1][:4]) > 4000


def test_make_sample_reproduces_the_committed_sample(cifar_jpg_root, tmp_path):
    archive = SHARED_DATA / "cifar10-jpg.tar.gz"
    script = REPO / "scripts" / "make_sample.py"
    cmd = [sys.executable, str(script), "--archive", str(archive), "--out", str(tmp_path / "s")]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    assert tree(tmp_path / "s") == tree(sample_root())
    # its README too, which described another order of draws than the script's
    assert (tmp_path / "s" / "README.md").read_text() == (sample_root() / "README.md").read_text()
    other = tmp_path / "seed1"
    subprocess.run(cmd[:-1] + [str(other), "--seed", "1"], check=True, capture_output=True)
    assert tree(other).keys() != tree(sample_root()).keys()


@pytest.mark.slow
def test_wheel_carries_the_sample(tmp_path):
    """What ``pip install`` (not editable) brings: every JPEG of the sample."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(
        REPO / "simclr_lightning",
        src / "simclr_lightning",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(tmp_path / "dist"),
        str(src),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packaged = {
        n.removeprefix("simclr_lightning/sample/cifar10/") for n in names if n.endswith(".jpg")
    }
    assert packaged == set(tree(sample_root()))
    assert "simclr_lightning/sample/cifar10/README.md" in names


def test_sample_data_module_serves_the_sample():
    data = SampleDataModule(batch_size=8, num_workers=0)
    assert data.num_classes == 10 and data.root == sample_root()
    data.setup("fit")
    assert data.train_set.classes == CLASSES
    assert len(data.train_set) == 3000 and len(data.val_set) == 1000
    assert data.augmentation.mean == (0.4914, 0.4822, 0.4465)  # CIFAR-10's statistics
    (a, b), y = next(iter(data.train_dataloader()))
    assert a.shape == b.shape == (8, 3, 32, 32)


def test_make_sample_without_the_archive_says_so_in_one_line(tmp_path):
    script = REPO / "scripts" / "make_sample.py"
    cmd = [sys.executable, str(script), "--archive", str(tmp_path / "no.tar.gz"), "--out", "x"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 1 and not (tmp_path / "x").exists()
    assert run.stderr.splitlines() == [
        f"make_sample.py: error: --archive='{tmp_path / 'no.tar.gz'}' is not a file: give the "
        "CIFAR-10 JPEG tarball cifar10-jpg.tar.gz (its source: shared/data/README.md)"
    ]
