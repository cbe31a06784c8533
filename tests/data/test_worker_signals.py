"""Loader workers survive a stop signal that a scheduler sends to every process (SLURM's
SIGTERM and --signal warning), so the training process can finish its step and save it; the
training process's own SIGTERM still ends them."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader, Dataset

from simclr_lightning.data.worker_signals import shield_from_stop_signals

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="sigwaitinfo and /proc: Linux")


class Slow(Dataset):
    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int) -> torch.Tensor:
        time.sleep(0.02)
        return torch.tensor(i)


def signal_from_another_process(pid: int, *signums: int) -> None:
    """As a scheduler does: the sender is not the worker's parent (torch's own worker handler
    tells the two apart)."""
    for signum in signums:
        subprocess.run(["kill", f"-{signal.Signals(signum).name[3:]}", str(pid)], check=True)


def loader(shielded: bool, context: str | None = None) -> DataLoader:
    init = shield_from_stop_signals if shielded else None
    return DataLoader(
        Slow(), batch_size=4, num_workers=2, worker_init_fn=init, multiprocessing_context=context
    )


def test_without_the_shield_a_scheduler_sigterm_kills_the_loader_mid_epoch():
    batches = iter(loader(shielded=False))
    next(batches)
    with pytest.raises(RuntimeError, match="killed by signal: Terminated|exited unexpectedly"):
        signal_from_another_process(batches._workers[0].pid, signal.SIGTERM)
        for _ in batches:
            time.sleep(0.05)


def test_shielded_workers_serve_every_batch_through_stop_signals_from_others():
    batches = iter(loader(shielded=True))
    seen = [next(batches)]
    for worker in batches._workers:
        signal_from_another_process(worker.pid, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
    time.sleep(0.3)
    assert all(w.is_alive() for w in batches._workers)
    seen += list(batches)  # the epoch ends; the workers are shut down as usual
    assert torch.cat(seen).tolist() == list(range(24))
    assert [w.exitcode for w in batches._workers] == [0, 0]


@pytest.mark.parametrize("context", ["fork", "forkserver"])  # forkserver: Python 3.14's default
def test_the_parents_sigterm_still_ends_a_shielded_worker_at_once(context):
    batches = iter(loader(shielded=True, context=context))
    next(batches)
    worker = batches._workers[0]
    worker.terminate()  # what torch's shutdown and multiprocessing at exit send
    worker.join(timeout=5)
    assert not worker.is_alive() and worker.exitcode == 0
    batches._shutdown_workers()


def test_the_data_modules_training_and_evaluation_loaders_are_shielded(cifar_tiny):
    from simclr_lightning import ImageFolderDataModule

    data = ImageFolderDataModule(str(cifar_tiny), batch_size=4, num_workers=1)
    data.setup("fit")
    for made in (data.train_dataloader(), data.val_dataloader(), data.eval_train_dataloader()):
        assert made.worker_init_fn is shield_from_stop_signals


class Draws(Dataset):
    """What a user's transform draws from NumPy's and Python's global generators."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> tuple[int, float]:
        return np.random.randint(0, 2**31), random.random()


def worker_draws(rank: int, monkeypatch) -> set[float]:
    """One worker's draws in process ``rank``, its loader seeded as every rank seeds it."""
    monkeypatch.setattr(rank_zero_only, "rank", rank)  # what Lightning reads in the worker
    loader = DataLoader(
        Draws(),
        batch_size=4,
        num_workers=1,
        worker_init_fn=shield_from_stop_signals,
        generator=torch.Generator().manual_seed(0),
    )
    ints, floats = next(iter(loader))
    return set(ints.tolist()) | set(floats.tolist())


def test_a_shielded_worker_keeps_lightnings_rank_aware_seeding(monkeypatch):
    """With a worker_init_fn of its own a loader does not get Lightning's, which under
    seed_everything(workers=True) gives each rank's workers their own NumPy and random
    streams: the shield applies it, so two ranks draw apart, the same again run to run."""
    monkeypatch.setenv("PL_SEED_WORKERS", "1")
    rank0, rank1 = worker_draws(0, monkeypatch), worker_draws(1, monkeypatch)
    assert len(rank0) == 8 and not rank0 & rank1
    assert worker_draws(0, monkeypatch) == rank0
