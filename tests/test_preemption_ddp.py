"""Preemption under DDP: a signal that reaches any process of a 2-process ``simclr-lightning
fit`` (Lightning's launcher, or SLURM's tasks) stops every process after the same step, which
is saved once, and the run resumes from it."""

from __future__ import annotations

import os
import signal
import socket
import sys

import pytest
import torch
import yaml

from tests.preemption_runs import (
    ONE_SLURM_TASK,
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


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
@pytest.mark.parametrize("who", ["rank 1 alone", "every process"])
def test_sigterm_to_any_rank_under_ddp_stops_every_rank_after_one_step(tiny_folder, tmp_path, who):
    """A signal that reaches rank 1 but not rank 0 (a ``kill`` of one process; torchrun's
    agent), or every process at once (SLURM, with the ranks' loader workers): all ranks agree
    on one step, finish it, save it and exit 143. Lightning alone broadcasts from inside the
    signal handler, which meets whatever collective the other rank is in: that run hung."""
    config = write_config(tiny_folder, tmp_path)
    settings = yaml.safe_load(config.read_text())
    settings["trainer"] |= {"devices": 2, "strategy": "ddp"}
    if who == "every process":
        settings["data"]["init_args"]["num_workers"] = 1
    config.write_text(yaml.safe_dump(settings))
    proc = cli(config)
    wait_for_steps([proc], tmp_path, 4)  # 2 steps, each logged by both ranks
    processes = descendants(proc.pid)  # rank 1 (Lightning starts it), and the workers
    if who == "rank 1 alone":
        targets = processes  # no workers: rank 1 is the only one
        assert len(targets) == 1
    else:
        targets = [proc.pid, *processes]
        assert len(targets) >= 4  # 2 ranks, a worker each
    for pid in targets:
        os.kill(pid, signal.SIGTERM)
    (out,) = outputs([proc])
    assert proc.returncode == 143, out[-3000:]
    done = steps_logged(tmp_path)
    assert done == sorted(2 * list(range(1, done[-1] + 1)))  # both stopped after one step
    assert global_step(tmp_path / "ckpts" / "last.ckpt") == done[-1] < STEPS // 2


def slurm_tasks(env: dict[str, str], n: int) -> list[dict[str, str]]:
    """The environment of each of the ``n`` tasks srun starts on one node for a job of ``n``
    tasks: SLURM, not Lightning, starts every process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    job = {**env, "SLURM_NTASKS": str(n), "SLURM_NTASKS_PER_NODE": str(n)}
    job |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    return [job | {"SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)} for r in range(n)]


@pytest.mark.slow
def test_slurm_requeue_signal_to_every_task_saves_a_finished_step_and_requeues_once(
    tiny_folder, tmp_path
):
    """A 2-task SLURM job sent its warning signal (``--signal=USR1@90`` reaches every task):
    both save the same finished step and rank 0 requeues the job; the requeue's SIGTERM
    (here to rank 0 only) stops both after one step, saved again; the requeued job resumes
    from it. Lightning's own handlers save and broadcast inside the signal handler, meeting
    whatever collective the other task is in."""
    config = write_config(tiny_folder, tmp_path)
    settings = yaml.safe_load(config.read_text())
    settings["trainer"] |= {"devices": 2, "strategy": "ddp"}
    config.write_text(yaml.safe_dump(settings))
    tasks = slurm_tasks(fake_slurm(tmp_path), 2)
    assert tasks[0]["SLURM_JOB_ID"] == ONE_SLURM_TASK["SLURM_JOB_ID"] == SLURM_JOB
    procs = [cli(config, env=env) for env in tasks]
    wait_for_steps(procs, tmp_path, 4)  # 2 steps, each logged by both tasks
    for p in procs:
        p.send_signal(signal.SIGUSR1)
    outs = outputs(procs)
    assert [p.returncode for p in procs] == [143, 143], outs[0][-3000:] + outs[1][-3000:]
    assert (tmp_path / "scontrol.txt").read_text().split() == ["requeue", SLURM_JOB]
    done = steps_logged(tmp_path)
    assert done == sorted(2 * list(range(1, done[-1] + 1)))  # both stopped after one step
    warned, stopped = (global_step(tmp_path / f"hpc_ckpt_{n}.ckpt") for n in (1, 2))
    assert 2 <= warned <= stopped == done[-1] < STEPS // 2  # both at the end of a step

    requeued = [cli(config, env=env) for env in tasks]  # SLURM reruns the same tasks
    outs = outputs(requeued, timeout=300)
    assert [p.returncode for p in requeued] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert steps_logged(tmp_path) == sorted(2 * list(range(1, STEPS // 2 + 1)))
