"""Exact resume: a run resumed from a mid-epoch or an end-of-epoch checkpoint continues with the
same per-step loss and learning rate as the run that was never interrupted, bit for bit."""

from __future__ import annotations

import random
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from simclr_lightning import ImageFolderDataModule, SimCLR, SimCLRAugmentation
from simclr_lightning.callbacks import RNGState
from tests.ddp_helpers import run_ddp_script
from tests.helpers import quiet_trainer
from tests.reference import cosine_schedule_reference

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS_PER_EPOCH, EPOCHS, EVERY = 6, 3, 4  # 20 images, batches of 3 (drop_last)


class NoisySimCLR(SimCLR):
    """SimCLR whose features go through dropout, and whose loss draws from python's and
    numpy's generators: every global generator then shapes the loss, as a user's model may."""

    def forward(self, x):
        noise = random.random() + float(np.random.rand())
        return F.dropout(super().forward(x), 0.2, self.training) * (1 + 1e-3 * noise)


class Trace(L.Callback):
    """(global step, loss, learning rate) of every training step."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, torch.Tensor, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.rows.append((trainer.global_step, outputs["loss"].detach().clone(), lr))


@pytest.fixture(scope="module")
def mixed_folder(tiny_folder, tmp_path_factory):
    """The same photographs at different sizes: with ``decode: gpu`` their crop boxes come
    from the host stream of their own (``box_generator``), which a checkpoint must hold too."""
    root = tmp_path_factory.mktemp("resume-mixed")
    for i, path in enumerate(sorted(tiny_folder.rglob("*.jpg"))):
        out = root / path.relative_to(tiny_folder)
        out.parent.mkdir(parents=True, exist_ok=True)
        w, h = [(24, 40), (40, 24), (32, 32), (48, 30)][i % 4]
        Image.open(path).convert("RGB").resize((w, h)).save(out, quality=90)
    return root


def fit(root, ckpt_dir, augment: str, workers: int, ckpt_path=None) -> Trace:
    L.seed_everything(7, verbose=False)
    mixed = augment == "gpu-mixed"
    data = ImageFolderDataModule(
        str(root),
        augmentation=SimCLRAugmentation(image_size=16),
        batch_size=3,
        augment="gpu" if mixed else augment,
        decode="gpu" if mixed else "cpu",
        num_workers=workers,
    )
    model = NoisySimCLR(
        cifar_stem=False, warmup_epochs=1, base_lr=0.3, head_hidden_dim=32, head_output_dim=16
    )
    trace = Trace()
    trainer = quiet_trainer(
        max_epochs=EPOCHS,
        precision="32-true",
        limit_val_batches=0,
        enable_checkpointing=True,
        callbacks=[
            trace,
            RNGState(),
            ModelCheckpoint(ckpt_dir, "{step}", every_n_train_steps=EVERY, save_top_k=-1),
            ModelCheckpoint(ckpt_dir, "end-{epoch}", save_top_k=-1, save_on_train_epoch_end=True),
        ],
    )
    trainer.fit(model, data, ckpt_path=ckpt_path)
    assert trainer.global_step == STEPS_PER_EPOCH * EPOCHS
    return trace


@pytest.mark.parametrize(
    ("augment", "workers"), [("cpu", 0), ("cpu", 2), ("gpu", 0), ("gpu-mixed", 0)]
)
def test_resume_continues_the_uninterrupted_run_exactly(
    tiny_folder, mixed_folder, tmp_path, augment, workers
):
    if augment == "gpu-mixed":
        tiny_folder = mixed_folder
    full = fit(tiny_folder, tmp_path, augment, workers).rows
    assert [step for step, _, _ in full] == list(range(1, STEPS_PER_EPOCH * EPOCHS + 1))
    # the views differ between epochs (a plain run is not replaying its first epoch)
    assert not torch.equal(full[0][1], full[STEPS_PER_EPOCH][1])
    # mid-epoch 1; the end of epoch 0; the last batch of epoch 1, from which Lightning goes on
    # to epoch 2 without epoch 1's end or epoch 2's start hooks
    starts = {"step=8.ckpt": 8, "end-epoch=0.ckpt": STEPS_PER_EPOCH, "step=12.ckpt": 12}
    for name, done in starts.items():
        resumed = fit(tiny_folder, tmp_path / "again", augment, workers, tmp_path / name).rows
        assert [s for s, _, _ in resumed] == [s for s, _, _ in full[done:]], name
        for (step, loss, lr), (_, want_loss, want_lr) in zip(resumed, full[done:], strict=True):
            assert torch.equal(loss, want_loss), f"{name}: loss differs at step {step}"
            assert lr == want_lr, f"{name}: learning rate differs at step {step}"


class DrawingModel(L.LightningModule):
    """A user's model and loader: the step draws from the global generator (dropout, drop-path)
    and the plain shuffling ``DataLoader`` has no ``generator=``, so creating each epoch's
    iterator draws the order's seed and the workers' base seed from the global generator."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.rows: list[tuple[int, list[float], float]] = []

    def training_step(self, batch, batch_idx):
        (x,) = batch
        self.rows.append((self.global_step, x[:, 0].tolist(), float(torch.rand(()))))
        return self.layer(x).square().mean()

    def train_dataloader(self):
        x = torch.arange(16.0).repeat(2, 1).T
        return DataLoader(TensorDataset(x), batch_size=4, shuffle=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_end_of_epoch_resume_of_a_plain_shuffling_loader_is_exact(tmp_path):
    def fit(folder: str, ckpt_path=None) -> list:
        L.seed_everything(3, verbose=False)
        model = DrawingModel()
        trainer = quiet_trainer(
            max_epochs=4,
            enable_checkpointing=True,
            callbacks=[
                RNGState(),
                ModelCheckpoint(tmp_path / folder, "{epoch}", save_top_k=-1),
                # at every 4th step: an epoch's last batch, before its end hooks
                ModelCheckpoint(tmp_path / folder, "{step}", every_n_train_steps=4, save_top_k=-1),
            ],
        )
        trainer.fit(model, ckpt_path=ckpt_path)
        return model.rows

    full = fit("full")
    # each epoch has its own order and draws, and the resumed runs have the same ones
    assert full[0][1] != full[4][1] and full[8][2] != full[12][2]
    for name in ("epoch=1.ckpt", "step=8.ckpt"):
        resumed = fit("resumed", tmp_path / "full" / name)
        assert [r[0] for r in resumed] == list(range(8, 16)), name
        assert resumed == full[8:], name


@pytest.fixture(scope="module")
def ddp_run(tiny_folder, tmp_path_factory):
    """2 processes, ``augment: gpu``: 20 images, 3 per rank and step, 3 steps an epoch, 2
    epochs, a checkpoint every 2 steps; what each rank saved, and the checkpoints' folder."""
    folder = tmp_path_factory.mktemp("ddp-resume")
    args = ("--root", str(tiny_folder), "--augment", "gpu", "--ckpt-dir", str(folder))
    return run_ddp_script("ddp_resume_script.py", 2, folder / "full", *args), args


@pytest.mark.slow
def test_ddp_ranks_each_resume_their_own_state_exactly(ddp_run, tmp_path):
    """Each rank's random states, augmentation generator and shard position come back from
    the one checkpoint rank 0 wrote."""
    full, args = ddp_run
    step_2 = str(Path(args[-1]) / "step=2.ckpt")
    resumed = run_ddp_script(
        "ddp_resume_script.py", 2, tmp_path / "resumed", *args, "--ckpt", step_2
    )
    assert [s for s, _, _ in full[0]["rows"]] == list(range(1, 7))
    assert not torch.equal(full[0]["rows"][0][1], full[1]["rows"][0][1])  # ranks differ
    for rank in range(2):
        want, got = full[rank]["rows"][2:], resumed[rank]["rows"]
        assert [s for s, _, _ in got] == [s for s, _, _ in want] == list(range(3, 7))
        for (step, loss, lr), (_, want_loss, want_lr) in zip(got, want, strict=True):
            assert torch.equal(loss, want_loss), f"rank {rank}: loss differs at step {step}"
            assert lr == want_lr


@pytest.mark.slow
def test_a_ddp_checkpoint_resumed_on_one_process_keeps_the_paper_schedule(ddp_run, tmp_path):
    """The 2-process run's checkpoint after 2 of epoch 0's 3 steps (global batch 6: 12 of the
    18 images), resumed on 1 process: global batch 3, 6 steps an epoch. The run goes on after
    those 12 images, at batch 4 of epoch 0 (2 optimizer steps done, the schedule at its step
    4), and ends after epoch 1 at the schedule's end; every rate is the paper's rule for
    batch 3 (linear scaling, 1 epoch of warm-up, cosine over 2 epochs)."""
    full, args = ddp_run
    step_2 = str(Path(args[-1]) / "step=2.ckpt")
    (one,) = run_ddp_script("ddp_resume_script.py", 1, tmp_path / "one", *args, "--ckpt", step_2)
    batch_6 = 0.3 * 6 / 256 * cosine_schedule_reference(2, 3, 6, 0.0)  # the full run's rule
    assert full[0]["rows"][1][2] == pytest.approx(batch_6)
    steps = [s for s, _, _ in one["rows"]]
    assert steps == list(range(3, 11))  # epoch 0's last 2 batches of 3 images, then epoch 1
    # Trace reads the rate after the scheduler has stepped: the rate of the step after it
    want = [0.3 * 3 / 256 * cosine_schedule_reference(s + 2, 6, 12, 0.0) for s in steps]
    assert [lr for _, _, lr in one["rows"]] == pytest.approx(want)
    assert all(torch.isfinite(loss) for _, loss, _ in one["rows"])
    # train/loss_epoch is the mean over epoch 0's 18 images: 2 steps of 6 before the resume
    # (each the mean of the 2 ranks' losses), 2 of 3 after it; it weighed each step by the
    # images of one process (3 and 3), as if the steps before had been half as large.
    before = [float(full[0]["rows"][i][1] + full[1]["rows"][i][1]) / 2 for i in range(2)]
    after = [float(loss) for step, loss, _ in one["rows"] if step <= 4]
    want_mean = (6 * sum(before) + 3 * sum(after)) / 18
    assert one["epoch_loss"][0] == pytest.approx(want_mean, rel=1e-5)
