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
from torch.utils.data import DataLoader, IterableDataset

from simclr_lightning import LinearEval, OnlineLinearProbe, SimCLR
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


def test_resumed_with_twice_the_global_batch_goes_on_at_the_same_epoch_and_new_peak(tmp_path):
    """Two processes of batch 8 resumed on one of batch 16 (or the reverse) change the global
    batch and the steps per epoch exactly like this one-process run does."""
    first = RecordLR()
    saves = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    trainer = quiet_trainer(
        max_epochs=EPOCHS,
        limit_val_batches=0,
        callbacks=[first, saves],
        enable_checkpointing=True,
        default_root_dir=tmp_path,
    )
    trainer.fit(model(), DataLoader(pairs(IMAGES), batch_size=8))
    assert first.lrs == pytest.approx([paper_rate(8, s / 4) for s in range(16)])

    after_two_epochs = tmp_path / "epoch=1-step=8.ckpt"
    resumed = RecordLR()
    trainer = quiet_trainer(max_epochs=EPOCHS, limit_val_batches=0, callbacks=[resumed])
    trainer.fit(model(), DataLoader(pairs(IMAGES), batch_size=16), ckpt_path=after_two_epochs)
    # epochs 2 and 3 at batch 16: 2 steps each, at batch 16's peak rate
    assert resumed.lrs == pytest.approx([paper_rate(16, 2 + s / 2) for s in range(4)])


def test_resumed_mid_epoch_with_half_the_global_batch_ends_with_the_run(tmp_path):
    """A SLURM requeue saves mid-epoch: the epoch's batches done so far count as Lightning
    counts them, so the schedule reaches its end at the run's last step."""
    saves = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=3)
    trainer = quiet_trainer(
        max_epochs=EPOCHS, limit_val_batches=0, callbacks=[saves], enable_checkpointing=True
    )
    trainer.fit(model(), DataLoader(pairs(IMAGES), batch_size=16))  # 2 steps an epoch
    resumed = RecordLR()
    trainer = quiet_trainer(max_epochs=EPOCHS, limit_val_batches=0, callbacks=[resumed])
    mid_epoch_1 = tmp_path / "epoch=1-step=3.ckpt"  # 1 of epoch 1's 2 batches done
    trainer.fit(model(), DataLoader(pairs(IMAGES), batch_size=8), ckpt_path=mid_epoch_1)
    # at batch 8: epoch 1's batches 1-3, then epochs 2 and 3; the last at the rule's last step
    steps = list(range(1 * 4 + 1, EPOCHS * 4))
    assert resumed.lrs == pytest.approx([paper_rate(8, s / 4) for s in steps])


def test_resumed_with_the_same_batch_is_unchanged(tmp_path):
    saves = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    trainer = quiet_trainer(
        max_epochs=EPOCHS, limit_val_batches=0, callbacks=[saves], enable_checkpointing=True
    )
    trainer.fit(model(), DataLoader(pairs(IMAGES), batch_size=8))
    resumed = RecordLR()
    trainer = quiet_trainer(max_epochs=EPOCHS, limit_val_batches=0, callbacks=[resumed])
    trainer.fit(
        model(), DataLoader(pairs(IMAGES), batch_size=8), ckpt_path=tmp_path / "epoch=1-step=8.ckpt"
    )
    assert resumed.lrs == pytest.approx([paper_rate(8, 2 + s / 4) for s in range(8)])


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


def resume_with_twice_the_batch(tmp_path, make_model, data, record, callbacks=()) -> list:
    """Train ``make_model()`` for EPOCHS epochs at batch 8 (4 steps an epoch), then resume its
    checkpoint after 2 epochs at batch 16 (2 steps an epoch): ``record``'s rates of each run."""
    saves = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    trainer = quiet_trainer(
        max_epochs=EPOCHS,
        limit_val_batches=0,
        callbacks=[*callbacks, record, saves],
        enable_checkpointing=True,
    )
    trainer.fit(make_model(), DataLoader(data, batch_size=8))
    first, record.lrs = record.lrs, []
    trainer = quiet_trainer(max_epochs=EPOCHS, limit_val_batches=0, callbacks=[*callbacks, record])
    after_two_epochs = tmp_path / "epoch=1-step=8.ckpt"
    trainer.fit(make_model(), DataLoader(data, batch_size=16), ckpt_path=after_two_epochs)
    return [first, record.lrs]


def cosine(peak: float, steps: range, total: int) -> list[float]:
    return [peak * cosine_schedule_reference(s, 0, total, 0.0) for s in steps]


def test_linear_eval_resumed_with_twice_the_global_batch_goes_on_at_the_same_epoch(tmp_path):
    """LinearEval's rate is not scaled by the batch; its cosine spans the run's steps."""

    def classifier() -> LinearEval:
        return LinearEval(num_classes=3, lr=0.2, backbone="resnet18")

    images = [(a, label) for (a, _), label in pairs(IMAGES)]
    first, resumed = resume_with_twice_the_batch(tmp_path, classifier, images, RecordLR())
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
    first, resumed = resume_with_twice_the_batch(tmp_path, model, pairs(IMAGES), record, [probe])
    assert first == pytest.approx(cosine(0.5, range(16), 16))
    # epochs 2 and 3 at batch 16: the probe's steps 4 to 7 of 8 (not past the end at rate 0)
    assert resumed == pytest.approx(cosine(0.5, range(4, 8), 8))
