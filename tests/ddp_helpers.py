"""What the distributed tests share: worker code for real process groups over gloo on CPU, and
the one Trainer setup of the scripts that Lightning's "ddp" strategy relaunches per device."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

import simclr_lightning.loss as loss_module
from simclr_lightning import NTXentLoss, SimCLR


def gather_without_grad(tensor: torch.Tensor) -> torch.Tensor:
    """The classic bug: negatives from other ranks carry no gradient, nor does our slice."""
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out)


def gather_local_grad_only(tensor: torch.Tensor) -> torch.Tensor:
    """The half fix: our own slice keeps its gradient, other ranks' gradients are dropped."""
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    out[dist.get_rank()] = tensor
    return torch.cat(out)


BROKEN_GATHERS = {"nograd": gather_without_grad, "localgrad": gather_local_grad_only}
CORRECT_GATHER = loss_module.gather_with_grad


def use_gather(mode: str) -> None:
    """The library's gather, or a broken one (also back again: runs share a process)."""
    loss_module.gather_with_grad = CORRECT_GATHER if mode == "correct" else BROKEN_GATHERS[mode]


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 8))


def global_batch(world: int, per_rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(world * per_rank, 10, generator=gen), torch.randn(
        world * per_rank, 10, generator=gen
    )


def spawn_gloo(fn, nprocs: int, args_with_init, folder: Path, attempts: int = 3) -> None:
    """``torch.multiprocessing.spawn`` of ``fn`` with ``args_with_init(init_file)``, a fresh
    gloo init file per attempt. On the loaded 2-core CI machine gloo's connectFullMesh now
    and then fails ("Connection closed by peer") before any code under test runs: that
    transport failure alone is tried again."""
    import torch.multiprocessing as mp

    for attempt in range(attempts):
        init = str(folder / f"init{attempt}")
        try:
            mp.spawn(fn, args=args_with_init(init), nprocs=nprocs, join=True)
            return
        except mp.ProcessRaisedException as err:
            if "connectFullMesh failed" not in str(err) or attempt == attempts - 1:
                raise


def torch_ddp_worker(rank, world, init_file, out_dir, modes, per_rank, temperature):
    """One step per gather mode in ``modes`` (one spawn for all), saved to rank<r>_<mode>.pt."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for mode in modes:
            _torch_ddp_step(rank, world, out_dir, mode, per_rank, temperature)
    finally:
        dist.destroy_process_group()


def _torch_ddp_step(rank, world, out_dir, mode, per_rank, temperature):
    use_gather(mode)
    model = nn.parallel.DistributedDataParallel(mlp(seed=0))
    x_a, x_b = global_batch(world, per_rank, seed=1)
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    # One forward over both views, as DDP expects one forward per backward.
    z_a, z_b = model(torch.cat([x_a[mine], x_b[mine]])).chunk(2)
    # Tiles of 3 of the 2N anchors: tiles straddle the two views.
    loss, stats = NTXentLoss(temperature, block_size=3).forward_with_stats(z_a, z_b)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    out = {"loss": loss.detach(), "grads": grads, "stats": stats}
    torch.save(out, f"{out_dir}/rank{rank}_{mode}.pt")


def run_ddp_script(script: str, devices: int, out: Path, *args: str) -> list[dict]:
    """Run ``tests/<script> --devices N --out OUT ARGS`` as a user runs a training script, and
    load what each rank saved (``rank<r>_of<N>.pt``)."""
    out.mkdir(parents=True)
    _launch(script, devices, out, list(args))
    return [torch.load(out / f"rank{r}_of{devices}.pt") for r in range(devices)]


def run_ddp_script_runs(
    script: str, devices: int, out: Path, runs: dict[str, list[str]], *args: str
) -> dict[str, list[dict]]:
    """Several runs of ``script`` one after the other in one launch of its ``devices``
    processes (each process start imports torch and Lightning: seconds on 2 cores): run
    ``name`` gets ``ARGS`` and its own ``runs[name]`` and saves under ``OUT/name``; what each
    rank saved, by run."""
    out.mkdir(parents=True)
    _launch(script, devices, out, [*args, "--runs", json.dumps(runs)])
    return {
        name: [torch.load(out / name / f"rank{r}_of{devices}.pt") for r in range(devices)]
        for name in runs
    }


def _launch(script: str, devices: int, out: Path, args: list[str]) -> None:
    proc = launch(script, devices, out, args)
    assert proc.returncode == 0, proc.stderr[-4000:]


def launch(
    script: str, devices: int, out: Path, args: list[str], timeout: float = 300
) -> subprocess.CompletedProcess:
    """``tests/<script> --devices N --out OUT ARGS``, whatever its exit code (a hang past
    ``timeout`` seconds fails the test)."""
    cmd = [sys.executable, str(Path(__file__).with_name(script)), "--devices", str(devices)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 shared cores: no spinning thread pairs
    return subprocess.run(
        cmd + ["--out", str(out), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def tiny_simclr(cls: type = SimCLR, **kwargs) -> SimCLR:
    """A small SimCLR (``cls``: a subclass) for the DDP stop scripts: SGD, no warm-up."""
    settings = dict(backbone="timm:test_resnet", cifar_stem=False, head_hidden_dim=16)
    settings |= dict(head_output_dim=8, optimizer="sgd", base_lr=0.01, warmup_epochs=0)
    return cls(**(settings | kwargs))


def stopping_trainer(devices: int, **kwargs) -> L.Trainer:
    """A quiet CPU DDP Trainer whose ranks fail within seconds when one is left alone in a
    collective, not after gloo's 30 minutes: for the scripts that stop every rank."""
    settings = dict(limit_val_batches=0, logger=False, enable_checkpointing=False)
    settings |= dict(enable_progress_bar=False, enable_model_summary=False)
    strategy = DDPStrategy(timeout=datetime.timedelta(seconds=30))
    return L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, **(settings | kwargs))


def save_outcome(trainer: L.Trainer, out: Path, fit, expected: tuple[type, ...]) -> None:
    """Call ``fit`` and save, as ``rank<r>_of<N>.pt``, the error this rank stopped with (the
    message of one of ``expected``; another type with its name, e.g. left alone in a
    collective) or None, and its global step."""
    error = None
    try:
        fit()
    except expected as caught:
        error = str(caught)
    except Exception as caught:  # saved for the test to show
        error = f"{type(caught).__name__}: {str(caught)[:300]}"
    torch.save(
        {"error": error, "step": trainer.global_step},
        out / f"rank{trainer.global_rank}_of{trainer.world_size}.pt",
    )


def script_runs(parser: argparse.ArgumentParser) -> list[argparse.Namespace]:
    """The runs a DDP script was asked for: its command line, or with ``--runs JSON`` (from
    ``run_ddp_script_runs``) one namespace per run, the other arguments shared and ``--out``
    the run's own folder. Lightning launches the other ranks once, at the first fit; later
    fits in the same processes reuse its process group."""
    argv = sys.argv[1:]
    if "--runs" not in argv:
        return [parser.parse_args(argv)]
    at = argv.index("--runs")
    common = argv[:at] + argv[at + 2 :]
    namespaces = []
    for name, run_args in json.loads(argv[at + 1]).items():
        namespace = parser.parse_args(common + run_args)
        namespace.out = namespace.out / name
        namespace.out.mkdir(parents=True, exist_ok=True)
        namespaces.append(namespace)
    return namespaces


def image_folder_args(parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """``--devices N --root FOLDER --out DIR``: the command line of the scripts that read an
    image folder (and ``parser``'s own options)."""
    parser = parser or argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args()


def random_images(n: int, seed: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` seeded 3x16x16 images and labels: the same in every process that asks."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=gen), torch.randint(0, classes, (n,), generator=gen)


def ranks_in_one_batch(n: int, world: int, per_rank: int, steps: int, epoch: int) -> list[int]:
    """The order in which one process sees what ``world`` DDP processes see at each step: per
    step, rank 0's batch, then rank 1's ..., each rank reading its shard of
    ``DistributedSampler``'s permutation for ``epoch`` (Lightning shuffles DDP training data
    with seed 0)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch)).tolist()
    shards = [perm[r::world] for r in range(world)]
    batches = [slice(s * per_rank, (s + 1) * per_rank) for s in range(steps)]
    return [i for batch in batches for shard in shards for i in shard[batch]]


def training_order(
    devices: int, world: int, n: int, per_rank: int, steps: int, epoch: int
) -> tuple[list[int], int]:
    """The order and batch size of ``n`` training samples with which ``devices`` processes see
    what ``world`` DDP processes see: under DDP the dataset's order (Lightning's sampler
    shuffles it), in one process :func:`ranks_in_one_batch` in batches of all ranks' rows."""
    if devices > 1:
        return list(range(n)), per_rank
    return ranks_in_one_batch(n, world, per_rank, steps, epoch), world * per_rank


class FreezeBatchNorm(L.Callback):
    """Per-process BatchNorm statistics make W processes differ from one by design; with them
    fixed, the only coupling across samples left is the one under test."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for m in pl_module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


def ddp_trainer(devices: int, callbacks: list[L.Callback], **kwargs) -> L.Trainer:
    """A quiet CPU Trainer on ``devices`` processes: Lightning's "ddp" strategy (gloo) for more
    than one, as a user's script gets it."""
    return L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kwargs,
    )
