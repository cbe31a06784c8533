"""Lightning's tuners with SimCLR: the batch-size finder and the learning-rate finder change
the batch or the rate after ``configure_optimizers`` planned them; the run trains with what
they found, against the paper's rule and a cosine written out here."""

from __future__ import annotations

import math

import lightning as L
import pytest
from lightning.pytorch.callbacks import BatchSizeFinder, LearningRateFinder
from lightning.pytorch.tuner import Tuner
from torch.utils.data import DataLoader

from simclr_lightning import SimCLR
from tests.helpers import quiet_trainer
from tests.test_module import pairs

pytestmark = pytest.mark.usefixtures("one_thread")

N = 32


class PairsData(L.LightningDataModule):
    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(pairs(N), batch_size=self.batch_size, shuffle=True, drop_last=True)


class RecordLR(L.Callback):
    """The rate of every step of the run (a tuner's trial steps are overwritten by the run's,
    which starts again at step 0)."""

    def __init__(self) -> None:
        self.lrs: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]


def cosine(step: int, total: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * step / total))


def small_simclr(**kwargs) -> SimCLR:
    defaults = dict(head_hidden_dim=16, head_output_dim=8, optimizer="sgd", warmup_epochs=0)
    return SimCLR(**(defaults | kwargs))


def test_batch_size_finder_trains_with_the_rate_and_schedule_of_the_batch_it_found():
    """The finder ran after configure_optimizers: the run kept the configured batch's peak
    rate and epoch length (a cosine that reached 0 a quarter into the run)."""
    record, data = RecordLR(), PairsData(batch_size=16)
    finder = BatchSizeFinder(mode="power", init_val=4, max_trials=0, steps_per_trial=1)
    trainer = quiet_trainer(max_epochs=2, limit_val_batches=0, callbacks=[finder, record])
    trainer.fit(small_simclr(base_lr=0.4), datamodule=data)
    assert data.batch_size == 4  # what the finder chose: its first try, no more trials
    steps = 2 * N // 4
    peak = 0.4 * 4 / 256  # the paper's rule, for the batch trained with
    assert sorted(record.lrs) == list(range(steps))
    assert [record.lrs[s] for s in range(steps)] == pytest.approx(
        [peak * cosine(s, steps) for s in range(steps)]
    )


def test_learning_rate_finder_sets_the_peak_rate_the_run_trains_with():
    """SimCLR's ``lr`` is the peak rate (``base_lr`` x B/256): what the finder sweeps and
    sets, so its suggestion is the rate trained with, not scaled a second time (and without
    ``attr_name`` the finder found no rate to set at all)."""
    model, data = small_simclr(base_lr=0.4), PairsData(batch_size=8)
    sweep = dict(min_lr=1e-4, max_lr=1.0, early_stop_threshold=None)
    found = Tuner(quiet_trainer(max_epochs=8, limit_val_batches=0)).lr_find(
        model, datamodule=data, num_training=24, **sweep
    )
    suggestion = found.suggestion()
    assert suggestion is not None
    assert model.hparams.base_lr == pytest.approx(suggestion * 256 / 8)
    record = RecordLR()
    quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[record]).fit(model, datamodule=data)
    assert record.lrs[0] == pytest.approx(suggestion)

    # as a callback inside the run: the run goes on from the suggestion, on the cosine
    model, record = small_simclr(base_lr=0.4), RecordLR()
    finder = LearningRateFinder(num_training_steps=24, **sweep)
    trainer = quiet_trainer(max_epochs=8, limit_val_batches=0, callbacks=[finder, record])
    trainer.fit(model, datamodule=data)
    steps = 8 * N // 8
    peak = finder.optimal_lr.suggestion()
    assert peak is not None and model.hparams.base_lr == pytest.approx(peak * 256 / 8)
    assert [record.lrs[s] for s in range(steps)] == pytest.approx(
        [peak * cosine(s, steps) for s in range(steps)]
    )


class ImagesData(PairsData):
    def train_dataloader(self):
        images = [(a, y) for (a, _), y in pairs(N)]
        return DataLoader(images, batch_size=self.batch_size, shuffle=True, drop_last=True)


def test_batch_size_finder_with_linear_eval_and_its_scaling_rule():
    from simclr_lightning.evaluation import LinearEval

    record, data = RecordLR(), ImagesData(batch_size=16)
    model = LinearEval(
        num_classes=3, backbone="timm:test_resnet", cifar_stem=False, lr=0.1, lr_scaling="linear"
    )
    finder = BatchSizeFinder(mode="power", init_val=4, max_trials=0, steps_per_trial=1)
    trainer = quiet_trainer(max_epochs=2, limit_val_batches=0, callbacks=[finder, record])
    trainer.fit(model, datamodule=data)
    assert data.batch_size == 4
    steps = 2 * N // 4
    peak = 0.1 * 4 / 256
    assert [record.lrs[s] for s in range(steps)] == pytest.approx(
        [peak * cosine(s, steps) for s in range(steps)]
    )


def test_learning_rate_finder_on_linear_eval_with_a_scaling_rule_is_refused():
    """The finder writes its suggestion into LinearEval's model.lr, which lr_scaling=linear
    then scaled again: the run trained at B/256 times the suggestion."""
    from simclr_lightning import SettingError
    from simclr_lightning.evaluation import LinearEval

    def model(scaling: str) -> LinearEval:
        return LinearEval(
            num_classes=3, backbone="timm:test_resnet", cifar_stem=False, lr_scaling=scaling
        )

    data = ImagesData(batch_size=8)
    sweep = dict(min_lr=1e-4, max_lr=1.0, num_training=24, early_stop_threshold=None)
    with pytest.raises(SettingError, match=r"model.lr_scaling=linear would scale again"):
        Tuner(quiet_trainer(max_epochs=8, limit_val_batches=0)).lr_find(
            model("linear"), datamodule=data, **sweep
        )
    plain = model("none")
    found = Tuner(quiet_trainer(max_epochs=8, limit_val_batches=0)).lr_find(
        plain, datamodule=data, **sweep
    )
    assert found.suggestion() is not None and plain.hparams.lr == found.suggestion()
