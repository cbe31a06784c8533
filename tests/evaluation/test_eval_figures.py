"""LinearEval's validation and test figures per loader: two validation splits are reported
apart (not pooled into one top-1 and loss), and a split with no labelled image reports nothing
rather than a 0% / zero loss that reads as a result."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader

from simclr_lightning.evaluation import LinearEval
from tests.helpers import quiet_trainer

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = 4


def split(n: int, seed: int, labels: list[int] | None = None) -> list:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=gen)
    y = (
        torch.tensor(labels)
        if labels is not None
        else torch.randint(0, CLASSES, (n,), generator=gen)
    )
    return list(zip(x, y, strict=True))


def reference(model: LinearEval, rows: list) -> dict[str, float]:
    """Top-1, top-5 (here all 4 classes: 1.0) and mean cross-entropy in float64, by hand."""
    model.eval()
    with torch.no_grad():
        logits = torch.stack([model(x[None])[0] for x, _ in rows]).double()
    labels = [int(y) for _, y in rows]
    hits = sum(int(logits[i].argmax()) == y for i, y in enumerate(labels) if y >= 0)
    losses = [
        float(torch.logsumexp(logits[i], 0) - logits[i, y]) for i, y in enumerate(labels) if y >= 0
    ]
    return {"top1": hits / len(losses), "top5": 1.0, "loss": math.fsum(losses) / len(losses)}


def model() -> LinearEval:
    torch.manual_seed(0)
    return LinearEval(num_classes=CLASSES, backbone="resnet18", zero_init_classifier=False)


def test_each_validation_loader_has_its_own_figures():
    a, b = split(9, seed=1), split(7, seed=2)
    b[3] = (b[3][0], torch.tensor(-1))  # an unlabelled image counts in neither figure
    net = model()
    trainer = quiet_trainer()
    (first, second) = trainer.validate(
        net, [DataLoader(a, batch_size=4), DataLoader(b, batch_size=4)], verbose=False
    )
    for figures, rows, idx in ((first, a, 0), (second, b, 1)):
        wanted = reference(net, rows)
        for name, value in wanted.items():
            key = f"val/{name}/dataloader_idx_{idx}"
            assert figures[key] == pytest.approx(value, abs=1e-5), key
    assert reference(net, a)["top1"] != reference(net, b)["top1"]  # pooling would show


def test_a_split_without_labels_logs_no_figures():
    net = model()
    unlabelled = [(x, torch.tensor(-1)) for x, _ in split(6, seed=3)]
    with pytest.warns(UserWarning, match=r"the test split holds no labelled image"):
        (figures,) = quiet_trainer().test(net, DataLoader(unlabelled, batch_size=4), verbose=False)
    assert not any(name.startswith("test/") for name in figures), figures

    labelled = split(5, seed=4)
    with pytest.warns(UserWarning, match=r"test split/dataloader_idx_1 holds no labelled"):
        (first, second) = quiet_trainer().test(
            net, [DataLoader(labelled, batch_size=4), DataLoader(unlabelled)], verbose=False
        )
    assert first["test/top1/dataloader_idx_0"] == pytest.approx(reference(net, labelled)["top1"])
    assert not any("dataloader_idx_1" in name for name in second), second


def test_steps_called_by_hand_count_each_loader_apart():
    """Outside Lightning's loop (no epoch start): a first step of loader 1 reset loader 0's
    counts. Reference: hits and cross-entropy counted by hand in float64."""
    from simclr_lightning.evaluation.eval_figures import StageFigures

    gen = torch.Generator().manual_seed(0)
    logits = [torch.randn(n, CLASSES, generator=gen) for n in (5, 7)]
    labels = [torch.randint(0, CLASSES, (n,), generator=gen) for n in (5, 7)]
    figures = StageFigures("val", CLASSES)
    figures.update(0, logits[0][:3], labels[0][:3])  # loader 0 in two steps, around loader 1's
    figures.update(1, logits[1], labels[1])
    figures.update(0, logits[0][3:], labels[0][3:])
    got = figures.results()
    for i in (0, 1):
        x, y = logits[i].double(), labels[i]
        top1 = (x.argmax(1) == y).double().mean().item()
        loss = (torch.logsumexp(x, 1) - x[torch.arange(len(y)), y]).mean().item()
        assert got[f"val/top1/dataloader_idx_{i}"] == pytest.approx(top1, abs=1e-6)
        assert got[f"val/loss/dataloader_idx_{i}"] == pytest.approx(loss, abs=1e-5)
