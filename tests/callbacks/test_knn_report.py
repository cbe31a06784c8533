"""KNNReport: kNN top-1 before and after fit on every held-out image, against a float64
brute-force reference, whatever limit_val_batches says."""

from __future__ import annotations

import csv

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from simclr_lightning import KNNReport
from simclr_lightning.errors import SettingError
from tests.helpers import FeatureData, FeatureModule, quiet_trainer
from tests.reference import weighted_knn_top1

LOADED = "encoder at the start of the run"  # weights the report cannot tell are fresh


class HeldOutData(FeatureData):
    num_classes = 5

    def test_dataloader(self):
        return DataLoader(TensorDataset(*self.val), batch_size=7)


class Drift(FeatureModule):
    """Features move during fit (x + 4w along the first axis), so before and after differ."""

    def forward(self, x):
        shift = torch.zeros_like(x)
        shift[:, 0] = 4 * self.w
        return x + shift

    def training_step(self, batch, batch_idx):
        return {"loss": (self.w - 1) ** 2, "features": self(batch[0]).detach(), "labels": batch[1]}


class Normed(Drift):
    """Drift behind a batch norm, whose statistics tell a fresh module from a trained one.
    Fresh ones (mean 0, variance 1) scale every feature alike: the kNN of Drift."""

    def __init__(self, dim: int):
        super().__init__(dim)
        self.norm = nn.BatchNorm1d(dim, affine=False)

    def forward(self, x):
        return super().forward(self.norm(x))


def noisy(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 5, (n,), generator=gen)
    return torch.eye(5, 8)[y] + 0.8 * torch.randn(n, 8, generator=gen), y


def test_report_matches_brute_force_knn_before_and_after(capsys):
    train, val = noisy(120, 0), noisy(53, 1)
    report = KNNReport(k=15, temperature=0.1)
    model = Drift(8)
    trainer = quiet_trainer(max_epochs=2, limit_val_batches=1, callbacks=[report])
    trainer.fit(model, datamodule=HeldOutData(train, val, batch_size=10))

    before = weighted_knn_top1(train[0], train[1], val[0], val[1], k=15, temperature=0.1)
    moved = model.w.detach().item()
    assert moved != 0.0

    def shifted(x):
        return x + torch.nn.functional.pad(torch.full((len(x), 1), 4 * moved), (0, 7))

    after = weighted_knn_top1(shifted(train[0]), train[1], shifted(val[0]), val[1], 15, 0.1)
    r = report.results
    assert r["queries"] == 53 and r["bank"] == 120  # every held-out image, not one batch
    assert r["init_top1"] == pytest.approx(before) and r["final_top1"] == pytest.approx(after)
    assert r["chance_top1"] == pytest.approx(0.2)
    out = capsys.readouterr().out
    assert f"{100 * before:5.1f}%" in out and f"{100 * after:5.1f}%" in out and "20.0%" in out


def test_a_resumed_run_reports_the_encoder_the_run_began_with(tmp_path, capsys):
    train, val = noisy(120, 0), noisy(53, 1)
    data = HeldOutData(train, val, batch_size=10)
    first = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[KNNReport(k=15)])
    first.fit(Normed(8), datamodule=data)
    first.save_checkpoint(tmp_path / "epoch1.ckpt")
    assert first.callbacks[0].results["final_top1"] != first.callbacks[0].results["init_top1"]

    before = weighted_knn_top1(train[0], train[1], val[0], val[1], k=15, temperature=0.1)
    report = KNNReport(k=15)
    resumed = quiet_trainer(max_epochs=2, limit_val_batches=0, callbacks=[report])
    resumed.fit(Normed(8), datamodule=data, ckpt_path=tmp_path / "epoch1.ckpt")
    assert report.results["init_top1"] == pytest.approx(before)
    assert "randomly initialised encoder" in capsys.readouterr().out

    # a checkpoint without the callback's state: the resumed encoder is measured, and named
    ckpt = torch.load(tmp_path / "epoch1.ckpt", weights_only=False)
    del ckpt["callbacks"]
    torch.save(ckpt, tmp_path / "bare.ckpt")
    report = KNNReport(k=15)
    resumed = quiet_trainer(max_epochs=2, limit_val_batches=0, callbacks=[report])
    resumed.fit(Normed(8), datamodule=data, ckpt_path=tmp_path / "bare.ckpt")
    assert report.results["init_top1"] == pytest.approx(first.callbacks[0].results["final_top1"])
    assert "encoder resumed from bare.ckpt" in capsys.readouterr().out


def test_a_fit_resumed_at_its_end_encodes_nothing(tmp_path, capsys):
    """A requeued job that had already finished trains nothing: no pass over either split
    (hours on ImageNet) for a report that is never printed."""
    data = HeldOutData(noisy(40, 0), noisy(20, 1), batch_size=10)
    first = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[KNNReport(k=5)])
    first.fit(Drift(8), datamodule=data)
    first.save_checkpoint(tmp_path / "done.ckpt")
    capsys.readouterr()
    measured: list[int] = []

    class Counting(KNNReport):
        def measure(self, trainer, pl_module):
            measured.append(trainer.global_step)
            return super().measure(trainer, pl_module)

    again = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[Counting(k=5)])
    again.fit(Drift(8), datamodule=data, ckpt_path=tmp_path / "done.ckpt")
    assert again.global_step == first.global_step  # nothing was trained...
    assert measured == []  # ...and nothing encoded
    assert "kNN top-1" not in capsys.readouterr().out


def test_fast_dev_run_encodes_nothing(capsys):
    """fast_dev_run is a one-batch check of the code: each measurement encodes both whole
    splits (on ImageNet, an hour)."""
    measured: list[int] = []

    class Counting(KNNReport):
        def measure(self, trainer, pl_module):
            measured.append(trainer.global_step)
            return super().measure(trainer, pl_module)

    data = HeldOutData(noisy(40, 0), noisy(20, 1), batch_size=10)
    trainer = quiet_trainer(fast_dev_run=True, callbacks=[Counting(k=5)])
    trainer.fit(Drift(8), datamodule=data)
    assert trainer.global_step == 1 and measured == []
    assert "kNN top-1" not in capsys.readouterr().out


def test_the_final_measurement_comes_before_the_strategy_tears_down(monkeypatch):
    """Lightning tears the strategy down (the module moved to the CPU, DDP's process group
    gone) before on_fit_end: a final pass there would encode a GPU run's data on the CPU."""
    events: list[tuple[str, bool]] = []

    class Spy(KNNReport):
        def measure(self, trainer, pl_module):
            on_device = pl_module.device == trainer.strategy.root_device
            events.append(("measure", on_device))
            return super().measure(trainer, pl_module)

    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[Spy(k=15)])
    teardown = trainer.strategy.teardown

    def recorded_teardown() -> None:
        events.append(("teardown", True))
        teardown()

    monkeypatch.setattr(trainer.strategy, "teardown", recorded_teardown)
    trainer.fit(Drift(8), datamodule=HeldOutData(noisy(40, 0), noisy(20, 1), batch_size=10))
    assert events == [("measure", True), ("measure", True), ("teardown", True)]


def test_the_report_reaches_the_logger_and_is_printed_once(tmp_path, capsys):
    report = KNNReport(k=15)
    logger = CSVLogger(tmp_path, name="", version="")
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[report], logger=logger)
    trainer.fit(Drift(8), datamodule=HeldOutData(noisy(40, 0), noisy(20, 1), batch_size=10))
    with open(tmp_path / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("knn_report/final_top1")]
    assert len(rows) == 1 and int(rows[0]["step"]) == trainer.global_step == 4
    for key in ("init_top1", "final_top1"):
        assert float(rows[0][f"knn_report/{key}"]) == pytest.approx(report.results[key])
    assert capsys.readouterr().out.count("kNN top-1 on all 20 held-out images") == 1


def test_a_run_tuned_by_the_batch_size_finder_reports_a_random_start(capsys):
    """The finder restores the step-0 state it saved (``trainer.ckpt_path`` becomes its
    temporary file): the report called the untrained encoder "resumed from
    .scale_batch_size_<uuid>.ckpt"."""
    from lightning.pytorch.callbacks import BatchSizeFinder

    report = KNNReport(k=5)
    finder = BatchSizeFinder(mode="power", init_val=4, max_trials=0, steps_per_trial=1)
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=1, callbacks=[finder, report])
    trainer.fit(Normed(8), datamodule=HeldOutData(noisy(40, 0), noisy(20, 1), batch_size=10))
    out = capsys.readouterr().out
    assert "randomly initialised encoder" in out and "resumed" not in out


def test_weights_loaded_before_the_fit_are_not_called_random(tmp_path, capsys):
    """``load_from_checkpoint`` (or ``load_state_dict``) then ``fit``: the report called the
    trained encoder "randomly initialised"; only a ckpt_path resume said otherwise."""
    data = HeldOutData(noisy(40, 0), noisy(20, 1), batch_size=10)
    first = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[KNNReport(k=5)])
    first.fit(Normed(8), datamodule=data)
    first.save_checkpoint(tmp_path / "pretrained.ckpt")
    assert "randomly initialised encoder" in capsys.readouterr().out  # a fresh module

    copied = Normed(8)
    copied.load_state_dict(first.lightning_module.state_dict())
    for model in (Normed.load_from_checkpoint(tmp_path / "pretrained.ckpt", dim=8), copied):
        trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[KNNReport(k=5)])
        trainer.fit(model, datamodule=data)
        out = capsys.readouterr().out
        assert f"  {LOADED}  " in out and "randomly" not in out
    # a module without normalisation layers cannot be told fresh: nothing is claimed
    quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[KNNReport(k=5)]).fit(
        Drift(8), datamodule=data
    )
    out = capsys.readouterr().out
    assert f"  {LOADED}  " in out and "randomly" not in out


def test_a_simclr_encoder_loaded_from_its_checkpoint_is_not_called_random(tmp_path, capsys):
    """The reviewer's case: ``SimCLR.load_from_checkpoint(ck)``, then a fit with the report;
    a fresh SimCLR is still "randomly initialised" (the quick start's report)."""
    from simclr_lightning import ImageFolderDataModule, SimCLR, SimCLRAugmentation
    from tests.helpers import write_png_folder

    write_png_folder(tmp_path, count=8, size=16, splits=("train", "val"))
    aug = SimCLRAugmentation(image_size=8)
    fresh = SimCLR("timm:test_resnet", cifar_stem=False, head_hidden_dim=8, head_output_dim=8)
    for model, start in ((fresh, "randomly initialised encoder"), (None, LOADED)):
        if model is None:
            model = SimCLR.load_from_checkpoint(tmp_path / "simclr.ckpt")
        data = ImageFolderDataModule(str(tmp_path), aug, batch_size=4, num_workers=0)
        trainer = quiet_trainer(max_steps=2, limit_val_batches=0, callbacks=[KNNReport(k=3)])
        trainer.fit(model, datamodule=data)
        trainer.save_checkpoint(tmp_path / "simclr.ckpt")
        rows = capsys.readouterr().out.splitlines()
        assert rows[rows.index(next(r for r in rows if "chance (2 classes)" in r)) + 1].startswith(
            f"  {start}  "
        )


def test_fresh_encoders_are_told_from_trained_and_loaded_ones():
    """Batch norms by their running statistics (a ResNet's, zero-initialised scales too),
    layer norms by their scale and shift (a ViT's)."""
    import torchvision

    from simclr_lightning.callbacks.knn_report import freshly_initialised

    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(zero_init_residual=True)
    vit = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.GroupNorm(2, 8))
    assert freshly_initialised(resnet) and freshly_initialised(vit)
    assert not freshly_initialised(nn.Linear(4, 4))  # nothing to tell by

    trained = torchvision.models.resnet18()
    trained(torch.randn(2, 3, 32, 32))  # a training-mode pass moves the statistics
    assert not freshly_initialised(trained)
    resnet.load_state_dict(trained.state_dict())
    assert not freshly_initialised(resnet)
    with torch.no_grad():
        vit[1].bias.add_(0.1)
    assert not freshly_initialised(vit)


def test_a_num_classes_the_labels_exceed_is_refused(capsys):
    """num_classes=3 for labels 0-4 failed in the vote's scatter with an index error."""

    class Uncounted(FeatureData):  # no num_classes: the setting is all there is
        test_dataloader = HeldOutData.test_dataloader

    data = Uncounted(noisy(40, 0), noisy(20, 1), batch_size=10)
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[KNNReport(3, 0.1, 3)])
    said = r"^KNNReport.num_classes=3 is invalid: must be above the largest label, 4 \("
    with pytest.raises(SettingError, match=said):
        trainer.fit(Drift(8), datamodule=data)
    assert trainer.global_step == 0

    # where the data module says how many, another number is refused before any pass
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[KNNReport(3, 0.1, 4)])
    said = r"^KNNReport.num_classes=4 is invalid: must be at least 5, the classes of the data "
    with pytest.raises(SettingError, match=said):
        trainer.fit(Drift(8), datamodule=HeldOutData(noisy(40, 0), noisy(20, 1), batch_size=10))


@pytest.mark.parametrize("limits, said", [({"max_epochs": 2}, "2 epochs, 24 steps"),
                                          ({"max_steps": 3}, "0.25 epochs, 3 steps"),
                                          ({"max_steps": 12}, "1 epoch, 12 steps")])  # fmt: skip
def test_the_report_says_the_epochs_trained_and_the_neighbours_there_are(capsys, limits, said):
    """12 batches an epoch. A fit stopped by max_steps inside its first epoch said "1 epochs"
    (Lightning counts the stopped epoch as done); k=200 against 120 images votes with 120."""
    train, val = noisy(120, 0), noisy(53, 1)
    trainer = quiet_trainer(limit_val_batches=0, callbacks=[KNNReport(k=200)], **limits)
    trainer.fit(Drift(8), datamodule=HeldOutData(train, val, batch_size=10))
    out = capsys.readouterr().out
    assert f"after SimCLR ({said})" in out
    assert "(weighted, k=120, against 120 training images)" in out


def test_a_supcon_run_is_reported_as_supcon(capsys):
    """configs/supcon.yaml's run was reported "after SimCLR"."""

    class SupConDrift(Drift):
        def __init__(self, dim: int):
            super().__init__(dim)
            self.hparams["loss"] = "supcon"

    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, callbacks=[KNNReport(k=5)])
    trainer.fit(SupConDrift(8), datamodule=HeldOutData(noisy(40, 0), noisy(20, 1), batch_size=10))
    out = capsys.readouterr().out
    assert "after SupCon (" in out and "after SimCLR" not in out


@pytest.mark.parametrize("when", ["start", "end"])
def test_a_stop_signal_cuts_the_reports_pass_short(tmp_path, capsys, when):
    """A SIGTERM while the report encodes the training set: its passes never looked, so
    over Fashion-MNIST's 70,000 images the run outlived the scheduler's grace period (and a
    second SIGTERM). Now the pass ends at the batch the signal came in, and the run stops and
    saves at its next step (Preemption), or, at the end, finishes without the report."""
    import signal

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from simclr_lightning import Preemption
    from tests.helpers import SignalAt

    class Signalling(HeldOutData):
        def __init__(self, train, val) -> None:
            super().__init__(train, val, batch_size=10)
            self.bank = SignalAt(*train, at=None, signum=signal.SIGTERM)

        def eval_train_dataloader(self):
            return DataLoader(self.bank, batch_size=4)

    class ArmAtTrainEnd(KNNReport):  # the signal in the final pass, not the first
        def on_train_end(self, trainer, pl_module):
            data.bank.at, data.bank.read = 9, []
            super().on_train_end(trainer, pl_module)

    data = Signalling(noisy(40, 0), noisy(20, 1))
    if when == "start":
        data.bank.at = 9  # in the bank's third batch of four
        report = KNNReport(k=5)
    else:
        report = ArmAtTrainEnd(k=5)
    trainer = quiet_trainer(
        max_epochs=1, limit_val_batches=0, default_root_dir=str(tmp_path),
        callbacks=[report, Preemption()],
    )  # fmt: skip
    if when == "start":
        with pytest.raises(SIGTERMException):
            trainer.fit(Drift(8), datamodule=data)
        saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
        assert saved["global_step"] == trainer.global_step == 1  # stopped at the first step
    else:
        trainer.fit(Drift(8), datamodule=data)
        assert trainer.global_step == 4  # the epoch trained whole
    assert data.bank.read == list(range(12))  # batches 0-2 of 10, none after the signal
    assert "kNN top-1" not in capsys.readouterr().out and report.results == {}


def test_the_report_comes_after_the_progress_bar(capsys):
    """The report was printed while the epoch's bar was still open: on closing, the bar drew
    itself again below the table, so the run's last line was a bar, not the result."""
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[KNNReport(k=15)],
                            enable_progress_bar=True)  # fmt: skip
    trainer.fit(Drift(8), datamodule=HeldOutData(noisy(40, 0), noisy(20, 1), batch_size=10))
    captured = capsys.readouterr()
    out = captured.out + captured.err
    lines = [line for line in out.replace("\r", "\n").splitlines() if line.strip()]
    assert lines[-1].startswith("  after SimCLR (1 epoch, 4 steps)"), lines[-4:]


@pytest.mark.parametrize(
    ("layout", "said"),
    [
        ("unlabeled", r"labelled images, and the data module \(ImageFolderDataModule\) has none"),
        ("no val", r"held-out images, and the data module \(ImageFolderDataModule\) has none"),
    ],
)
def test_data_the_report_cannot_score_is_refused_before_any_pass(tmp_path, layout, said):
    """An image folder without class folders, or without val/: a traceback after the pass
    over the whole training split (the quick start's config lists the report)."""
    import shutil

    from simclr_lightning import ImageFolderDataModule, SimCLR
    from simclr_lightning.errors import SettingError
    from tests.helpers import write_png_folder

    write_png_folder(tmp_path, count=8, size=16, splits=("train",))
    if layout == "unlabeled":
        for path in (tmp_path / "train").rglob("*.png"):
            path.rename(tmp_path / "train" / f"{path.parent.name}_{path.name}")
        shutil.rmtree(tmp_path / "train" / "c0")
        shutil.rmtree(tmp_path / "train" / "c1")
    report = KNNReport(k=5)
    passes = []
    report.measure = lambda *args: passes.append(args)  # no pass may run
    data = ImageFolderDataModule(str(tmp_path), batch_size=4, num_workers=0)
    trainer = quiet_trainer(max_steps=1, callbacks=[report])
    with pytest.raises(SettingError, match=rf"^KNNReport needs {said}.*: remove the KNNReport"):
        trainer.fit(SimCLR(head_hidden_dim=16, head_output_dim=8), datamodule=data)
    assert passes == [] and trainer.global_step == 0
