"""Shared fixtures: real data from ../shared (never committed) and small subsets of it."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from tests.helpers import REPO, make_subset

SHARED_DATA = Path(os.environ.get("SIMCLR_SHARED_DATA", REPO.parent / "shared" / "data"))
FASHION_MNIST = Path(os.environ.get("SIMCLR_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
# CI sets SIMCLR_REQUIRE_DATA=1: missing data is then a failure, not a skip.
REQUIRE_DATA = os.environ.get("SIMCLR_REQUIRE_DATA") == "1"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under xdist every core already runs a test process. A second OpenMP thread per process
    # spin-waits for a descheduled sibling: the notebook's kernel took 205 s instead of 50.
    # One thread here, and in every process a test starts (CLI runs, the notebook's kernel,
    # DDP ranks), which inherit OMP_NUM_THREADS.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# The longest files, longest first (seconds each took under `-n 2 --dist loadfile` on a
# 2-core machine without AVX-512, where the run took 874 s). xdist hands whole
# files to whichever process is free; begun last, one of these would leave the other core
# idle for a minute at the end of the run.
LONG_FILES = [
    "tests/test_learning.py",  # 194
    "tests/test_notebook.py",  # 134
    "tests/test_resume.py",  # 128
    "tests/test_preemption_ddp.py",  # 117
    "tests/test_corrupt_ddp.py",  # 107
    "tests/test_eval_cli.py",  # 72
    "tests/test_preemption.py",  # 55
    "tests/test_quickstart.py",  # 54
    "tests/test_grad_cache.py",  # 47
    "tests/data/test_corrupt.py",  # 46
    "tests/test_multinode.py",  # 45
    "tests/callbacks/test_monitors_ddp.py",  # 40
    "tests/test_benchmarks.py",  # 35
    "tests/data/test_sharding_ddp.py",  # 34
    "tests/evaluation/test_linear_eval_ddp.py",  # 30
    "tests/test_cli.py",  # 30
    "tests/test_distributed.py",  # 27
    "tests/test_run_checks.py",  # 22
    "tests/test_gpu_session.py",  # 19
]


def pytest_configure(config: pytest.Config) -> None:
    # keep the order below: xdist's default puts the files with the most tests first
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {path: i for i, path in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(LONG_FILES)))


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
    """All of CIFAR-10 as JPEGs (ImageFolder layout), extracted once per run: under xdist the
    processes share one copy (the first to ask extracts it, under a file lock), so the second
    process does not spend 5-17 s and 60,000 files on its own."""
    extracted = os.environ.get("SIMCLR_CIFAR10_JPG")  # a copy extracted already (gpu_session)
    if extracted and (Path(extracted) / "train").is_dir():
        return Path(extracted)
    archive = SHARED_DATA / "cifar10-jpg.tar.gz"
    if not archive.is_file():
        _missing(str(archive))
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's folder, above each process's own
    dest = base / "cifar10_jpg"
    with FileLock(str(base / "cifar10_jpg.lock")):
        if not (dest / "complete").is_file():
            shutil.rmtree(dest, ignore_errors=True)  # a copy half extracted by a killed run
            dest.mkdir()
            _extract(archive, dest)
            (dest / "complete").touch()
    return dest / "cifar10-jpg"


def _extract(archive: Path, dest: Path) -> None:
    tar = shutil.which("tar")
    if tar:  # 60,000 files: GNU tar takes 5 s where Python's tarfile takes 20-30 s
        cmd = [tar, "-xzf", str(archive), "-C", str(dest), "--no-same-owner"]
        subprocess.run([*cmd, "--no-same-permissions"], check=True)
    else:
        with tarfile.open(archive) as archive_file:
            archive_file.extractall(dest, filter="data")


@pytest.fixture(scope="session")
def cifar_tiny(cifar_jpg_root, tmp_path_factory) -> Path:
    """20 train and 10 val images per class: enough for plumbing, cheap on 2 cores."""
    return make_subset(cifar_jpg_root, tmp_path_factory.mktemp("cifar_tiny"), 20, 10)


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        _missing(f"Fashion-MNIST in {FASHION_MNIST} (apt-get install dataset-fashion-mnist)")
    return FASHION_MNIST


@pytest.fixture(scope="session")
def tiny_folder(cifar_jpg_root, tmp_path_factory) -> Path:
    """2 train images and 1 val image per class: the preemption runs' data."""
    return make_subset(cifar_jpg_root, tmp_path_factory.mktemp("preempt"), 2, 1)
