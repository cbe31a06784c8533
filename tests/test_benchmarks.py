"""The benchmark scripts' code paths run on CPU with tiny sizes (their numbers mean nothing
here; they are measured on a GPU)."""

import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_throughput_tiny_prints_every_row():
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--tiny"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for row in (
        "CIFAR R18: model alone",
        "CIFAR R18: CPU pipeline",
        "CIFAR R18: GPU pipeline, resident",
        "GPUAugment alone",
        "ImageNet R50 64px: model alone",
        "ImageNet R50 64px: CPU pipeline",
        "nvJPEG decode",
        "x model alone",
        "crop+resize max |diff|",
    ):
        assert row in out, row


@pytest.mark.slow
@pytest.mark.parametrize("augment", ["cpu", "gpu"])
def test_time_to_accuracy_tiny_runs_both_pipelines(cifar_tiny, augment):
    script = REPO / "benchmarks" / "time_to_accuracy.py"
    cmd = [sys.executable, str(script), "--root", str(cifar_tiny), "--tiny", "--augment", augment]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"augment {augment}" in proc.stdout and "kNN top-1" in proc.stdout
    assert "| 3 steps |" in proc.stdout
