"""Preemption: a real ``simclr-lightning fit`` process sent SIGTERM (or SLURM's requeue signal)
finishes its step, saves it, exits 143, and resuming reaches the end of the run."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset

from simclr_lightning import CorruptImageError, Preemption, SimCLR
from tests.helpers import make_subset, quiet_trainer

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


@pytest.fixture(scope="module")
def tiny_folder(cifar_jpg_root, tmp_path_factory):
    return make_subset(cifar_jpg_root, tmp_path_factory.mktemp("preempt"), 2, 1)


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


def signal_after(proc: subprocess.Popen, work: Path, signum: int, step: int) -> tuple[int, str]:
    """Send ``signum`` once ``step`` steps are done; the exit code and output once it ended."""
    deadline = time.monotonic() + 120
    while len(steps_logged(work)) < step:
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "training never reached the step"
        time.sleep(0.05)
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out.decode()


def descendants(pid: int) -> list[int]:
    """The processes ``pid`` started (its loader workers), from /proc."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += [int(child), *descendants(int(child))]
    return found


def global_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def test_sigterm_saves_the_last_step_exits_143_and_last_resumes(tiny_folder, tmp_path):
    config = write_config(tiny_folder, tmp_path)
    code, out = signal_after(cli(config), tmp_path, signal.SIGTERM, step=4)
    assert code == 143, out[-3000:]
    done = steps_logged(tmp_path)
    assert 4 <= done[-1] < STEPS and done == list(range(1, done[-1] + 1))
    last = tmp_path / "ckpts" / "last.ckpt"
    assert global_step(last) == done[-1]  # the step in progress finished and was saved

    resumed = cli(config, "--ckpt_path", "last")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out.decode()[-3000:]
    assert steps_logged(tmp_path) == list(range(1, STEPS + 1))  # no step lost or repeated
    assert global_step(tmp_path / "ckpts" / f"epoch=1-step={STEPS}.ckpt") == STEPS
    assert not last.exists()  # done: --ckpt_path last must not go back to the stop


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_sigterm_to_every_process_as_slurm_sends_it_still_saves_the_step(tiny_folder, tmp_path):
    """SLURM's time limit, preemption or scancel signals every process of the job step: the
    loader workers too. They must not die before the training process has saved its step."""
    config = write_config(tiny_folder, tmp_path)
    proc = cli(config, "--data.num_workers", "2")
    deadline = time.monotonic() + 120
    while len(steps_logged(tmp_path)) < 4:
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "training never reached the step"
        time.sleep(0.05)
    workers = descendants(proc.pid)
    assert len(workers) >= 2  # the training loader's
    for pid in [proc.pid, *workers]:
        os.kill(pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    out = out.decode()
    assert proc.returncode == 143, out[-3000:]
    assert "killed by signal" not in out
    done = steps_logged(tmp_path)
    assert global_step(tmp_path / "ckpts" / "last.ckpt") == done[-1] >= 4


def fake_slurm(tmp_path: Path) -> dict[str, str]:
    """A one-task SLURM job, with an ``scontrol`` that records its arguments and, as SLURM
    does on ``requeue``, sends the job SIGTERM."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.txt\nkill -TERM $PPID\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **ONE_SLURM_TASK}


def test_slurm_signal_requeues_and_the_requeued_job_resumes_from_the_step(tiny_folder, tmp_path):
    config = write_config(tiny_folder, tmp_path)
    env = fake_slurm(tmp_path)
    code, out = signal_after(cli(config, env=env), tmp_path, signal.SIGUSR1, step=4)
    assert code == 143, out[-3000:]
    assert (tmp_path / "scontrol.txt").read_text().split() == ["requeue", SLURM_JOB]
    done = steps_logged(tmp_path)
    # Lightning's own handler saved hpc_ckpt_1 inside the signal handler, mid-step; ours,
    # the newest, holds the step that was finishing when the requeue's SIGTERM came
    assert global_step(tmp_path / "hpc_ckpt_2.ckpt") == done[-1] < STEPS

    requeued = cli(config, env=env)  # the same command, as SLURM reruns it
    out, _ = requeued.communicate(timeout=300)
    assert requeued.returncode == 0, out.decode()[-3000:]
    assert steps_logged(tmp_path) == list(range(1, STEPS + 1))


class BadFileAt(Dataset):
    """Two-view samples of random 16 px images; sample ``bad`` is an undecodable file."""

    def __init__(self, n: int, bad: int) -> None:
        self.images = torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        self.bad = bad

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        if i == self.bad:
            raise CorruptImageError(f"/data/train/{i}.jpg", "truncated JPEG")
        return (self.images[i], self.images[i].flip(-1)), 0


class Weights(L.Callback):
    """The weights after every step, to compare a checkpoint with."""

    def __init__(self) -> None:
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        state = pl_module.state_dict()
        self.after[trainer.global_step] = {k: v.clone() for k, v in state.items()}


@pytest.mark.usefixtures("one_thread")
def test_corrupt_file_stops_the_run_after_saving_its_last_step(tmp_path):
    L.seed_everything(0, verbose=False)
    model = SimCLR(cifar_stem=False, head_hidden_dim=32, head_output_dim=16, warmup_epochs=0)
    weights = Weights()
    trainer = quiet_trainer(
        max_epochs=1,
        precision="32-true",
        enable_checkpointing=True,
        callbacks=[weights, Preemption(), ModelCheckpoint(tmp_path)],
    )
    loader = DataLoader(BadFileAt(24, bad=13), batch_size=3)  # file 13 is in batch 4
    with pytest.raises(CorruptImageError, match="13.jpg"):
        trainer.fit(model, loader)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved["global_step"] == max(weights.after) == 4  # batches 0-3 trained
    for name, value in weights.after[4].items():
        assert torch.equal(saved["state_dict"][name], value), name


@pytest.mark.slow
def test_sigterm_under_ddp_stops_every_rank_after_the_same_step(tiny_folder, tmp_path):
    """2 processes (Lightning launches rank 1 and forwards the signal to it): both finish the
    same step, the one checkpoint holds both ranks' random states, the run exits 143."""
    config = write_config(tiny_folder, tmp_path)
    settings = yaml.safe_load(config.read_text())
    settings["trainer"] |= {"devices": 2, "strategy": "ddp"}
    config.write_text(yaml.safe_dump(settings))
    code, out = signal_after(cli(config), tmp_path, signal.SIGTERM, step=2)
    assert code == 143, out[-3000:]
    done = steps_logged(tmp_path)  # each rank logs each step
    assert done == sorted(2 * list(range(1, done[-1] + 1)))  # both stopped after one step
    saved = torch.load(tmp_path / "ckpts" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == done[-1] < STEPS // 2
    assert len(saved["callbacks"]["RNGState"]["ranks"]) == 2

    resumed = cli(config, "--ckpt_path", "last")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out.decode()[-3000:]
    assert steps_logged(tmp_path) == sorted(2 * list(range(1, STEPS // 2 + 1)))


def damage(path: Path) -> Path:
    """Replace the symlink ``path`` by a file that starts like a JPEG; returns its target."""
    original = path.readlink()
    path.unlink()
    path.write_bytes(b"\xff\xd8\xff\xe0 not the rest of a JPEG")
    return original


def ddp_run(root: Path, work: Path, trainer: dict, callbacks: list | None = None):
    """A 2-process ``simclr-lightning fit`` of ``write_config``'s run on ``root``; its exit code
    and output."""
    work.mkdir()
    config = write_config(root, work)
    settings = yaml.safe_load(config.read_text())
    settings["trainer"] |= {"devices": 2, "strategy": "ddp", **trainer}
    settings["trainer"]["callbacks"] += callbacks or []
    config.write_text(yaml.safe_dump(settings))
    proc = cli(config)
    out, _ = proc.communicate(timeout=300)
    return config, proc.returncode, out.decode()


def assert_stopped_on(bad: Path, code: int, out: str, reader: int = 1) -> None:
    assert code == 1, out[-3000:]
    errors = [line for line in out.splitlines() if "cannot decode image file" in line]
    assert errors and all(bad.name in line for line in errors), out[-3000:]
    assert any(f"read by process {reader} of 2" in line for line in errors), out[-3000:]
    assert "no checkpoint written" not in out


def mend_and_resume(bad: Path, original: Path, config: Path, work: Path) -> None:
    """Put the file back, resume from last.ckpt: steps 1 to the end, each once per rank."""
    bad.unlink()
    bad.symlink_to(original)
    resumed = cli(config, "--ckpt_path", "last")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out.decode()[-3000:]
    assert steps_logged(work) == sorted(2 * list(range(1, STEPS // 2 + 1)))


@pytest.mark.slow
def test_corrupt_file_under_ddp_stops_every_rank_at_one_step_and_saves_it(tiny_folder, tmp_path):
    """2 processes; rank 1's third batch holds a damaged file. Both ranks finish steps 1-2,
    stop together before step 3 with one line naming the file, and last.ckpt holds step 2;
    with the file mended, resuming trains steps 3-6 once each."""
    from torchvision.datasets import ImageFolder

    from simclr_lightning.data.sampler import ResumableSampler

    root = tmp_path / "data"
    shutil.copytree(tiny_folder, root, symlinks=True)
    files = [Path(path) for path, _ in ImageFolder(str(root / "train")).samples]
    sampler = ResumableSampler(len(files), num_replicas=2, rank=1, seed=3)  # the config's seed
    sampler.set_epoch(0)
    bad = files[[i for i, _ in sampler][6]]  # rank 1, batch 3 (batches of 3)
    original = damage(bad)

    work = tmp_path / "run"
    config, code, out = ddp_run(root, work, {})
    assert_stopped_on(bad, code, out)
    assert steps_logged(work) == [1, 1, 2, 2], out[-3000:]  # both ranks, steps 1 and 2
    assert global_step(work / "ckpts" / "last.ckpt") == 2
    mend_and_resume(bad, original, config, work)


@pytest.mark.slow
def test_corrupt_validation_file_under_ddp_stops_every_rank_and_saves_the_epoch(
    tiny_folder, tmp_path
):
    """Rank 1's second validation batch holds a damaged file: after epoch 1's three steps both
    ranks stop in validation with one line naming it (rank 0 has no bad file, it would have
    waited for rank 1 in a collective), last.ckpt holds step 3, and with the file mended the
    resumed run trains steps 4-6 once each."""
    from simclr_lightning import ImageFolderDataModule

    root = tmp_path / "data"
    shutil.copytree(tiny_folder, root, symlinks=True)
    dm = ImageFolderDataModule(str(root), batch_size=3, num_workers=0)
    dm.setup("validate")
    served = dm.val_sample()  # the validation images in the order the loader serves them
    rank1 = list(torch.utils.data.DistributedSampler(served, 2, rank=1, shuffle=False))
    bad = Path(dm.val_set.samples[served.indices[rank1[3]]][0])  # rank 1, batch 2 (of 3)
    original = damage(bad)

    work = tmp_path / "run"
    config, code, out = ddp_run(root, work, {"limit_val_batches": None, "num_sanity_val_steps": 0})
    assert_stopped_on(bad, code, out)
    assert steps_logged(work) == [1, 1, 2, 2, 3, 3], out[-3000:]
    assert global_step(work / "ckpts" / "last.ckpt") == 3
    mend_and_resume(bad, original, config, work)


@pytest.mark.slow
def test_corrupt_file_only_the_knn_bank_reads_stops_every_rank_and_saves_the_epoch(
    tiny_folder, tmp_path
):
    """Each rank trains 3 batches of 3 of its 10 images: drop_last leaves one image each that
    no training step reads, and the kNN monitor's bank reads all 20 at the epoch's end. One
    of those two is damaged: both ranks stop in the bank pass together, the other rank
    saying which process read it, and last.ckpt holds step 3."""
    from torchvision.datasets import ImageFolder

    from simclr_lightning.data.sampler import ResumableSampler

    root = tmp_path / "data"
    shutil.copytree(tiny_folder, root, symlinks=True)
    files = [Path(path) for path, _ in ImageFolder(str(root / "train")).samples]
    dropped = []
    for rank in (0, 1):
        sampler = ResumableSampler(len(files), num_replicas=2, rank=rank, seed=3)
        sampler.set_epoch(0)
        dropped += [i for i, _ in list(sampler)[9:]]  # after the 3 full batches
    assert len(dropped) == 2
    bad = files[dropped[0]]
    damage(bad)

    knn = {"class_path": "simclr_lightning.KNNMonitor", "init_args": {"k": 3}}
    trainer = {"limit_val_batches": None, "max_epochs": 1}
    _, code, out = ddp_run(root, tmp_path / "run", trainer, [knn])
    # the bank is split unshuffled: rank r of 2 reads the images r, r + 2, ...
    assert_stopped_on(bad, code, out, reader=dropped[0] % 2)
    assert steps_logged(tmp_path / "run") == [1, 1, 2, 2, 3, 3], out[-3000:]
    assert global_step(tmp_path / "run" / "ckpts" / "last.ckpt") == 3
