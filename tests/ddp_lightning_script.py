"""One SimCLR optimizer step under Lightning, saving the loss and the gradients DDP averaged.

Run as a script (Lightning's "ddp" strategy relaunches it once per extra device, as it
does for any user script). With --devices 1 the single batch is the concatenation, in
rank order, of the per-rank batches the 2-device run sees.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from simclr_lightning import SimCLR  # noqa: E402
from tests.ddp_helpers import FreezeBatchNorm, ddp_trainer, use_gather  # noqa: E402

WORLD, PER_RANK = 2, 4


class SaveStep(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out
        self.loss = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.loss = outputs["loss"].detach()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # Runs after backward, i.e. after DDP's all-reduce averaged the gradients.
        grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}
        self.grads = grads

    def on_train_end(self, trainer, pl_module):
        torch.save(
            {"loss": self.loss, "grads": self.grads, "world": trainer.world_size},
            self.out / f"rank{trainer.global_rank}_of{trainer.world_size}.pt",
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gather", default="correct")
    args = parser.parse_args()
    use_gather(args.gather)

    gen = torch.Generator().manual_seed(1)
    n = WORLD * PER_RANK
    views_a, views_b = (
        torch.randn(n, 3, 16, 16, generator=gen),
        torch.randn(n, 3, 16, 16, generator=gen),
    )
    labels = torch.arange(n)
    # DistributedSampler(shuffle=False) gives rank r the samples r, r+W, r+2W, ...
    order = (
        list(range(n))
        if args.devices > 1
        else [i for r in range(WORLD) for i in range(r, n, WORLD)]
    )
    samples = [((views_a[i], views_b[i]), labels[i]) for i in order]
    batch_size = PER_RANK if args.devices > 1 else n

    L.seed_everything(0, verbose=False)
    model = SimCLR(
        backbone="resnet18",
        cifar_stem=True,
        head_hidden_dim=64,
        head_output_dim=16,
        optimizer="sgd",
        base_lr=0.1,
        warmup_epochs=0,
    )
    trainer = ddp_trainer(
        args.devices, [FreezeBatchNorm(), SaveStep(args.out)], max_steps=1, limit_val_batches=0
    )
    trainer.fit(model, DataLoader(samples, batch_size=batch_size, shuffle=False))


if __name__ == "__main__":
    main()
