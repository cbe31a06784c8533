"""KNNMonitor in a real Trainer, against the float64 brute-force kNN of tests/reference.py."""

from __future__ import annotations

import signal

import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn
from torch.utils.data import DataLoader

from simclr_lightning import Preemption, SettingError
from simclr_lightning.callbacks import KNNMonitor
from tests.helpers import EpochMetrics, FeatureData, FeatureModule, SignalAt, quiet_trainer
from tests.reference import weighted_knn_scores

pytestmark = pytest.mark.usefixtures("one_thread")


def test_monitor_logs_brute_force_accuracy_every_n_epochs(tmp_path):
    gen = torch.Generator().manual_seed(0)
    centers = 2 * torch.randn(3, 6, generator=gen)
    train_y = torch.randint(0, 3, (45,), generator=gen)
    val_y = torch.randint(0, 3, (21,), generator=gen)
    train_x = centers[train_y] + 2 * torch.randn(45, 6, generator=gen)
    val_x = centers[val_y] + 2 * torch.randn(21, 6, generator=gen)
    train_y[:5] = -1  # unlabeled images: not in the bank
    val_y[-3:] = -1  # nor scored
    metrics = EpochMetrics()
    trainer = quiet_trainer(
        max_epochs=4,
        callbacks=[KNNMonitor(k=9, temperature=0.2, every_n_epochs=2, chunk_size=4), metrics],
    )
    trainer.fit(FeatureModule(6), datamodule=FeatureData((train_x, train_y), (val_x, val_y)))

    labelled = val_y >= 0
    scores = weighted_knn_scores(val_x[labelled], train_x[5:], train_y[5:], 3, 9, 0.2)
    want_top1 = (scores.argmax(1) == val_y[labelled]).double().mean().item()
    assert 0.3 < want_top1 < 1.0  # informative: neither chance nor trivially perfect
    assert "knn/val_top1" not in metrics.epochs[0]  # every_n_epochs=2: epochs 2 and 4
    for epoch in (1, 3):
        assert metrics.epochs[epoch]["knn/val_top1"] == pytest.approx(want_top1, abs=1e-6)
        assert metrics.epochs[epoch]["knn/val_top5"] == 1.0  # 3 classes


class LinearFeatures(FeatureModule):
    """Features from a linear layer, whose weights bf16-true makes bf16."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.lin = nn.Linear(dim, dim)

    def forward(self, x):
        return self.lin(x) + 0 * self.w


def test_monitor_under_bf16_true_matches_brute_force_knn_of_the_bf16_features():
    """Under bf16-true the bank pass gets bf16 images as Lightning's loops do (float32 images
    meeting bf16 weights cannot be multiplied)."""
    gen = torch.Generator().manual_seed(3)
    centers = 2 * torch.randn(3, 6, generator=gen)
    train_y, val_y = (
        torch.randint(0, 3, (24,), generator=gen),
        torch.randint(0, 3, (12,), generator=gen),
    )
    train_x = centers[train_y] + 2 * torch.randn(24, 6, generator=gen)
    val_x = centers[val_y] + 2 * torch.randn(12, 6, generator=gen)
    model, metrics = LinearFeatures(6), EpochMetrics()
    trainer = quiet_trainer(
        max_epochs=1, precision="bf16-true", callbacks=[KNNMonitor(k=5), metrics]
    )
    trainer.fit(model, datamodule=FeatureData((train_x, train_y), (val_x, val_y)))

    assert model.lin.weight.dtype == torch.bfloat16
    with torch.no_grad():  # the lin layer has no loss: as trained, as at the start
        bank, query = model.lin(train_x.bfloat16()), model.lin(val_x.bfloat16())
    scores = weighted_knn_scores(query, bank, train_y, 3, 5, 0.1)
    want_top1 = (scores.argmax(1) == val_y).double().mean().item()
    assert 0.3 < want_top1 < 1.0
    assert metrics.epochs[0]["knn/val_top1"] == pytest.approx(want_top1, abs=1e-6)


def test_plain_dataloaders_are_refused_before_training():
    """Without a data module there is no memory bank: the error came at the first kNN epoch,
    after one (or every_n_epochs) epochs of training."""
    x, y = torch.randn(16, 6), torch.randint(0, 2, (16,))
    loader = DataLoader(list(zip(x, y, strict=True)), batch_size=8)
    trainer = quiet_trainer(max_epochs=5, callbacks=[KNNMonitor(k=3, every_n_epochs=5)])
    model = FeatureModule(6)
    with pytest.raises(SettingError, match=r"KNNMonitor needs a data module .* pass datamodule="):
        trainer.fit(model, loader, loader)
    assert trainer.global_step == 0


class CountingPasses(KNNMonitor):
    """Records (epoch, at the epoch's last batch) of every pass over the training set."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.passes: list[tuple[int, bool]] = []

    def _encode_bank(self, trainer, pl_module):
        progress = trainer.fit_loop.epoch_loop.batch_progress
        self.passes.append((trainer.current_epoch, progress.is_last_batch))
        return super()._encode_bank(trainer, pl_module)


def test_fast_dev_run_makes_no_bank_pass():
    """A pass over the whole training set, in a run meant to check the code in one batch."""
    x, y = torch.randn(16, 6), torch.randint(0, 2, (16,))
    monitor = CountingPasses(k=3)
    trainer = quiet_trainer(fast_dev_run=True, callbacks=[monitor])
    trainer.fit(FeatureModule(6), datamodule=FeatureData((x, y), (x, y)))
    assert trainer.global_step == 1 and monitor.passes == []


def test_validations_inside_an_epoch_make_no_bank_pass():
    """val_check_interval=0.5 validated twice an epoch, and each made a pass over the whole
    training set (on ImageNet, each an hour): the figure comes at the epoch's end only."""
    x, y = torch.randn(32, 6), torch.randint(0, 2, (32,))
    monitor, metrics = CountingPasses(k=3), EpochMetrics()
    trainer = quiet_trainer(max_epochs=2, val_check_interval=0.5, callbacks=[monitor, metrics])
    trainer.fit(FeatureModule(6), datamodule=FeatureData((x, y), (x, y)))
    assert monitor.passes == [(0, True), (1, True)]
    assert len(metrics.epochs) == 4  # validated twice an epoch
    assert "knn/val_top1" not in metrics.epochs[0] and "knn/val_top1" in metrics.epochs[1]


def test_bad_bank_dtype_is_rejected():
    with pytest.raises(SettingError, match=r"^KNNMonitor\.bank_dtype='float8' is invalid: must"):
        KNNMonitor(bank_dtype="float8")


class SixClassData(FeatureData):
    num_classes = 6  # what SimCLRDataModule subclasses expose


def test_monitor_reads_num_classes_and_reports_at_the_last_epoch():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 6, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    monitor, metrics = KNNMonitor(k=5, every_n_epochs=5), EpochMetrics()
    quiet_trainer(max_epochs=2, callbacks=[monitor, metrics]).fit(
        FeatureModule(6), datamodule=SixClassData((x, y), (x, y))
    )
    assert monitor.num_classes == 6  # from the data module, not 1 + the largest label (3)
    assert "knn/val_top1" not in metrics.epochs[0] and "knn/val_top1" in metrics.epochs[1]


class TwoClassData(FeatureData):
    num_classes = 2


def test_num_classes_other_than_the_data_modules_is_refused_before_training():
    """num_classes=1 on a 2-class folder: "index 1 is out of bounds for dimension 1 with size
    1" at the first kNN epoch's end."""
    x, y = torch.randn(16, 6), torch.randint(0, 2, (16,))
    trainer = quiet_trainer(max_epochs=1, callbacks=[KNNMonitor(num_classes=1, k=3)])
    said = r"^KNNMonitor.num_classes=1 is invalid: must be at least 2, the classes of the data "
    with pytest.raises(SettingError, match=said + r"module \(TwoClassData\), or null"):
        trainer.fit(FeatureModule(6), datamodule=TwoClassData((x, y), (x, y)))
    assert trainer.global_step == 0


@pytest.mark.parametrize("split", ["bank", "validation"])
def test_labels_past_num_classes_are_refused_naming_the_setting(split):
    """Labels 0-2, num_classes=2, data that does not count its classes: a bank label 2 was an
    index error in the vote, a validation label 2 a query never scored right. Validation
    labels are checked before the pass over the training set."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 6, generator=gen), torch.arange(24) % 2
    wide = torch.arange(24) % 3
    train, val = ((x, wide), (x, y)) if split == "bank" else ((x, y), (x, wide))
    monitor = CountingPasses(num_classes=2, k=3)
    trainer = quiet_trainer(max_epochs=1, callbacks=[monitor])
    said = r"^KNNMonitor.num_classes=2 is invalid: must be above the largest label, 2 \("
    with pytest.raises(SettingError, match=said):
        trainer.fit(FeatureModule(6), datamodule=FeatureData(train, val))
    assert len(monitor.passes) == (1 if split == "bank" else 0)


class BankSignalData(FeatureData):
    """The kNN bank's dataset sends SIGTERM while it is read (a scheduler stopping the run in
    the middle of the bank pass, the longest stretch without a training step)."""

    def __init__(self, train, val, at: int) -> None:
        super().__init__(train, val, batch_size=4)
        self.bank = SignalAt(*train, at=at, signum=signal.SIGTERM)

    def eval_train_dataloader(self):
        return DataLoader(self.bank, batch_size=4)


def test_sigterm_in_the_bank_pass_cuts_it_short_and_the_run_stops_after_saving(tmp_path):
    """The pass stops at the batch the signal came in (not the 10 of the whole bank), no kNN
    figure is logged for a cut bank, and Preemption saves the epoch's last step."""
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(40, 6, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    data = BankSignalData((x, y), (x[:8], y[:8]), at=9)  # in the bank's third batch
    trainer = quiet_trainer(
        max_epochs=2,
        default_root_dir=str(tmp_path),
        callbacks=[KNNMonitor(k=5), Preemption()],
        num_sanity_val_steps=0,
    )
    with pytest.raises(SIGTERMException):
        trainer.fit(FeatureModule(6), datamodule=data)
    assert data.bank.read == list(range(12))  # batches 0-2 fetched, none after the signal
    assert "knn/val_top1" not in trainer.callback_metrics
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved["global_step"] == trainer.global_step == 10  # epoch 0: 40 images, batches of 4


@pytest.mark.parametrize(
    ("limits", "validations", "reported"),
    [
        (dict(max_epochs=-1, max_steps=8), 2, [False, True]),  # ends at an epoch's end
        (dict(max_epochs=-1, max_steps=6), 1, [True]),  # mid-epoch 2, which never validates
        (dict(max_epochs=4, check_val_every_n_epoch=3), 1, [True]),  # epoch 4 does not either
    ],
)
def test_the_runs_last_validation_reports(limits, validations, reported):
    """A run bounded by max_steps (max_epochs=-1: no epoch is "the last" by count), or whose
    last epochs do not validate, ended without any kNN figure when shorter than every_n_epochs."""
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(32, 6, generator=gen), torch.randint(0, 3, (32,), generator=gen)
    metrics = EpochMetrics()
    trainer = quiet_trainer(callbacks=[KNNMonitor(k=5, every_n_epochs=10), metrics], **limits)
    trainer.fit(FeatureModule(6), datamodule=FeatureData((x, y), (x, y)))  # 4 batches an epoch
    assert len(metrics.epochs) == validations
    assert ["knn/val_top1" in m for m in metrics.epochs] == reported


def test_early_stopping_held_back_by_min_epochs_makes_no_extra_bank_pass():
    """EarlyStopping asks to stop at once, but min_epochs keeps the run going: should_stop
    stays set, and each of those validations is not the last."""
    from lightning.pytorch.callbacks import EarlyStopping

    class Constant(FeatureModule):
        def validation_step(self, batch, batch_idx):
            self.log("v", 1.0)
            return super().validation_step(batch, batch_idx)

    x, y = torch.randn(32, 6), torch.randint(0, 2, (32,))
    stop = EarlyStopping("v", patience=0, check_finite=False)
    monitor = CountingPasses(k=3, every_n_epochs=10)
    trainer = quiet_trainer(max_epochs=20, min_epochs=4, callbacks=[monitor, stop])
    trainer.fit(Constant(6), datamodule=FeatureData((x, y), (x, y)))
    assert trainer.current_epoch == 4 and monitor.passes == []  # stopped after min_epochs, no pass


def _misaligned_monitors():
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    top1 = "knn/val_top1"
    return [  # (KNNMonitor.every_n_epochs, trainer settings, callback, words of the error)
        (3, {}, EarlyStopping(top1, mode="max"), "checks at every epoch's end"),
        (3, {}, EarlyStopping(top1, mode="max", strict=False), "checks at every epoch's end"),
        (2, {"check_val_every_n_epoch": 3}, EarlyStopping(top1), "checks at every validation"),
        (1, {"val_check_interval": 0.5}, EarlyStopping(top1), "validations inside epochs"),
        (3, {}, ModelCheckpoint(monitor=top1, mode="max"), "saves at the end of each epoch"),
        (2, {}, ModelCheckpoint(monitor=top1, every_n_epochs=3), "every 3 epochs"),
        (2, {"check_val_every_n_epoch": 3}, ModelCheckpoint(monitor=top1),
         r"saves at the end of every 3 epochs \(trainer.check_val_every_n_epoch=3\)"),
        (1, {}, ModelCheckpoint(monitor="knn/val_top5", every_n_train_steps=2), "by steps"),
        (
            1,
            {"check_val_every_n_epoch": 2},
            ModelCheckpoint(monitor=top1, save_on_train_epoch_end=True),
            "saves at the end of each epoch",
        ),
        (2, {"check_val_every_n_epoch": None, "val_check_interval": 3}, EarlyStopping(top1),
         "validations counted in steps"),
        (1, {"check_val_every_n_epoch": None, "val_check_interval": 3},
         ModelCheckpoint(monitor=top1, save_on_train_epoch_end=True), "may not reach"),
    ]  # fmt: skip


def _aligned_monitors():
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    top1 = "knn/val_top1"
    by_steps = {"check_val_every_n_epoch": None, "val_check_interval": 3}
    at_ends = ModelCheckpoint(monitor=top1, save_on_train_epoch_end=True)
    return [  # measured at every check: kept (they were refused by the first version)
        (1, {"val_check_interval": 0.5}, at_ends),
        (1, by_steps, EarlyStopping(top1)),
        (1, by_steps, ModelCheckpoint(monitor=top1)),
        (2, {"check_val_every_n_epoch": 2}, ModelCheckpoint(monitor=top1, every_n_epochs=4)),
    ]


def monitor_run(tmp_path, every: int, settings: dict, callback, max_epochs: int):
    """A trainer with a kNN monitor of every ``every`` epochs beside ``callback``
    (EarlyStopping or ModelCheckpoint watching its metric), checkpointing on, and its fit."""
    x, y = torch.randn(32, 6), torch.randint(0, 2, (32,))
    trainer = quiet_trainer(
        max_epochs=max_epochs,
        default_root_dir=tmp_path,
        enable_checkpointing=True,
        callbacks=[KNNMonitor(k=3, every_n_epochs=every), callback],
        **settings,
    )
    return trainer, lambda: trainer.fit(FeatureModule(6), datamodule=FeatureData((x, y), (x, y)))


@pytest.mark.parametrize("every, settings, callback", _aligned_monitors())
def test_a_monitor_of_knn_measured_at_every_check_is_kept(tmp_path, every, settings, callback):
    trainer, fit = monitor_run(tmp_path, every, settings, callback, max_epochs=4)
    fit()
    assert "knn/val_top1" in trainer.callback_metrics  # no refusal, no Lightning error


@pytest.mark.parametrize("every, settings, callback, words", _misaligned_monitors())
def test_a_monitor_of_knn_at_epochs_without_it_is_refused_before_training(
    tmp_path, every, settings, callback, words
):
    """Lightning would stop the run after its first epoch (or keep reading the last kNN value:
    an EarlyStopping that is not strict, with patience 2, stops 2 epochs after the first
    measurement for a lack of improvement nobody measured)."""
    trainer, fit = monitor_run(tmp_path, every, settings, callback, max_epochs=12)
    with pytest.raises(SettingError, match=words) as caught:
        fit()
    assert trainer.global_step == 0
    assert f"KNNMonitor.every_n_epochs={every}" in str(caught.value)
    fix = {"inside epochs": "trainer.val_check_interval=1.0", "by steps": "Save by epochs"}
    for found, said in fix.items():
        assert (said in str(caught.value)) == (found in str(caught.value)), said
    assert "\n" not in str(caught.value)


def test_monitors_of_knn_at_its_epochs_read_a_fresh_measurement_each_time(tmp_path):
    """The fixes the error names: kNN at every validation, every 3 epochs, for EarlyStopping;
    a checkpoint every 3 epochs for ModelCheckpoint. Patience 2 then counts measurements: the
    flat kNN of a model that does not learn stops the run at the third (epoch 8)."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    class Flat(FeatureModule):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    x, y = torch.randn(32, 6), torch.randint(0, 2, (32,))
    knn = CountingPasses(k=3, every_n_epochs=1)
    stop = EarlyStopping("knn/val_top1", mode="max", patience=2)
    best = ModelCheckpoint(tmp_path, monitor="knn/val_top1", mode="max", every_n_epochs=3)
    trainer = quiet_trainer(
        max_epochs=30,
        check_val_every_n_epoch=3,
        callbacks=[knn, stop, best],
        enable_checkpointing=True,
    )
    trainer.fit(Flat(6), datamodule=FeatureData((x, y), (x, y)))
    assert [epoch for epoch, _ in knn.passes] == [2, 5, 8]
    assert trainer.current_epoch == 9 and stop.wait_count == 2
    assert best.best_model_path.endswith("epoch=2-step=12.ckpt")  # the first; none better
    assert float(best.best_model_score) == float(trainer.callback_metrics["knn/val_top1"])


def test_unlabelled_validation_images_are_named_as_what_is_missing():
    """train/ of class folders beside a flat val/ (labels -1): the warning said "no labelled
    training or validation images" though the training images are labelled."""
    x, y = torch.randn(32, 6), torch.randint(0, 2, (32,))
    trainer = quiet_trainer(max_epochs=1, callbacks=[KNNMonitor(k=3)])
    with pytest.warns(UserWarning, match="KNNMonitor: no labelled validation images; skipping"):
        trainer.fit(FeatureModule(6), datamodule=FeatureData((x, y), (x, torch.full_like(y, -1))))
    assert "knn/val_top1" not in trainer.callback_metrics
