"""Where Preemption saves under SLURM's auto-requeue, read without trusting Lightning's private
connectors to stay where they are: a save while a job is being stopped must not fail on them."""

from __future__ import annotations

import os
import signal
import sys
import types
from pathlib import Path

import pytest
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector

from simclr_lightning.callbacks.preemption import (
    Preemption,
    cluster_environment,
    hpc_save_path,
    requeue_slurm_job,
)
from simclr_lightning.callbacks.signal_agreement import REQUEUE, STOP, SignalAgreement
from tests.helpers import quiet_trainer
from tests.preemption_runs import ONE_SLURM_TASK, SLURM_JOB


@pytest.fixture(autouse=True)
def one_slurm_task(monkeypatch):
    for name, value in ONE_SLURM_TASK.items():
        monkeypatch.setenv(name, value)


def slurm_trainer(tmp_path, **kwargs):
    return quiet_trainer(
        default_root_dir=str(tmp_path), plugins=[SLURMEnvironment(auto_requeue=True)], **kwargs
    )


def test_the_next_hpc_checkpoint_is_lightnings_name_with_or_without_its_helper(
    tmp_path, monkeypatch
):
    trainer = slurm_trainer(tmp_path)
    for name in ("hpc_ckpt_1.ckpt", "hpc_ckpt_3.ckpt", "last.ckpt", ".partial-k3x9.tmp"):
        (tmp_path / name).touch()
    lightnings = _CheckpointConnector.hpc_save_path(str(tmp_path))  # what its resume expects
    assert lightnings.endswith("hpc_ckpt_4.ckpt")
    assert hpc_save_path(trainer) == lightnings
    monkeypatch.delattr(_CheckpointConnector, "hpc_save_path")  # a release without it
    assert hpc_save_path(trainer) == lightnings
    for name in ("hpc_ckpt_1.ckpt", "hpc_ckpt_3.ckpt"):
        (tmp_path / name).unlink()
    assert hpc_save_path(trainer) == str(tmp_path / "hpc_ckpt_1.ckpt")


def test_the_cluster_environment_is_read_from_the_strategy_or_the_connector(tmp_path):
    one = slurm_trainer(tmp_path)  # one device: only the accelerator connector has it
    assert isinstance(cluster_environment(one), SLURMEnvironment) and Preemption.requeues(one)
    ddp = slurm_trainer(tmp_path, strategy="ddp")  # multi-process strategies have it publicly
    without_connector = types.SimpleNamespace(strategy=ddp.strategy)
    assert cluster_environment(without_connector) is ddp.strategy.cluster_environment
    assert Preemption.requeues(without_connector)
    # neither: not a requeueing run (last.ckpt), rather than an AttributeError mid-stop
    bare = types.SimpleNamespace(strategy=object())
    assert cluster_environment(bare) is None and not Preemption.requeues(bare)


@pytest.mark.parametrize("auto_requeue", [True, False])
def test_requeues_follows_the_plugins_setting(tmp_path, auto_requeue):
    trainer = quiet_trainer(plugins=[SLURMEnvironment(auto_requeue=auto_requeue)])
    assert Preemption.requeues(trainer) is auto_requeue


def fake_scontrol(tmp_path, monkeypatch, code: int = 0) -> Path:
    """An ``scontrol`` first on PATH that records its arguments and exits with ``code``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.txt\nexit {code}\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path / "scontrol.txt"


@pytest.mark.skipif(sys.platform == "win32", reason="a shell script as scontrol")
def test_the_requeue_names_the_job_or_the_array_task_as_slurm_wants(tmp_path, monkeypatch):
    calls = fake_scontrol(tmp_path, monkeypatch)
    requeue_slurm_job()
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")  # a task of an array job: 77_3, not the job
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    requeue_slurm_job()
    assert calls.read_text().splitlines() == [f"requeue {SLURM_JOB}", "requeue 77_3"]


@pytest.mark.skipif(sys.platform == "win32", reason="a shell script as scontrol")
def test_a_failed_or_impossible_requeue_warns_and_the_run_goes_on(tmp_path, monkeypatch):
    fake_scontrol(tmp_path, monkeypatch, code=1)
    with pytest.warns(UserWarning, match=f"requeueing SLURM job {SLURM_JOB} failed \\(1\\)"):
        requeue_slurm_job()
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))  # no scontrol at all
    with pytest.warns(UserWarning, match="failed \\(FileNotFoundError"):
        requeue_slurm_job()
    monkeypatch.setenv("SLURM_JOB_ID", "4242; rm -rf /")
    with pytest.warns(UserWarning, match="not requeued: SLURM_JOB_ID="):
        requeue_slurm_job()


def test_the_agreement_requeues_once_and_sets_lightnings_stop_flag():
    """One process, the handlers already in place: a second requeue signal (a task whose
    signal came a step after the others') is not acted on again; a SIGTERM sets the flag
    Lightning stops on; nothing noted, nothing done."""
    connector = types.SimpleNamespace(received_sigterm=False)
    trainer = types.SimpleNamespace(world_size=1, _signal_connector=connector)
    agreement = SignalAgreement()
    agreement.handles = STOP | REQUEUE
    assert agreement.agree(trainer) == 0
    agreement.note_requeue(signal.SIGUSR1, None)
    assert agreement.agree(trainer) == REQUEUE and not connector.received_sigterm
    agreement.note_requeue(signal.SIGUSR1, None)
    assert agreement.agree(trainer) == 0
    agreement.note_stop(signal.SIGTERM, None)
    assert agreement.agree(trainer) == STOP and connector.received_sigterm
