"""``throughput.write_jpegs`` writes its JPEGs in a pool of forked processes once there are
256 or more (the GPU session writes 2,048). Forked after the parent ran a parallel torch op,
a child deadlocked at its own first parallel op, waiting on an OpenMP pool it did not
inherit: the device call would have hung until its guard killed the throughput part."""

import os
import signal
import subprocess
import sys

import pytest

from tests.helpers import REPO

# a parallel op in the parent first (as throughput.py's cifar_rows runs before writing the
# ImageNet-size JPEGs), then images large enough (3 x 160 x 160 > torch's grain size of
# 32,768) that each child's own ops are parallel too
WRITER = """
import sys, tempfile
from pathlib import Path
sys.path[:0] = [sys.argv[1] + "/benchmarks", sys.argv[1]]
import torch, throughput
torch.set_num_threads(2)
torch.zeros(50_000, dtype=torch.long)
with tempfile.TemporaryDirectory() as tmp:
    root = throughput.write_jpegs(Path(tmp), 256, lambda i: (160, 160))
    print(len(list(root.rglob("*.jpg"))), flush=True)
"""


def test_jpegs_are_written_by_a_pool_forked_after_a_parallel_op():
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # xdist sets 1
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(REPO)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its pool's children are killed with it on a hang
    )
    try:
        out, err = proc.communicate(timeout=90)  # seconds when it works
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("write_jpegs hung: its forked writers deadlocked")
    assert proc.returncode == 0, err[-3000:]
    assert out.split() == ["256"]
