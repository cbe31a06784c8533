"""One SimCLR training step under Lightning DDP with BatchNorm training on batch statistics,
saving what each rank saw and produced: the sample ids of its batch, the encoder features,
the loss, the DDP-averaged gradients, the initial weights and the BatchNorm buffers after the
step. ``--batchnorm global`` adds the GlobalBatchNorm plugin, ``local`` leaves plain BN.

Run as a script: Lightning's "ddp" strategy relaunches it once per extra device.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from simclr_lightning import GlobalBatchNorm, SimCLR  # noqa: E402
from tests.ddp_helpers import ddp_trainer  # noqa: E402

WORLD, PER_RANK = 2, 4


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    """The two views of the WORLD x PER_RANK images of the global batch."""
    gen = torch.Generator().manual_seed(1)
    n = WORLD * PER_RANK
    return torch.randn(n, 3, 16, 16, generator=gen), torch.randn(n, 3, 16, 16, generator=gen)


def make_model() -> SimCLR:
    """A ResNet-18 whose every BatchNorm shapes the output (no zero-initialised residual
    branches), and the 3-layer head with the scale-only output BN."""
    L.seed_everything(0, verbose=False)
    return SimCLR(
        backbone="resnet18",
        cifar_stem=False,
        zero_init_residual=False,
        head_hidden_dim=32,
        head_output_dim=16,
        optimizer="sgd",
        base_lr=0.1,
        warmup_epochs=0,
    )


class SaveStep(L.Callback):
    def __init__(self, out: Path, initial: dict[str, torch.Tensor]) -> None:
        self.out = out
        self.initial = {k: v.clone() for k, v in initial.items()}
        self.saved: dict = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.saved.update(
            ids=batch[1].clone(),
            loss=outputs["loss"].detach(),
            features=outputs["features"].clone(),
        )

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # after backward, i.e. after DDP's all-reduce averaged the gradients
        grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}
        self.saved["grads"] = grads

    def on_train_end(self, trainer, pl_module):
        self.saved.update(
            initial=self.initial,
            buffers={n: b.clone() for n, b in pl_module.named_buffers()},
            classes=sorted({type(m).__name__ for m in pl_module.modules()}),
        )
        torch.save(self.saved, self.out / f"rank{trainer.global_rank}_of{trainer.world_size}.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batchnorm", choices=["global", "local"], default="global")
    args = parser.parse_args()

    views_a, views_b = make_data()
    samples = [((views_a[i], views_b[i]), i) for i in range(len(views_a))]
    model = make_model()
    save = SaveStep(args.out, initial=model.state_dict())
    plugins = [GlobalBatchNorm()] if args.batchnorm == "global" else []
    trainer = ddp_trainer(
        args.devices,
        [save],
        max_steps=1,
        limit_val_batches=0,
        precision="32-true",
        plugins=plugins,
    )
    trainer.fit(model, DataLoader(samples, batch_size=PER_RANK, shuffle=False))


if __name__ == "__main__":
    main()
