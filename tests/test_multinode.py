"""Multi-process training through the CLI with ``trainer.sync_batchnorm: true``: two torchrun
"nodes" of one process each (rendezvous on 127.0.0.1), and Lightning's own 2-process launch,
train step for step as one process holding both batches."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from torch.utils.data import DistributedSampler

from tests.helpers import REPO
from tests.multinode_parts import IMAGES

STEPS, PER_RANK = 3, 4
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    "OMP_NUM_THREADS": "1",  # 2 shared cores: no spinning thread pairs
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(tmp_path: Path, name: str, trainer: dict, data: dict) -> Path:
    """A tiny deterministic SimCLR run in float64: fixed data, no warm-up, SGD, BatchNorm on
    the global batch (every BatchNorm shapes the output: no zero-initialised residual branches)."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            # float64: these tiny batches amplify float32 rounding (the same run differs by 2e-4
            # between 1 and 2 processes at step 3 in float32, by 7e-15 in float64)
            "precision": "64-true",
            "sync_batchnorm": True,
            "max_steps": STEPS,
            "limit_val_batches": 0,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path / name),
            "callbacks": [
                {
                    "class_path": "tests.multinode_parts.LossRecorder",
                    "init_args": {"out": str(tmp_path / name)},
                }
            ],
            **trainer,
        },
        "model": {
            "class_path": "simclr_lightning.SimCLR",
            "init_args": {
                "backbone": "resnet18",
                "cifar_stem": False,
                "zero_init_residual": False,
                "head_hidden_dim": 32,
                "head_output_dim": 16,
                "optimizer": "sgd",
                "base_lr": 0.5,
                "warmup_epochs": 0,
            },
        },
        "data": {"class_path": "tests.multinode_parts.PairData", "init_args": data},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def records(tmp_path: Path, name: str, world: int) -> list[dict]:
    return [json.loads((tmp_path / name / f"rank{r}.json").read_text()) for r in range(world)]


def launch(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, env=ENV, cwd=REPO, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def check(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-4000:]


def rank_batches(world: int) -> list[list[list[int]]]:
    """The sample ids of each step on each rank: Lightning shuffles training data under DDP with
    torch's DistributedSampler (seed 0, reshuffled every epoch)."""
    per_rank = []
    for rank in range(world):
        sampler = DistributedSampler(range(IMAGES), num_replicas=world, rank=rank, seed=0)
        ids = []
        for epoch in range(STEPS):
            sampler.set_epoch(epoch)
            ids += list(sampler)
        per_rank.append([ids[k * PER_RANK : (k + 1) * PER_RANK] for k in range(STEPS)])
    return per_rank


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> list[float]:
    """The reference's per-step losses: one process whose batch at each step is the
    concatenation of what the 2 ranks see at that step (so the global batch, and the
    learning-rate rule's B, are the same)."""
    tmp_path = tmp_path_factory.mktemp("one_process")
    per_step = [[i for r in rank_batches(2) for i in r[k]] for k in range(STEPS)]
    order = [i for ids in per_step for i in ids]
    config = write_config(
        tmp_path, "one", {"devices": 1}, {"batch_size": 2 * PER_RANK, "order": order}
    )
    check([launch([sys.executable, "-m", "simclr_lightning", "fit", "--config", str(config)])])
    (one,) = records(tmp_path, "one", 1)
    assert one["batchnorm"] == ["BatchNorm1d", "BatchNorm2d", "ScaleBatchNorm1d"]  # plain BN
    assert [s["ids"] for s in one["steps"]] == per_step
    return [s["loss"] for s in one["steps"]]


def check_ranks(ranks: list[dict]) -> None:
    expected = rank_batches(2)
    for rank, r in enumerate(ranks):
        assert "GlobalBatchNorm2d" in r["batchnorm"]
        assert [s["ids"] for s in r["steps"]] == expected[rank]


def mean_losses(ranks: list[dict]) -> list[float]:
    """Each rank's loss is the mean over its own anchors (against every rank's negatives)."""
    return [sum(r["steps"][k]["loss"] for r in ranks) / len(ranks) for k in range(STEPS)]


def test_two_torchrun_nodes_train_as_one_process_holding_both_batches(tmp_path, one_process):
    config = write_config(
        tmp_path, "nodes", {"devices": 1, "num_nodes": 2, "strategy": "ddp"}, {"batch_size": 4}
    )
    port = free_port()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1"]
    torchrun += ["--master_addr=127.0.0.1", f"--master_port={port}"]
    fit = ["-m", "simclr_lightning", "fit", "--config", str(config)]
    procs = [launch(torchrun + [f"--node_rank={node}"] + fit) for node in (0, 1)]
    check(procs)
    ranks = records(tmp_path, "nodes", 2)
    for rank, r in enumerate(ranks):
        assert (r["world_size"], r["num_nodes"], r["node_rank"]) == (2, 2, rank)
        assert r["environment"] == "TorchElasticEnvironment"
    check_ranks(ranks)
    assert mean_losses(ranks) == pytest.approx(one_process, rel=1e-12)


def test_cli_sync_batchnorm_with_two_cpu_processes_launched_by_lightning(tmp_path, one_process):
    """``--trainer.sync_batchnorm true --trainer.devices 2 --trainer.strategy ddp`` on CPU
    (torch's SyncBatchNorm would stop it: "only work with GPU modules")."""
    config = write_config(tmp_path, "ddp", {}, {"batch_size": 4})
    cmd = [sys.executable, "-m", "simclr_lightning", "fit", "--config", str(config)]
    cmd += ["--trainer.sync_batchnorm=true", "--trainer.devices=2", "--trainer.strategy=ddp"]
    check([launch(cmd)])
    ranks = records(tmp_path, "ddp", 2)
    check_ranks(ranks)
    assert mean_losses(ranks) == pytest.approx(one_process, rel=1e-12)
