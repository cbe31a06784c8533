"""What the preemption tests share: a tiny ``simclr-lightning fit`` run as a real process, the
signals sent to it and what it leaves behind."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

STEPS = 12  # 20 images in batches of 3, 2 epochs
SLURM_JOB = "4242"
# what SLURM sets for a job of one task
ONE_SLURM_TASK = {
    "SLURM_JOB_ID": SLURM_JOB,
    "SLURM_JOB_NAME": "simclr",
    "SLURM_NTASKS": "1",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
}


def write_config(root: Path, work: Path) -> Path:
    config = {
        "seed_everything": 3,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "precision": "32-true",
            "max_epochs": 2,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "limit_val_batches": 0,
            "default_root_dir": str(work),
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(work / "ckpts"), "save_top_k": 1},
                },
                {
                    "class_path": "tests.preemption_callbacks.StepLog",
                    "init_args": {"path": str(work / "steps.txt")},
                },
                # as every shipped config: it once raised on a mid-epoch resume
                {"class_path": "simclr_lightning.ImagesPerSecond"},
            ],
        },
        "model": {
            "class_path": "simclr_lightning.SimCLR",
            "init_args": {
                "cifar_stem": False,
                "head_hidden_dim": 32,
                "head_output_dim": 16,
                "warmup_epochs": 0,
            },
        },
        "data": {
            "class_path": "simclr_lightning.ImageFolderDataModule",
            "init_args": {
                "root": str(root),
                "batch_size": 3,
                "num_workers": 0,
                "augmentation": {"image_size": 16},
            },
        },
    }
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def steps_logged(work: Path) -> list[int]:
    path = work / "steps.txt"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def cli(config: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "simclr_lightning", "fit", "--config", str(config), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


def wait_for_steps(procs: list[subprocess.Popen], work: Path, lines: int) -> None:
    """Until ``work``'s step log has ``lines`` lines (under DDP each rank logs each step)."""
    deadline = time.monotonic() + 120
    while len(steps_logged(work)) < lines:
        for proc in procs:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "training never reached the step"
        time.sleep(0.05)


def outputs(procs: list[subprocess.Popen], timeout: float = 120) -> list[str]:
    """Each process's output once it ended; one still running after ``timeout`` seconds (a
    hung run) is killed with every process it started, and the test fails."""
    try:
        return [proc.communicate(timeout=timeout)[0].decode() for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                kill_tree(proc)


def signal_after(proc: subprocess.Popen, work: Path, signum: int, step: int) -> tuple[int, str]:
    """Send ``signum`` once ``step`` steps are done; the exit code and output once it ended."""
    wait_for_steps([proc], work, step)
    proc.send_signal(signum)
    (out,) = outputs([proc])
    return proc.returncode, out


def descendants(pid: int) -> list[int]:
    """The processes ``pid`` started (its loader workers), from /proc."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += [int(child), *descendants(int(child))]
    return found


def global_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and every process it started, so that a hung run leaves nothing."""
    for pid in [*descendants(proc.pid), proc.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.communicate()


def fake_slurm(tmp_path: Path) -> dict[str, str]:
    """A one-task SLURM job, with an ``scontrol`` that records its arguments and, as SLURM
    does on ``requeue``, sends the job SIGTERM."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.txt\nkill -TERM $PPID\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **ONE_SLURM_TASK}


def assert_stopped_on(bad: Path, code: int, out: str, reader: int = 1) -> None:
    assert code == 1, out[-3000:]
    errors = [line for line in out.splitlines() if "cannot decode image file" in line]
    assert errors and all(bad.name in line for line in errors), out[-3000:]
    assert any(f"read by process {reader} of 2" in line for line in errors), out[-3000:]
    assert "no checkpoint written" not in out
