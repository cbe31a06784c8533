"""Shared fixtures: real data from ../shared (never committed) and small subsets of it."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, make_subset

SHARED_DATA = Path(os.environ.get("SIMCLR_SHARED_DATA", REPO.parent / "shared" / "data"))
FASHION_MNIST = Path(os.environ.get("SIMCLR_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
# CI sets SIMCLR_REQUIRE_DATA=1: missing data is then a failure, not a skip.
REQUIRE_DATA = os.environ.get("SIMCLR_REQUIRE_DATA") == "1"


@pytest.fixture
def one_thread():
    """On 2 shared cores, OpenMP threads spin-waiting for a descheduled sibling make CPU
    training 10-20x slower than a single thread. Files opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _missing(what: str):
    if REQUIRE_DATA:
        pytest.fail(f"{what} is missing and SIMCLR_REQUIRE_DATA=1")
    pytest.skip(f"{what} is missing")


@pytest.fixture(scope="session")
def cifar_jpg_root(tmp_path_factory) -> Path:
    """All of CIFAR-10 as JPEGs (ImageFolder layout), extracted once per session."""
    archive = SHARED_DATA / "cifar10-jpg.tar.gz"
    if not archive.is_file():
        _missing(str(archive))
    dest = tmp_path_factory.mktemp("cifar10_jpg")
    tar = shutil.which("tar")
    if tar:  # 60,000 files: GNU tar takes 5 s where Python's tarfile takes 20-30 s
        cmd = [tar, "-xzf", str(archive), "-C", str(dest), "--no-same-owner"]
        subprocess.run([*cmd, "--no-same-permissions"], check=True)
    else:
        with tarfile.open(archive) as archive_file:
            archive_file.extractall(dest, filter="data")
    return dest / "cifar10-jpg"


@pytest.fixture(scope="session")
def cifar_tiny(cifar_jpg_root, tmp_path_factory) -> Path:
    """20 train and 10 val images per class: enough for plumbing, cheap on 2 cores."""
    return make_subset(cifar_jpg_root, tmp_path_factory.mktemp("cifar_tiny"), 20, 10)


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        _missing(f"Fashion-MNIST in {FASHION_MNIST} (apt-get install dataset-fashion-mnist)")
    return FASHION_MNIST
