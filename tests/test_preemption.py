"""Preemption: a real ``simclr-lightning fit`` process sent SIGTERM (or SLURM's requeue signal)
finishes its step, saves it, exits 143, and resuming reaches the end of the run."""

from __future__ import annotations

import logging
import os
import signal
import sys
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset

from simclr_lightning import CorruptFilesError, CorruptImageError, Preemption, SimCLR
from tests.helpers import quiet_trainer
from tests.preemption_runs import (
    SLURM_JOB,
    STEPS,
    cli,
    descendants,
    fake_slurm,
    global_step,
    outputs,
    signal_after,
    steps_logged,
    wait_for_steps,
    write_config,
)


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
    wait_for_steps([proc], tmp_path, 4)
    workers = descendants(proc.pid)
    assert len(workers) >= 2  # the training loader's
    for pid in [proc.pid, *workers]:
        os.kill(pid, signal.SIGTERM)
    (out,) = outputs([proc])
    assert proc.returncode == 143, out[-3000:]
    assert "killed by signal" not in out
    done = steps_logged(tmp_path)
    assert global_step(tmp_path / "ckpts" / "last.ckpt") == done[-1] >= 4


def test_slurm_signal_requeues_and_the_requeued_job_resumes_from_the_step(tiny_folder, tmp_path):
    config = write_config(tiny_folder, tmp_path)
    env = fake_slurm(tmp_path)
    code, out = signal_after(cli(config, env=env), tmp_path, signal.SIGUSR1, step=4)
    assert code == 143, out[-3000:]
    assert (tmp_path / "scontrol.txt").read_text().split() == ["requeue", SLURM_JOB]
    done = steps_logged(tmp_path)
    # hpc_ckpt_1: the step the warning came in, saved at its end, before the requeue; the
    # newest holds the step that was finishing when the requeue's SIGTERM came
    warned = global_step(tmp_path / "hpc_ckpt_1.ckpt")
    assert 4 <= warned <= global_step(tmp_path / "hpc_ckpt_2.ckpt") == done[-1] < STEPS

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


@pytest.mark.usefixtures("one_thread")
def test_a_stop_before_any_step_keeps_the_checkpoint_resumed_from(tmp_path, caplog):
    """A resumed run whose first batch holds a corrupt file (or that a data check, setup or a
    SIGTERM stops before a step) has nothing new to save: writing one replaced the trained
    last.ckpt with the state before training. Reference: the file's bytes before the run."""

    def fit(bad: int, ckpt_path=None, steps: int = 2) -> None:
        L.seed_everything(0, verbose=False)
        model = SimCLR(cifar_stem=False, head_hidden_dim=32, head_output_dim=16, warmup_epochs=0)
        trainer = quiet_trainer(
            max_steps=steps,
            precision="32-true",
            enable_checkpointing=True,
            callbacks=[Preemption(), ModelCheckpoint(tmp_path, save_last=True)],
        )
        trainer.fit(model, DataLoader(BadFileAt(24, bad=bad), batch_size=3), ckpt_path=ckpt_path)

    fit(bad=-1)  # no bad file: 2 steps, saved
    last = tmp_path / "last.ckpt"
    trained = last.read_bytes()
    assert torch.load(last, weights_only=False)["global_step"] == 2
    # resumed (a plain loader starts its epoch again: its first batch); a fresh run
    for bad, ckpt_path in ((1, last), (1, None)):
        caplog.clear()
        with pytest.raises(CorruptImageError, match=f"{bad}.jpg"), caplog.at_level(logging.INFO):
            fit(bad, ckpt_path, steps=4)
        assert last.read_bytes() == trained
        assert "no checkpoint written" in caplog.text


class AsIfTwoProcesses(Preemption):
    """Preemption seeing the real Trainer's state with world_size 2: one process of a DDP run,
    without starting a second."""

    def on_exception(self, trainer, pl_module, exception):
        class Proxy:
            world_size = 2

            def __getattr__(self, name):
                return getattr(trainer, name)

        super().on_exception(Proxy(), pl_module, exception)


class VerifyFails(L.LightningDataModule):
    """data.verify's error, raised in setup as every process of a DDP run raises it."""

    def setup(self, stage: str) -> None:
        raise CorruptFilesError([("/data/train/a/bad.jpg", "empty file")], 24, None)


LONE_WARNING = "a corrupt image stopped one process of a distributed run"


@pytest.mark.usefixtures("one_thread")
def test_a_data_check_in_setup_under_ddp_warns_of_no_lost_checkpoint(tmp_path, caplog):
    """Stopped in setup, nothing trained: not "the last checkpoint is the one ModelCheckpoint
    wrote" (there is none), only what one process says. After trained steps a lone corrupt
    image still warns, and nothing is saved (the other ranks wait in a collective)."""

    def fit(data: dict) -> list[str]:
        L.seed_everything(0, verbose=False)
        model = SimCLR(cifar_stem=False, head_hidden_dim=32, head_output_dim=16, warmup_epochs=0)
        trainer = quiet_trainer(
            max_steps=8,
            precision="32-true",
            enable_checkpointing=True,
            callbacks=[AsIfTwoProcesses(), ModelCheckpoint(tmp_path, save_last=True)],
        )
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
            warnings.simplefilter("always")
            with pytest.raises(CorruptImageError):
                trainer.fit(model, **data)
        assert trainer.global_step == (4 if "train_dataloaders" in data else 0)
        return [str(w.message) for w in caught]

    said = fit({"datamodule": VerifyFails()})
    assert not [m for m in said if LONE_WARNING in m], said
    assert "stopped before this run finished a step: no checkpoint written" in caplog.text
    caplog.clear()
    said = fit({"train_dataloaders": DataLoader(BadFileAt(24, bad=13), batch_size=3)})
    assert [m for m in said if LONE_WARNING in m], said
    assert not list(tmp_path.glob("*.ckpt"))  # 4 steps, no epoch end: nothing could be saved
