"""Weighted kNN against a float64 brute force written with plain loops, and the monitor."""

from __future__ import annotations

import itertools
import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from simclr_lightning.knn import KNNMonitor, knn_predict
from tests.conftest import quiet_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_scores(query, bank, labels, num_classes, k, temperature):
    """InstDisc's weighted vote, one query and one bank row at a time, in float64; among equal
    similarities the lower bank index counts as nearer."""
    query, bank, labels = query.double().tolist(), bank.double().tolist(), labels.tolist()

    def unit(v):
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]

    bank = [unit(b) for b in bank]
    out = []
    for q in query:
        q = unit(q)
        sims = [sum(a * b for a, b in zip(q, row, strict=True)) for row in bank]
        nearest = sorted(range(len(bank)), key=lambda j: (-sims[j], j))[:k]
        scores = [0.0] * num_classes
        for j in nearest:
            scores[labels[j]] += math.exp(sims[j] / temperature)
        out.append(scores)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize(("k", "chunk"), [(1, 1000), (7, 3), (60, 5), (500, 16)])
def test_knn_predict_matches_brute_force(k, chunk):
    gen = torch.Generator().manual_seed(k)
    query, bank = torch.randn(23, 8, generator=gen), torch.randn(60, 8, generator=gen)
    labels = torch.randint(0, 4, (60,), generator=gen)
    got = knn_predict(query, bank, labels, 4, k=k, temperature=0.1, chunk_size=chunk)
    want = reference_scores(query, bank, labels, 4, k, 0.1)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def tie_heavy_features(n: int, seed: int) -> torch.Tensor:
    """Rows from a small set whose normalised dot products are exact in float32 (0, +-0.5,
    +-1), so many similarities tie exactly however the matmul sums."""
    basis = [list(v) for v in torch.eye(4).tolist()]
    basis += [list(s) for s in itertools.product([1.0, -1.0], repeat=4)]
    gen = torch.Generator().manual_seed(seed)
    return torch.tensor(basis)[torch.randint(0, len(basis), (n,), generator=gen)]


@pytest.mark.parametrize("k", [3, 10, 41])
def test_knn_predict_breaks_ties_towards_lower_bank_index(k):
    query, bank = tie_heavy_features(30, seed=1), tie_heavy_features(40, seed=2)
    labels = torch.randint(0, 5, (40,), generator=torch.Generator().manual_seed(3))
    want = reference_scores(query, bank, labels, 5, k, 0.5)
    for chunk in (1, 7, 100):
        got = knn_predict(query, bank, labels, 5, k=k, temperature=0.5, chunk_size=chunk)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_tie_case_is_one_a_careless_top_k_gets_wrong():
    """The tie test must be able to fail: picking the tied rows in another order changes the
    votes for this data."""
    query, bank = tie_heavy_features(30, seed=1), tie_heavy_features(40, seed=2)
    labels = torch.randint(0, 5, (40,), generator=torch.Generator().manual_seed(3))
    want = reference_scores(query, bank, labels, 5, 10, 0.5)
    reversed_bank = reference_scores(query, bank.flip(0), labels.flip(0), 5, 10, 0.5)
    assert not torch.allclose(want, reversed_bank)


def test_knn_predict_chunked_equals_unchunked():
    gen = torch.Generator().manual_seed(0)
    query, bank = torch.randn(101, 32, generator=gen), torch.randn(300, 32, generator=gen)
    labels = torch.randint(0, 10, (300,), generator=gen)
    whole = knn_predict(query, bank, labels, 10, k=20, chunk_size=10_000)
    for chunk in (1, 13, 64):
        torch.testing.assert_close(
            knn_predict(query, bank, labels, 10, k=20, chunk_size=chunk),
            whole,
            rtol=1e-5,
            atol=1e-6,
        )


def test_knn_predict_bank_smaller_than_k_and_classes():
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    bank = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    scores = knn_predict(query, bank, torch.tensor([0, 6]), num_classes=8, k=200, temperature=1)
    e = math.e
    want = torch.tensor([[e, 0, 0, 0, 0, 0, 1, 0], [1, 0, 0, 0, 0, 0, e, 0]])
    torch.testing.assert_close(scores, want)


# -- the monitor in a real Trainer --------------------------------------------------------------


class FeatureModule(L.LightningModule):
    """Its features are its inputs, so the expected kNN result is known independently."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.feature_dim = dim
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x + 0 * self.w

    def training_step(self, batch, batch_idx):
        x, y = batch
        return {"loss": (self.w**2).sum(), "features": self(x).detach(), "labels": y}

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return {"features": self(x), "labels": y}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class FeatureData(L.LightningDataModule):
    def __init__(self, train, val, batch_size=8) -> None:
        super().__init__()
        self.train, self.val, self.batch_size = train, val, batch_size

    def train_dataloader(self):
        return DataLoader(TensorDataset(*self.train), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(TensorDataset(*self.val), batch_size=self.batch_size)

    def eval_train_dataloader(self):
        return DataLoader(TensorDataset(*self.train), batch_size=self.batch_size)


class EpochMetrics(L.Callback):
    def __init__(self) -> None:
        self.epochs: list[dict] = []

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.epochs.append({k: float(v) for k, v in trainer.callback_metrics.items()})


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
    scores = reference_scores(val_x[labelled], train_x[5:], train_y[5:], 3, 9, 0.2)
    want_top1 = (scores.argmax(1) == val_y[labelled]).double().mean().item()
    assert 0.3 < want_top1 < 1.0  # informative: neither chance nor trivially perfect
    assert "knn/val_top1" not in metrics.epochs[0]  # every_n_epochs=2: epochs 2 and 4
    for epoch in (1, 3):
        assert metrics.epochs[epoch]["knn/val_top1"] == pytest.approx(want_top1, abs=1e-6)
        assert metrics.epochs[epoch]["knn/val_top5"] == 1.0  # 3 classes
