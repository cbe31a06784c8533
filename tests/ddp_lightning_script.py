"""One SimCLR optimizer step under Lightning, saving the loss and the gradients DDP averaged
(and the initial weights and final BatchNorm buffers, for references to start from).

Run as a script (Lightning's "ddp" strategy relaunches it once per extra device, as it
does for any user script). With --devices 1 the single batch is the concatenation, in
rank order, of the per-rank batches the 2-device run sees. ``--grad-cache-chunks``,
``--precision`` and ``--batchnorm train`` (BatchNorm on batch statistics) test gradient caching.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from simclr_lightning import SimCLR  # noqa: E402
from tests.ddp_helpers import FreezeBatchNorm, ddp_trainer, script_runs, use_gather  # noqa: E402

WORLD, PER_RANK = 2, 4


class SaveStep(L.Callback):
    """Also the logged ``train/loss``, the barriers run inside the training step (where a
    barrier, e.g. Lightning's ``sync_dist``, is a host wait for the GPU under NCCL) and
    Lightning's warnings about ``sync_dist``."""

    def __init__(self, out: Path, initial: dict[str, torch.Tensor]) -> None:
        self.out = out
        self.loss = None
        self.initial = {k: v.clone() for k, v in initial.items()}
        self.caught: list = []  # the warnings of the fit, set by run()
        self.in_step = False
        self.step_barriers = 0
        barrier = torch.distributed.barrier

        def counted(*args, **kwargs):
            self.step_barriers += self.in_step
            return barrier(*args, **kwargs)

        torch.distributed.barrier = counted

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.in_step = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.in_step = False
        self.loss = outputs["loss"].detach()
        self.logged = trainer.callback_metrics["train/loss"].clone()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # Runs after backward, i.e. after DDP's all-reduce averaged the gradients.
        grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}
        self.grads = grads

    def on_train_end(self, trainer, pl_module):
        buffers = {n: b.clone() for n, b in pl_module.named_buffers()}
        torch.save(
            {
                "loss": self.loss,
                "logged": self.logged,
                "step_barriers": self.step_barriers,
                "sync_warnings": [
                    str(w.message) for w in self.caught if "sync_dist" in str(w.message)
                ],
                "grads": self.grads,
                "world": trainer.world_size,
                "initial": self.initial,
                "buffers": buffers,
            },
            self.out / f"rank{trainer.global_rank}_of{trainer.world_size}.pt",
        )


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    """The two views of the WORLD x PER_RANK images of the global batch."""
    gen = torch.Generator().manual_seed(1)
    n = WORLD * PER_RANK
    return torch.randn(n, 3, 16, 16, generator=gen), torch.randn(n, 3, 16, 16, generator=gen)


def rank_rows(rank: int) -> list[int]:
    """The samples of rank r: Lightning always shuffles training data under DDP, with
    DistributedSampler(seed=0) at epoch 0 (a permutation, then every W-th from r)."""
    perm = torch.randperm(WORLD * PER_RANK, generator=torch.Generator().manual_seed(0))
    return perm[rank::WORLD].tolist()


def make_model(grad_cache_chunks: int = 1) -> SimCLR:
    L.seed_everything(0, verbose=False)
    return SimCLR(
        backbone="resnet18",
        cifar_stem=True,
        head_hidden_dim=64,
        head_output_dim=16,
        optimizer="sgd",
        base_lr=0.1,
        warmup_epochs=0,
        grad_cache_chunks=grad_cache_chunks,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gather", default="correct")
    parser.add_argument("--grad-cache-chunks", type=int, default=1)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--batchnorm", choices=["frozen", "train"], default="frozen")
    for args in script_runs(parser):
        run(args)


def run(args: argparse.Namespace) -> None:
    use_gather(args.gather)

    views_a, views_b = make_data()
    n = WORLD * PER_RANK
    labels = torch.arange(n)
    order = list(range(n)) if args.devices > 1 else [i for r in range(WORLD) for i in rank_rows(r)]
    samples = [((views_a[i], views_b[i]), labels[i]) for i in order]
    batch_size = PER_RANK if args.devices > 1 else n

    model = make_model(args.grad_cache_chunks)
    save = SaveStep(args.out, initial=model.state_dict())
    callbacks = [FreezeBatchNorm(), save] if args.batchnorm == "frozen" else [save]
    trainer = ddp_trainer(
        args.devices, callbacks, max_steps=1, limit_val_batches=0, precision=args.precision
    )
    with warnings.catch_warnings(record=True) as save.caught:
        warnings.simplefilter("always")
        trainer.fit(model, DataLoader(samples, batch_size=batch_size, shuffle=False))


if __name__ == "__main__":
    main()
