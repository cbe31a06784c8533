"""The learning-rate schedules across the runs a user makes: resumed with another global batch
(another world size), from a loader without a length, and shorter than its warm-up; of
pretraining, of linear evaluation and of the online probe. Expected rates come from the
paper's rule (tests/reference.py), written per epoch. tests/test_resume.py resumes a real
2-process DDP run on one process."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from simclr_lightning import (
    ImageFolderDataModule,
    LinearEval,
    OnlineLinearProbe,
    SimCLR,
    SimCLRAugmentation,
)
from simclr_lightning.errors import SettingError
from tests.helpers import quiet_trainer
from tests.reference import cosine_schedule_reference

BASE_LR, EPOCHS, WARMUP_EPOCHS, IMAGES = 0.4, 4, 1, 32


def pairs(n: int) -> list:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, 3, 8, 8, generator=gen), torch.randn(n, 3, 8, 8, generator=gen)
    return [((a[i], b[i]), i % 3) for i in range(n)]


class RecordLR(L.Callback):
    """The rate each optimizer step uses."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def model() -> SimCLR:
    return SimCLR(
        head_hidden_dim=16,
        head_output_dim=8,
        optimizer="sgd",
        base_lr=BASE_LR,
        warmup_epochs=WARMUP_EPOCHS,
    )


def paper_rate(batch: int, epoch: float) -> float:
    """The rule at a point of the run given in epochs: linear scaling by the global batch,
    warm-up then cosine over the run, stepped per optimizer step of that batch."""
    steps_per_epoch = IMAGES // batch
    step = round(epoch * steps_per_epoch)
    multiplier = cosine_schedule_reference(
        step, WARMUP_EPOCHS * steps_per_epoch, EPOCHS * steps_per_epoch, 0.0
    )
    return BASE_LR * batch / 256 * multiplier


def fit_then_resume(
    tmp_path, make_model, first, then, checkpoint: str, record=None, every=None, callbacks=(), **kw
) -> list:
    """Train ``make_model()`` for EPOCHS epochs on the loader (or data module) ``first``, saving
    a checkpoint per ``every`` (ModelCheckpoint's arguments; each epoch by default), then
    resume the one named ``checkpoint`` on ``then``: ``record``'s rates of each run."""
    record = record if record is not None else RecordLR()
    every = every or {"every_n_epochs": 1}
    saves = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, **every)
    run = dict(max_epochs=EPOCHS, limit_val_batches=0, **kw)
    trainer = quiet_trainer(**run, callbacks=[*callbacks, record, saves], enable_checkpointing=True)
    trainer.fit(make_model(), first)
    before, record.lrs = record.lrs, []
    trainer = quiet_trainer(**run, callbacks=[*callbacks, record])
    trainer.fit(make_model(), then, ckpt_path=tmp_path / checkpoint)
    return [before, record.lrs]


def batches_of(n: int, data=None) -> DataLoader:
    return DataLoader(data if data is not None else pairs(IMAGES), batch_size=n)


def test_resumed_with_twice_the_global_batch_goes_on_at_the_same_epoch_and_new_peak(tmp_path):
    """Two processes of batch 8 resumed on one of batch 16 (or the reverse) change the global
    batch and the steps per epoch exactly like this one-process run does."""
    first, resumed = fit_then_resume(
        tmp_path, model, batches_of(8), batches_of(16), "epoch=1-step=8.ckpt"
    )
    assert first == pytest.approx([paper_rate(8, s / 4) for s in range(16)])
    # epochs 2 and 3 at batch 16: 2 steps each, at batch 16's peak rate
    assert resumed == pytest.approx([paper_rate(16, 2 + s / 2) for s in range(4)])


def test_resumed_mid_epoch_with_half_the_global_batch_ends_with_the_run(tmp_path):
    """A SLURM requeue saves mid-epoch: the epoch's batches done so far count as Lightning
    counts them, so the schedule reaches its end at the run's last step."""
    _, resumed = fit_then_resume(  # 1 of epoch 1's 2 batches done
        tmp_path,
        model,
        batches_of(16),
        batches_of(8),
        "epoch=1-step=3.ckpt",
        every={"every_n_train_steps": 3},
    )
    # at batch 8: epoch 1's batches 1-3, then epochs 2 and 3; the last at the rule's last step
    steps = list(range(1 * 4 + 1, EPOCHS * 4))
    assert resumed == pytest.approx([paper_rate(8, s / 4) for s in steps])


def test_resumed_past_the_end_of_a_shorter_epoch_a_plain_loader_starts_it_again(tmp_path):
    """Saved after 3 of epoch 1's 4 batches, resumed where an epoch has 2: Lightning runs epoch 1
    again from its first batch (a plain loader cannot skip), so the schedule goes on from
    epoch 1's start and still ends at the run's last step."""
    _, resumed = fit_then_resume(
        tmp_path,
        model,
        batches_of(8),
        batches_of(16),
        "epoch=1-step=7.ckpt",
        every={"every_n_train_steps": 7},
    )
    assert resumed == pytest.approx([paper_rate(16, s / 2) for s in range(2, 8)])


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """24 random 8 px images in 2 class folders: this library's resumable training loader."""
    root = tmp_path_factory.mktemp("schedule-images")
    gen = torch.Generator().manual_seed(0)
    for i in range(24):
        folder = root / "train" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (8, 8, 3), generator=gen, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_resumed_past_the_end_of_a_shorter_epoch_this_librarys_loader_goes_on_after_it(
    image_folder, tmp_path
):
    """This library's loader resumes mid-epoch: saved after 5 of epoch 0's 6 batches (batch
    4), resumed at batch 8 (3 an epoch), epoch 0 has no batch left, and the run goes on with
    epoch 1 at its place in the schedule."""

    def data(batch: int) -> ImageFolderDataModule:
        aug = SimCLRAugmentation(image_size=8)
        return ImageFolderDataModule(str(image_folder), aug, batch_size=batch, num_workers=0)

    every = {"every_n_train_steps": 5}
    _, resumed = fit_then_resume(
        tmp_path, model, data(4), data(8), "epoch=0-step=5.ckpt", None, every
    )
    peak = BASE_LR * 8 / 256
    want = [peak * cosine_schedule_reference(s, 3, 12, 0.0) for s in range(3, 12)]
    assert resumed == pytest.approx(want)


def test_resumed_with_the_same_batch_is_unchanged(tmp_path):
    _, resumed = fit_then_resume(
        tmp_path, model, batches_of(8), batches_of(8), "epoch=1-step=8.ckpt"
    )
    assert resumed == pytest.approx([paper_rate(8, 2 + s / 4) for s in range(8)])


class Stream(IterableDataset):
    """A loader without a length, as a WebDataset-style stream gives."""

    def __iter__(self):
        yield from pairs(IMAGES)


def test_warm_up_in_epochs_needs_a_loader_with_a_length():
    trainer = quiet_trainer(max_steps=8, limit_val_batches=0)
    with pytest.raises(SettingError, match=r"^model\.warmup_epochs=1 is invalid: must be 0 with"):
        trainer.fit(model(), DataLoader(Stream(), batch_size=8))


def test_a_stream_with_its_epoch_given_warms_up_over_that_epoch():
    record = RecordLR()
    trainer = quiet_trainer(
        max_steps=16, limit_train_batches=4, limit_val_batches=0, callbacks=[record]
    )
    trainer.fit(model(), DataLoader(Stream(), batch_size=8))
    assert record.lrs == pytest.approx([paper_rate(8, s / 4) for s in range(16)])


def test_warm_up_longer_than_the_run_never_reaches_the_peak():
    """As the warning says, and as the official code does: the ramp keeps its slope."""
    record = RecordLR()
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[record])
    net = SimCLR(head_hidden_dim=16, head_output_dim=8, optimizer="sgd", base_lr=BASE_LR)
    with pytest.warns(UserWarning, match="never reaches its peak"):
        trainer.fit(net, DataLoader(pairs(IMAGES), batch_size=8))
    peak = BASE_LR * 8 / 256
    assert record.lrs == pytest.approx([peak * (s + 1) / 40 for s in range(4)])  # 10 epochs x 4


def cosine(peak: float, steps: range, total: int) -> list[float]:
    return [peak * cosine_schedule_reference(s, 0, total, 0.0) for s in steps]


def test_linear_eval_resumed_with_twice_the_global_batch_goes_on_at_the_same_epoch(tmp_path):
    """LinearEval's rate is not scaled by the batch; its cosine spans the run's steps."""

    def classifier() -> LinearEval:
        return LinearEval(num_classes=3, lr=0.2, backbone="resnet18")

    images = [(a, label) for (a, _), label in pairs(IMAGES)]
    first, resumed = fit_then_resume(
        tmp_path, classifier, batches_of(8, images), batches_of(16, images), "epoch=1-step=8.ckpt"
    )
    assert first == pytest.approx(cosine(0.2, range(16), 16))
    # epochs 2 and 3 at batch 16: steps 4 to 7 of 8 (not 8 to 11, past the end at rate 0)
    assert resumed == pytest.approx(cosine(0.2, range(4, 8), 8))


class RecordProbeLR(L.Callback):
    """The rate of each of the probe's steps (it sets it just before stepping)."""

    def __init__(self, probe: OnlineLinearProbe) -> None:
        self.probe, self.lrs = probe, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.lrs.append(self.probe.optimizer.param_groups[0]["lr"])


def test_online_probe_resumed_with_twice_the_global_batch_goes_on_at_the_same_epoch(tmp_path):
    probe = OnlineLinearProbe(num_classes=3, optimizer="sgd", lr=0.5, schedule="cosine")
    record = RecordProbeLR(probe)
    first, resumed = fit_then_resume(
        tmp_path, model, batches_of(8), batches_of(16), "epoch=1-step=8.ckpt", record, None, [probe]
    )
    assert first == pytest.approx(cosine(0.5, range(16), 16))
    # epochs 2 and 3 at batch 16: the probe's steps 4 to 7 of 8 (not past the end at rate 0)
    assert resumed == pytest.approx(cosine(0.5, range(4, 8), 8))


class RecordStepLR(L.Callback):
    """Every parameter group's rate at each optimizer step."""

    def __init__(self) -> None:
        self.lrs: list[list[float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append([group["lr"] for group in optimizer.param_groups])


def test_linear_eval_counts_steps_per_epoch_as_lightning_does_under_accumulation(tmp_path):
    """8 batches an epoch, gradients accumulated over 3: Lightning steps 3 times an epoch (the
    last on a partial accumulation). Resumed after 2 epochs at 4 batches an epoch (2 steps),
    the run goes on at step 4 of 8 and ends at the schedule's end."""
    images = [(a, label) for (a, _), label in pairs(IMAGES)]
    first, resumed = fit_then_resume(
        tmp_path,
        lambda: LinearEval(num_classes=3, lr=0.2),
        batches_of(4, images),
        batches_of(8, images),
        "epoch=1-step=6.ckpt",
        RecordStepLR(),
        accumulate_grad_batches=3,
    )
    assert [lrs[0] for lrs in first] == pytest.approx(cosine(0.2, range(12), 12))
    assert [lrs[0] for lrs in resumed] == pytest.approx(cosine(0.2, range(4, 8), 8))


def test_fine_tuning_resumed_goes_on_at_each_groups_own_rate(tmp_path):
    """The classifier's and the encoder's groups each follow their own peak rate; resumed with
    twice the batch and a new backbone_lr, each group takes this run's."""
    images = [(a, label) for (a, _), label in pairs(IMAGES)]

    backbone_lrs = iter([0.05, 0.1])  # the first run's, then the resumed run's

    def classifier() -> LinearEval:
        return LinearEval(num_classes=3, lr=0.2, finetune=True, backbone_lr=next(backbone_lrs))

    _, resumed = fit_then_resume(
        tmp_path,
        classifier,
        batches_of(8, images),
        batches_of(16, images),
        "epoch=1-step=8.ckpt",
        RecordStepLR(),
    )
    head, encoder = cosine(0.2, range(4, 8), 8), cosine(0.1, range(4, 8), 8)
    for lrs, want_head, want_encoder in zip(resumed, head, encoder, strict=True):
        # the classifier's two groups (weight, bias), then the encoder's
        assert lrs[:2] == pytest.approx([want_head] * 2)
        assert lrs[2:] == pytest.approx([want_encoder] * (len(lrs) - 2))


def test_linear_eval_resumed_mid_epoch_with_another_batch_under_accumulation(
    image_folder, tmp_path
):
    """24 images at batch 2, gradients accumulated over 2: 6 steps an epoch; saved after 4
    (16 images), resumed at batch 4: 3 steps an epoch. The epoch goes on after the 16 images,
    4 of this run's batches, which are 2 of its steps: the schedule goes on at its step 2 of
    6, not at its batch 4."""

    def data(batch: int) -> ImageFolderDataModule:
        aug = SimCLRAugmentation(image_size=8)
        return ImageFolderDataModule(
            str(image_folder), aug, batch_size=batch, num_workers=0, task="classify"
        )

    first, resumed = fit_then_resume(
        tmp_path,
        lambda: LinearEval(num_classes=2, lr=0.2, backbone="resnet18"),
        data(2),
        data(4),
        "epoch=0-step=4.ckpt",
        RecordStepLR(),
        every={"every_n_train_steps": 4},
        accumulate_grad_batches=2,
    )
    assert [lrs[0] for lrs in first] == pytest.approx(cosine(0.2, range(4 * 6), 4 * 6))
    assert [lrs[0] for lrs in resumed] == pytest.approx(cosine(0.2, range(2, 12), 12))
