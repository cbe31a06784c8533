"""The online probe learns, leaves pretraining untouched, and survives a checkpoint."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from simclr_lightning.callbacks import OnlineLinearProbe
from simclr_lightning.errors import SettingError
from simclr_lightning.module import SimCLR
from tests.helpers import EpochMetrics, FeatureData, FeatureModule, quiet_trainer
from tests.reference import cosine_schedule_reference

pytestmark = pytest.mark.usefixtures("one_thread")


def separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four Gaussian clusters far apart relative to their spread: linearly separable."""
    gen = torch.Generator().manual_seed(seed)
    centers = 6 * torch.eye(4, 16)
    y = torch.randint(0, 4, (n,), generator=gen)
    return centers[y] + 0.5 * torch.randn(n, 16, generator=gen), y


def test_probe_learns_linearly_separable_features():
    train_x, train_y = separable(256, seed=0)
    val_x, val_y = separable(96, seed=1)
    train_y[::7] = -1  # unlabeled rows are skipped, not a crash
    val_y[::11] = -1
    probe = OnlineLinearProbe(num_classes=4, lr=0.05)
    metrics = EpochMetrics()
    trainer = quiet_trainer(max_epochs=3, callbacks=[probe, metrics])
    data = FeatureData((train_x, train_y), (val_x, val_y), batch_size=32)
    trainer.fit(FeatureModule(16), datamodule=data)

    last = metrics.epochs[-1]
    assert last["probe/val_top1"] > 0.95
    assert last["probe/val_top5"] == 1.0  # top-k is capped at the 4 classes
    assert last["probe/train_top1"] > 0.9 and last["probe/train_loss"] < 0.5
    # The logged accuracy is the probe's accuracy on the labelled validation rows.
    labelled = val_y >= 0
    with torch.no_grad():
        predicted = probe.classifier(val_x[labelled]).argmax(1)
    want = (predicted == val_y[labelled]).float().mean().item()
    assert abs(last["probe/val_top1"] - want) < 1e-6
    assert probe.steps == 3 * 8


def pair_batches(n: int = 16) -> list:
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(n, 3, 16, 16, generator=gen), torch.randn(n, 3, 16, 16, generator=gen)
    y = torch.randint(0, 3, (n,), generator=gen)
    y[0] = -1
    return [((a[i], b[i]), y[i]) for i in range(n)]


class Record(L.Callback):
    """Everything the probe must not change: gradients, parameters, optimizer state."""

    def __init__(self) -> None:
        self.grads: list[dict] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters()})

    def on_train_end(self, trainer, pl_module):
        self.params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        self.optimizer = trainer.optimizers[0].state_dict()


def pretrain(probe: OnlineLinearProbe | None) -> Record:
    L.seed_everything(0, verbose=False)
    model = SimCLR(
        cifar_stem=True,
        head_hidden_dim=32,
        head_output_dim=8,
        optimizer="lars",
        base_lr=0.5,
        warmup_epochs=0,
    )
    record = Record()
    callbacks = [record] + ([probe] if probe else [])
    trainer = quiet_trainer(max_steps=3, callbacks=callbacks, deterministic=True)
    # shuffle=True: the probe must not consume the random stream either.
    trainer.fit(model, DataLoader(pair_batches(), batch_size=5, shuffle=True, drop_last=True))
    return record


def assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


def test_probe_does_not_touch_the_encoder_or_its_optimizer():
    probe = OnlineLinearProbe(num_classes=3, lr=0.1)
    with_probe, without = pretrain(probe), pretrain(None)
    assert probe.steps == 3 and probe.optimizer.state  # the probe did train
    assert len(with_probe.grads) == 3
    assert_same(with_probe.grads, without.grads)
    assert_same(with_probe.params, without.params)
    assert_same(with_probe.optimizer, without.optimizer)


def test_probe_state_is_saved_and_restored(tmp_path):
    train, val = separable(64, seed=2), separable(16, seed=3)
    data = FeatureData(train, val, batch_size=16)
    probe = OnlineLinearProbe(num_classes=4, optimizer="sgd", lr=0.1, schedule="cosine")
    trainer = quiet_trainer(max_epochs=1, callbacks=[probe])
    trainer.fit(FeatureModule(16), datamodule=data)
    ckpt = tmp_path / "probe.ckpt"
    trainer.save_checkpoint(ckpt)
    assert probe.optimizer.param_groups[0]["lr"] < 0.1  # the cosine schedule moved

    restored = OnlineLinearProbe(num_classes=4, optimizer="sgd", lr=0.1, schedule="cosine")
    trainer = quiet_trainer(max_epochs=1, callbacks=[restored])  # already done: restore only
    trainer.fit(FeatureModule(16), datamodule=data, ckpt_path=ckpt)
    assert restored.steps == probe.steps == 4
    assert_same(restored.classifier.state_dict(), probe.classifier.state_dict())
    assert_same(restored.optimizer.state_dict(), probe.optimizer.state_dict())
    # and training resumes from it
    trainer = quiet_trainer(max_epochs=2, callbacks=[restored])
    trainer.fit(FeatureModule(16), datamodule=data, ckpt_path=ckpt)
    assert restored.steps == 8


@pytest.mark.parametrize(("before", "after"), [("adam", "sgd"), ("sgd", "adam")])
def test_a_resume_with_another_probe_optimizer_starts_it_afresh(tmp_path, before, after):
    """Another optimizer's state was loaded into the probe's, whose next step then failed
    (``KeyError: 'momentum'`` in SGD's step): now its state starts afresh, said."""
    train, val = separable(64, seed=2), separable(16, seed=3)
    data = FeatureData(train, val, batch_size=16)
    probe = OnlineLinearProbe(num_classes=4, optimizer=before, lr=0.1)
    trainer = quiet_trainer(max_epochs=1, callbacks=[probe])
    trainer.fit(FeatureModule(16), datamodule=data)
    trainer.save_checkpoint(tmp_path / "probe.ckpt")
    changed = OnlineLinearProbe(num_classes=4, optimizer=after, lr=0.1)
    trainer = quiet_trainer(max_epochs=2, callbacks=[changed])
    said = rf"probe optimizer is '{before}', not optimizer='{after}': it starts afresh"
    with pytest.warns(UserWarning, match=said):
        trainer.fit(FeatureModule(16), datamodule=data, ckpt_path=tmp_path / "probe.ckpt")
    assert changed.steps == 8 and changed.optimizer.state  # it trained on, with its own state


def test_probe_without_any_label_stays_at_zero_and_logs_nothing():
    x, _ = separable(32, seed=4)
    unlabeled = torch.full((32,), -1)
    probe = OnlineLinearProbe(num_classes=4)
    trainer = quiet_trainer(max_epochs=1, callbacks=[probe])
    trainer.fit(
        FeatureModule(16),
        DataLoader(TensorDataset(x, unlabeled), batch_size=8),
        DataLoader(TensorDataset(x, unlabeled), batch_size=8),
    )
    assert probe.steps == 4  # the schedule follows the training batches
    assert not probe.classifier.weight.any() and not probe.classifier.bias.any()
    for name in ("probe/val_top1", "probe/train_loss", "probe/train_top1"):
        assert name not in trainer.callback_metrics


def test_probe_steps_equal_a_plain_loop_over_labelled_rows():
    """Against a loop written out here (float64): each batch's loss is the cross entropy
    summed over its labelled rows over their count; a batch with none takes a zero-gradient
    step; the logged epoch figures are totals over labelled rows."""
    x, y = separable(48, seed=5)
    y[0] = -1
    y[8:24] = -1  # batches 1 and 2 of 8 rows hold no label at all
    probe = OnlineLinearProbe(num_classes=4, optimizer="sgd", lr=0.2, weight_decay=1e-2)
    trainer = quiet_trainer(max_epochs=1, callbacks=[probe])
    trainer.fit(FeatureModule(16), DataLoader(TensorDataset(x, y), batch_size=8))

    weight = torch.zeros(4, 16, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    sgd = torch.optim.SGD([weight, bias], lr=0.2, momentum=0.9, weight_decay=1e-2)
    loss_total, correct_total, rows_total = 0.0, 0, 0
    for start in range(0, 48, 8):
        xb, yb = x[start : start + 8].double(), y[start : start + 8]
        sgd.zero_grad()
        loss, correct = torch.zeros((), dtype=torch.float64), 0
        for row, label in zip(xb, yb.tolist(), strict=True):
            if label < 0:
                continue
            logit = row @ weight.T + bias
            loss = loss + torch.logsumexp(logit, 0) - logit[label]
            correct += int(logit.argmax()) == label
        rows = int((yb >= 0).sum())
        loss_total += loss.item()
        correct_total += correct
        rows_total += rows
        if rows:
            (loss / rows).backward()
        else:  # a zero-gradient step: momentum and weight decay still act
            weight.grad, bias.grad = torch.zeros_like(weight), torch.zeros_like(bias)
        sgd.step()

    assert probe.steps == 6
    torch.testing.assert_close(probe.classifier.weight.double(), weight.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(probe.classifier.bias.double(), bias.detach(), atol=1e-5, rtol=0)
    logged = trainer.callback_metrics
    assert float(logged["probe/train_loss"]) == pytest.approx(loss_total / rows_total, rel=1e-5)
    assert float(logged["probe/train_top1"]) == pytest.approx(correct_total / rows_total, abs=1e-6)


class CountedData(FeatureData):
    num_classes = 4  # what SimCLRDataModule subclasses expose


def test_probe_reads_num_classes_from_the_data_module():
    train, val = separable(128, seed=0), separable(64, seed=1)
    runs = []
    for probe, data in (
        (OnlineLinearProbe(num_classes=4, lr=0.05), FeatureData(train, val, batch_size=32)),
        (OnlineLinearProbe(lr=0.05), CountedData(train, val, batch_size=32)),
    ):
        torch.manual_seed(0)
        quiet_trainer(max_epochs=1, callbacks=[probe]).fit(FeatureModule(16), datamodule=data)
        runs.append(probe)
    assert runs[1].num_classes == 4 and runs[1].classifier.out_features == 4
    for name, weight in runs[0].classifier.state_dict().items():
        torch.testing.assert_close(runs[1].classifier.state_dict()[name], weight)


def test_probe_without_num_classes_anywhere_says_what_to_set():
    data = FeatureData(separable(64, 0), separable(32, 1))
    with pytest.raises(ValueError, match="num_classes is not set.*--trainer.callbacks.num_classes"):
        quiet_trainer(max_epochs=1, callbacks=[OnlineLinearProbe()]).fit(
            FeatureModule(16), datamodule=data
        )


class OneClassData(FeatureData):
    num_classes = 1  # an image folder with one class folder


def test_probe_on_data_of_one_class_does_not_advise_setting_num_classes():
    """It said the data module "does not say how many classes" and to set num_classes: it
    says 1, and no setting makes a classifier of one class."""
    data = OneClassData(separable(64, 0), separable(32, 1))
    said = r"at least 2 classes, and the data module \(OneClassData\) has 1"
    with pytest.raises(ValueError, match=said):
        quiet_trainer(max_epochs=1, callbacks=[OnlineLinearProbe()]).fit(
            FeatureModule(16), datamodule=data
        )


def test_probe_num_classes_other_than_the_data_modules_is_refused_at_setup():
    """num_classes=3 for 4 classes failed at the first batch: IndexError "Target 3 is out of
    bounds" (or torchmetrics' RuntimeError), naming no setting."""
    data = CountedData(separable(64, 0), separable(32, 1))
    trainer = quiet_trainer(max_epochs=1, callbacks=[OnlineLinearProbe(num_classes=3)])
    said = r"^OnlineLinearProbe.num_classes=3 is invalid: must be at least 4, the classes of "
    with pytest.raises(SettingError, match=said + r"the data module \(CountedData\), or null"):
        trainer.fit(FeatureModule(16), datamodule=data)
    assert trainer.global_step == 0


@pytest.mark.parametrize("validation", [True, False])
def test_labels_past_num_classes_are_refused_naming_the_setting(validation):
    """Labels 0-3, num_classes=3, a data module that does not count them. With validation,
    its sanity check refuses them before any training; without, the first epoch's end (a
    training step reads nothing back on the host, so the rows are set aside there)."""
    data = FeatureData(separable(64, 0), separable(32, 1), batch_size=16)
    probe = OnlineLinearProbe(num_classes=3)
    trainer = quiet_trainer(
        max_epochs=2, callbacks=[probe], limit_val_batches=1.0 if validation else 0
    )
    said = r"^OnlineLinearProbe.num_classes=3 is invalid: must be above the largest label, 3 \("
    with pytest.raises(SettingError, match=said):
        trainer.fit(FeatureModule(16), datamodule=data)
    assert trainer.global_step == (0 if validation else 4)
    assert probe.classifier.weight.isfinite().all()


def test_labels_past_the_data_modules_class_count_blame_the_data_module():
    """num_classes read from the data module: no setting of the probe would mend it."""
    (x, y), val = separable(64, 0), separable(32, 1)
    data = CountedData((x, torch.where(y == 3, 4, y)), val, batch_size=16)
    trainer = quiet_trainer(max_epochs=1, callbacks=[OnlineLinearProbe()], limit_val_batches=0)
    said = r"^OnlineLinearProbe: the data module says num_classes=4, but its labels go up to 4: "
    with pytest.raises(SettingError, match=said + "correct the data module's num_classes$"):
        trainer.fit(FeatureModule(16), datamodule=data)


def test_probe_validation_matches_brute_force_top_k():
    """10 classes of overlapping clusters, some rows unlabelled: top-1 and top-5 over the
    labelled rows, counted here by hand."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (200,), generator=gen)
    x = torch.eye(10, 12)[y] + 0.7 * torch.randn(200, 12, generator=gen)
    val_y = y[100:].clone()
    val_y[::6] = -1
    probe = OnlineLinearProbe(num_classes=10, lr=0.05)
    metrics = EpochMetrics()
    trainer = quiet_trainer(max_epochs=2, callbacks=[probe, metrics])
    data = FeatureData((x[:100], y[:100]), (x[100:], val_y), batch_size=16)
    trainer.fit(FeatureModule(12), datamodule=data)
    labelled = val_y >= 0
    with torch.no_grad():
        ranked = probe.classifier(x[100:][labelled]).argsort(dim=1, descending=True)
    truth = val_y[labelled][:, None]
    top1 = (ranked[:, :1] == truth).any(1).double().mean().item()
    top5 = (ranked[:, :5] == truth).any(1).double().mean().item()
    assert 0 < top1 < top5 < 1
    last = metrics.epochs[-1]
    assert last["probe/val_top1"] == pytest.approx(top1, abs=1e-6)
    assert last["probe/val_top5"] == pytest.approx(top5, abs=1e-6)


class SameBatches(FeatureData):
    """Every batch the same rows: a mid-epoch resume sees what the uninterrupted run saw,
    though a plain loader restarts its epoch."""

    def train_dataloader(self):
        x, y = self.train
        rows = TensorDataset(x.repeat(4, 1), y.repeat(4))
        return DataLoader(rows, batch_size=len(x), shuffle=False)


def test_a_mid_epoch_resume_reports_the_whole_epochs_training_figures(tmp_path):
    data = SameBatches(separable(16, seed=4), separable(16, seed=5), batch_size=16)

    def fit(ckpt_path=None) -> dict:
        probe = OnlineLinearProbe(num_classes=4, optimizer="sgd", lr=0.1)
        every = ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=2, save_top_k=-1)
        trainer = quiet_trainer(
            max_epochs=1, callbacks=[probe, every], enable_checkpointing=True, limit_val_batches=0
        )
        trainer.fit(FeatureModule(16), datamodule=data, ckpt_path=ckpt_path)
        return {k: float(v) for k, v in trainer.callback_metrics.items() if "probe" in k}

    full = fit()
    resumed = fit(tmp_path / "step=2.ckpt")
    assert set(full) == {"probe/train_loss", "probe/train_top1"}
    assert resumed == pytest.approx(full, rel=1e-6)


def test_a_second_fit_with_the_same_probe_reports_only_its_own_epoch():
    """Each fit starts at epoch 0: the probe must not add the first fit's epoch 0 to the
    second's. Reference: the top-1 of the probe as the second fit found it, on its one batch
    (the probe scores a batch before its step on it)."""
    x, y = separable(16, seed=4)
    data = FeatureData((x, y), separable(16, seed=5), batch_size=16)  # one batch
    probe = OnlineLinearProbe(num_classes=4, optimizer="sgd", lr=0.5)
    top1 = []
    for _ in range(2):
        trainer = quiet_trainer(max_epochs=1, callbacks=[probe], limit_val_batches=0)
        trainer.fit(FeatureModule(16), datamodule=data)
        top1.append(float(trainer.callback_metrics["probe/train_top1"]))
        if len(top1) == 1:
            with torch.no_grad():
                want = (probe.classifier(x).argmax(1) == y).double().mean().item()
    assert top1[0] != pytest.approx(want)  # the two fits' figures differ
    assert top1[1] == pytest.approx(want, abs=1e-6)


class ProbeRates(L.Callback):
    """The probe's learning rate at each of its steps (this callback runs after the probe)."""

    def __init__(self, probe: OnlineLinearProbe) -> None:
        self.probe, self.rates = probe, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rates.append(self.probe.optimizer.param_groups[0]["lr"])


def test_a_second_fit_starts_the_probes_cosine_schedule_again():
    """As the module's own schedule does: a second ``fit`` with the same probe ran its whole
    second run at learning rate 0 (the end of the first run's cosine). Reference: the paper's
    cosine without warmup, in float64, for each fit's 2 epochs of 4 batches."""
    data = FeatureData(separable(32, seed=4), separable(16, seed=5), batch_size=8)
    probe = OnlineLinearProbe(num_classes=4, optimizer="sgd", lr=0.5, schedule="cosine")
    want = [0.5 * cosine_schedule_reference(step, 0, 8, 0.0) for step in range(8)]
    for _ in range(2):
        rates = ProbeRates(probe)
        trainer = quiet_trainer(max_epochs=2, callbacks=[probe, rates], limit_val_batches=0)
        trainer.fit(FeatureModule(16), datamodule=data)
        assert rates.rates == pytest.approx(want, rel=1e-12)


def test_the_probes_cosine_spans_the_runs_batches_under_accumulation():
    """The probe steps at every batch: 2 epochs of 4 batches are 8 probe steps, which the
    optimizer's 2 x ceil(4 / 3) steps times 3 overcounted as 12 (the cosine ended at 7% of
    the rate, not at 0). Reference: the cosine in float64 over 8 steps."""
    data = FeatureData(separable(32, seed=4), separable(16, seed=5), batch_size=8)
    probe = OnlineLinearProbe(num_classes=4, optimizer="sgd", lr=0.5, schedule="cosine")
    rates = ProbeRates(probe)
    trainer = quiet_trainer(
        max_epochs=2, accumulate_grad_batches=3, callbacks=[probe, rates], limit_val_batches=0
    )
    trainer.fit(FeatureModule(16), datamodule=data)
    want = [0.5 * cosine_schedule_reference(step, 0, 8, 0.0) for step in range(8)]
    assert rates.rates == pytest.approx(want, rel=1e-12)


def test_int32_labels_train_and_score_the_probe():
    """A user's dataset may give int32 labels (numpy's default on some platforms): the probe
    trains and scores as with int64. Reference: the same run with int64 labels."""
    (train_x, train_y), (val_x, val_y) = separable(64, seed=6), separable(32, seed=7)
    results = []
    for dtype in (torch.int64, torch.int32):
        probe = OnlineLinearProbe(num_classes=4, optimizer="sgd", lr=0.5)
        metrics = EpochMetrics()
        data = FeatureData((train_x, train_y.to(dtype)), (val_x, val_y.to(dtype)), batch_size=16)
        trainer = quiet_trainer(max_epochs=1, callbacks=[probe, metrics])
        torch.manual_seed(0)  # the same shuffled order
        trainer.fit(FeatureModule(16), datamodule=data)
        results.append((probe.classifier.weight.detach().clone(), metrics.epochs[-1]))
    (w64, m64), (w32, m32) = results
    assert torch.equal(w32, w64) and m32 == m64
    assert m64["probe/val_top1"] > 0.5  # the probe learned something to compare


def test_validate_with_a_probe_that_never_trained_logs_no_probe_figures(tmp_path):
    """``validate --ckpt_path`` of a checkpoint written without the probe: its zero classifier
    scored chance, reported as probe/val_top1 as if measured."""
    train, val = separable(64, seed=2), separable(16, seed=3)
    data = FeatureData(train, val, batch_size=16)
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(FeatureModule(16), datamodule=data)
    ckpt = tmp_path / "no_probe.ckpt"
    trainer.save_checkpoint(ckpt)

    metrics = EpochMetrics()
    trainer = quiet_trainer(callbacks=[OnlineLinearProbe(num_classes=4), metrics])
    with pytest.warns(UserWarning, match="OnlineLinearProbe has not trained"):
        trainer.validate(FeatureModule(16), datamodule=data, ckpt_path=ckpt)
    assert metrics.epochs and not any(k.startswith("probe/") for k in metrics.epochs[0])

    # a checkpoint with a trained probe: validate reports it
    probe = OnlineLinearProbe(num_classes=4, lr=0.05)
    trainer = quiet_trainer(max_epochs=2, callbacks=[probe])
    trainer.fit(FeatureModule(16), datamodule=data)
    trainer.save_checkpoint(ckpt)
    metrics = EpochMetrics()
    trainer = quiet_trainer(callbacks=[OnlineLinearProbe(num_classes=4), metrics])
    trainer.validate(FeatureModule(16), datamodule=data, ckpt_path=ckpt)
    assert metrics.epochs[0]["probe/val_top1"] > 0.9


def test_lightnings_sync_dist_advice_is_not_given_for_the_probes_summed_figures():
    """Under DDP every rank logs the same epoch figures, summed over ranks: Lightning advised
    sync_dist=True for each, at every epoch of every DDP run with the probe. The advice is
    emitted here as Lightning words it, after a fit set the probe up."""
    import warnings

    from lightning.pytorch.utilities.warnings import PossibleUserWarning

    x, y = torch.randn(16, 6), torch.randint(0, 2, (16,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = quiet_trainer(max_epochs=1, callbacks=[OnlineLinearProbe(num_classes=2)])
        trainer.fit(FeatureModule(6), datamodule=FeatureData((x, y), (x, y)))
        for name in ("probe/train_loss", "probe/train_top1", "probe/val_top1"):
            advice = (
                f"It is recommended to use `self.log({name!r}, ..., sync_dist=True)` when "
                f"logging on epoch level in distributed setting to accumulate the metric"
            )
            warnings.warn(advice, PossibleUserWarning, stacklevel=1)
    said = [str(w.message) for w in caught if "It is recommended" in str(w.message)]
    assert len(said) == 1 and "probe/val_top1" in said[0]  # not one the probe sums itself


def test_probe_num_classes_above_the_data_modules_trains():
    """More classes than the data module counts are unused logits, not an error: a data
    module may count more classes than its labels use."""
    data = CountedData(separable(64, 0), separable(32, 1), batch_size=32)
    probe = OnlineLinearProbe(num_classes=6, lr=0.05)
    quiet_trainer(max_epochs=1, callbacks=[probe]).fit(FeatureModule(16), datamodule=data)
    assert probe.classifier.out_features == 6
