"""KNNReport: kNN top-1 before and after fit on every held-out image, against a float64
brute-force reference, whatever limit_val_batches says."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from simclr_lightning import KNNReport
from tests.helpers import FeatureData, FeatureModule, quiet_trainer
from tests.reference import weighted_knn_top1


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
    first.fit(Drift(8), datamodule=data)
    first.save_checkpoint(tmp_path / "epoch1.ckpt")
    assert first.callbacks[0].results["final_top1"] != first.callbacks[0].results["init_top1"]

    before = weighted_knn_top1(train[0], train[1], val[0], val[1], k=15, temperature=0.1)
    report = KNNReport(k=15)
    resumed = quiet_trainer(max_epochs=2, limit_val_batches=0, callbacks=[report])
    resumed.fit(Drift(8), datamodule=data, ckpt_path=tmp_path / "epoch1.ckpt")
    assert report.results["init_top1"] == pytest.approx(before)
    assert "randomly initialised encoder" in capsys.readouterr().out

    # a checkpoint without the callback's state: the resumed encoder is measured, and named
    ckpt = torch.load(tmp_path / "epoch1.ckpt", weights_only=False)
    del ckpt["callbacks"]
    torch.save(ckpt, tmp_path / "bare.ckpt")
    report = KNNReport(k=15)
    resumed = quiet_trainer(max_epochs=2, limit_val_batches=0, callbacks=[report])
    resumed.fit(Drift(8), datamodule=data, ckpt_path=tmp_path / "bare.ckpt")
    assert report.results["init_top1"] == pytest.approx(first.callbacks[0].results["final_top1"])
    assert "encoder resumed from bare.ckpt" in capsys.readouterr().out
