"""What a stop leaves for the runs after it: the ``last.ckpt`` a resumed run must bring to its
final step, the ``hpc_ckpt`` files a finished requeued job must not leave to the next job,
and the gradients of an accumulation a stop must not cut in two. Real trainers, stopped by a
real SIGTERM (or SLURM's requeue signal) to this process in a given training step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from subprocess import PIPE, STDOUT

import lightning as L
import pytest
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from simclr_lightning import Preemption
from tests.helpers import REPO, quiet_trainer
from tests.preemption_leftover_runs import ACCUMULATE, BATCHES, Weight, loader
from tests.preemption_runs import fake_slurm, global_step, outputs

pytestmark = pytest.mark.usefixtures("one_thread")


def fit(model: Weight, ckpt_path: str | None = None, **kwargs) -> L.Trainer:
    """A 2-epoch fit; a stop's SIGTERMException is the caller's to expect."""
    kwargs = {"max_epochs": 2, "callbacks": [Preemption()]} | kwargs
    trainer = quiet_trainer(**kwargs)
    trainer.fit(model, loader(), ckpt_path=ckpt_path)
    return trainer


def test_a_resumed_run_brings_the_stops_last_ckpt_to_its_final_step(tmp_path, caplog):
    """Stopped in epoch 0, before ModelCheckpoint(save_last=True) had saved: the resumed run
    found a last.ckpt that was not its own, put its final step into last-v1.ckpt, and left
    last.ckpt at the stop for ``--ckpt_path last``."""
    folder = tmp_path / "ckpts"

    def checkpointing() -> dict:
        checkpoint = ModelCheckpoint(dirpath=folder, save_last=True)
        return {"enable_checkpointing": True, "callbacks": [Preemption(), checkpoint]}

    whole = Weight()
    fit(whole)
    with pytest.raises(SIGTERMException), caplog.at_level("INFO"):
        fit(Weight(at=2), **checkpointing())
    assert "`weights_only` was not set" not in caplog.text  # said on every rank at every stop
    assert sorted(os.listdir(folder)) == ["last.ckpt"] and global_step(folder / "last.ckpt") == 2

    resumed = Weight()
    assert fit(resumed, ckpt_path="last", **checkpointing()).global_step == 2 * BATCHES
    assert sorted(os.listdir(folder)) == [f"epoch=1-step={2 * BATCHES}.ckpt", "last.ckpt"]
    last = torch.load(folder / "last.ckpt", weights_only=False)
    assert last["global_step"] == 2 * BATCHES
    assert torch.equal(last["state_dict"]["w"], whole.w.detach())


def test_a_finished_resume_in_a_new_logger_version_removes_the_stops_last(tmp_path):
    """Logged in versioned folders, without ModelCheckpoint(save_last=True): the resumed run
    logs to version_1 and removed a last.ckpt only there, so version_0's stop file stayed and a
    later ``--ckpt_path last`` went back to it, dropping the steps trained since."""
    from lightning.pytorch.loggers import CSVLogger

    from simclr_lightning.callbacks.preemption import same_last

    def logged() -> dict:
        return {"enable_checkpointing": True, "logger": CSVLogger(tmp_path, name="run")}

    with pytest.raises(SIGTERMException):
        fit(Weight(at=2), **logged())
    stop = tmp_path / "run" / "version_0" / "checkpoints" / "last.ckpt"
    assert global_step(stop) == 2
    assert fit(Weight(), ckpt_path=str(stop), **logged()).global_step == 2 * BATCHES
    assert not stop.exists()
    assert list((tmp_path / "run" / "version_1" / "checkpoints").glob("epoch=1-*.ckpt"))
    own = "/r/run/version_1/checkpoints/last.ckpt"
    assert not same_last("/r/other/version_0/checkpoints/last.ckpt", own)
    assert not same_last("/r/run/version_0/checkpoints/epoch=0-step=2.ckpt", own)


@pytest.mark.parametrize("layout", ["versions", "folders"])
def test_a_finished_resume_keeps_another_runs_last(tmp_path, layout):
    """A last.ckpt that ModelCheckpoint(save_last=True) wrote for a finished run, in an earlier
    logger version or in a folder beside this run's, went when a run without save_last
    resumed from it and finished: only a stop's own file may go."""
    from lightning.pytorch.loggers import CSVLogger

    def run(name: str, keeps_last: bool) -> dict:
        logger = CSVLogger(tmp_path, name="run") if layout == "versions" else False
        folder = None if layout == "versions" else tmp_path / "outputs" / name / "checkpoints"
        saves = ModelCheckpoint(folder, save_last=keeps_last, save_top_k=1)
        return {"enable_checkpointing": True, "logger": logger, "callbacks": [Preemption(), saves]}

    fit(Weight(), max_epochs=1, **run("a", keeps_last=True))
    if layout == "versions":
        first = tmp_path / "run" / "version_0" / "checkpoints" / "last.ckpt"
    else:
        first = tmp_path / "outputs" / "a" / "checkpoints" / "last.ckpt"
    assert global_step(first) == BATCHES
    resumed = fit(Weight(), ckpt_path=str(first), **run("b", keeps_last=False))
    assert resumed.global_step == 2 * BATCHES
    assert first.exists() and global_step(first) == BATCHES


@pytest.mark.skipif(sys.platform == "win32", reason="a shell script as scontrol")
def test_a_finished_requeued_job_leaves_no_hpc_checkpoint_for_the_next_job(tmp_path, monkeypatch):
    """A SLURM job warned (requeued, then stopped), requeued, stopped again, requeued, and
    finished: its hpc_ckpt files went to the next job in the folder, which resumed from the
    first job's stop instead of starting."""
    for name, value in fake_slurm(tmp_path).items():  # its scontrol sends the job SIGTERM
        monkeypatch.setenv(name, value)

    def job(model: Weight, steps: int = 2 * BATCHES) -> L.Trainer:
        plugins = [SLURMEnvironment(auto_requeue=True)]
        return fit(
            model, max_epochs=None, max_steps=steps, default_root_dir=tmp_path, plugins=plugins
        )

    def hpc() -> list[str]:
        return sorted(name for name in os.listdir(tmp_path) if name.startswith("hpc_ckpt_"))

    with pytest.raises(SIGTERMException):  # warned in step 2: saved, requeued, stopped
        job(Weight(at=2, signum=signal.SIGUSR1))
    assert hpc() == ["hpc_ckpt_1.ckpt", "hpc_ckpt_2.ckpt"]
    with pytest.raises(SIGTERMException):  # the requeued job, preempted in its step 2
        job(Weight(at=2))
    assert hpc() == ["hpc_ckpt_1.ckpt", "hpc_ckpt_2.ckpt", "hpc_ckpt_3.ckpt"]
    assert global_step(tmp_path / "hpc_ckpt_3.ckpt") == 4

    finished = job(Weight())
    assert finished.ckpt_path == str(tmp_path / "hpc_ckpt_3.ckpt")
    assert finished.global_step == 2 * BATCHES and hpc() == []

    fresh = Weight()
    new_job = job(fresh, steps=1)
    assert new_job.ckpt_path is None and new_job.global_step == fresh.batches == 1

    # A resumed job warned in its last step finishes before SLURM stops it: requeued, it
    # comes back and resumes from the newest. (This scontrol sends no SIGTERM.)
    (tmp_path / "bin" / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/q.txt\n')
    job(Weight(at=1, signum=signal.SIGUSR1), steps=1)  # a new job, warned: hpc_ckpt_1
    assert hpc() == ["hpc_ckpt_1.ckpt"]
    job(Weight(at=1, signum=signal.SIGUSR1), steps=2)  # resumed from it, warned in step 2
    assert hpc() == ["hpc_ckpt_1.ckpt", "hpc_ckpt_2.ckpt"]
    assert job(Weight(), steps=2).ckpt_path == str(tmp_path / "hpc_ckpt_2.ckpt")
    assert hpc() == [] and len((tmp_path / "q.txt").read_text().splitlines()) == 2


@pytest.mark.parametrize(
    ("at", "steps"),
    [(4, 2), (7, 3)],
    ids=["held to the epoch's partial step", "held to the next step"],
)
def test_a_stop_in_an_accumulation_waits_for_its_step_and_resumes_exactly(tmp_path, at, steps):
    """Accumulating 3 batches of 5 an epoch (steps after batches 3, 5, 8, 10): a SIGTERM in
    batch 4 or 7 stopped after it, and the resumed run's step lacked the gradients of the
    batches before the stop (no checkpoint holds them)."""
    accumulating = {"accumulate_grad_batches": ACCUMULATE, "default_root_dir": tmp_path}
    whole = Weight()
    assert fit(whole, **accumulating).global_step == 4
    with pytest.raises(SIGTERMException):
        fit(Weight(at=at), **accumulating)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved["global_step"] == steps
    batches = saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"]
    assert batches == {2: 5, 3: 8}[steps]  # the batch that stepped, not the one signalled

    resumed = Weight()
    assert fit(resumed, ckpt_path=str(tmp_path / "last.ckpt"), **accumulating).global_step == 4
    assert resumed.batches == 2 * BATCHES - batches
    assert torch.equal(resumed.w, whole.w)


@pytest.mark.slow
def test_under_ddp_a_stop_in_an_accumulation_waits_for_its_step_in_every_process(tmp_path):
    """2 processes accumulating as above, SIGTERM to rank 1 alone in batch 7: both stopped
    after it, agreed; now both go on to batch 8, whose step is saved, and resume exactly."""
    whole = Weight()  # each process's batches have the same gradient: DDP's mean is the same
    fit(whole, accumulate_grad_batches=ACCUMULATE)
    run = ["-m", "tests.preemption_leftover_runs", str(tmp_path)]

    def ddp(*args: str) -> tuple[int, str]:
        cmd = [sys.executable, *run, *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=PIPE, stderr=STDOUT)
        (out,) = outputs([proc])  # (a hung run is killed with rank 1)
        return proc.returncode, out

    code, out = ddp("7")
    assert code == 143, out[-3000:]
    assert sorted((tmp_path / "batches.txt").read_text().splitlines()) == ["0 8", "1 8"]
    assert global_step(tmp_path / "last.ckpt") == 3

    (tmp_path / "batches.txt").unlink()
    code, out = ddp()
    assert code == 0, out[-3000:]
    assert sorted((tmp_path / "batches.txt").read_text().splitlines()) == ["0 2", "1 2"]
    assert torch.equal(torch.load(tmp_path / "w.pt"), whole.w.detach())
