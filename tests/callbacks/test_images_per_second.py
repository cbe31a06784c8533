"""ImagesPerSecond: images over training time, validation left out, in the progress bar."""

from __future__ import annotations

import lightning as L
import pytest
import torch

import simclr_lightning.callbacks.images_per_second as ips
from simclr_lightning import ImagesPerSecond
from simclr_lightning.callbacks.images_per_second import batch_images
from tests.helpers import FeatureData, FeatureModule, quiet_trainer

STEP_S, VALIDATION_S, BATCH = 0.25, 100.0, 8


class Clock:
    """A test-driven clock: training steps take STEP_S each, a validation run VALIDATION_S."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_rate_is_images_over_training_time(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(ips.time, "perf_counter", clock)

    class Advance(L.Callback):  # runs before ImagesPerSecond (list order)
        def on_train_batch_end(self, *args):
            clock.now += STEP_S

        def on_validation_end(self, *args):
            clock.now += VALIDATION_S

    class Seen(L.Callback):
        values: list = []

        def on_train_batch_end(self, trainer, *args):
            if "images/s" in trainer.progress_bar_metrics:
                self.values.append(trainer.progress_bar_metrics["images/s"])

    meter = ImagesPerSecond(window=4, log_every_n_steps=2)
    reads = []
    now = meter._now
    meter._now = lambda module: reads.append(1) or now(module)
    data = FeatureData(
        (torch.randn(96, 4), torch.zeros(96, dtype=torch.long)),
        (torch.randn(16, 4), torch.zeros(16, dtype=torch.long)),
        batch_size=BATCH,
    )
    trainer = quiet_trainer(
        max_epochs=1,
        val_check_interval=6,
        num_sanity_val_steps=0,
        callbacks=[Advance(), meter, Seen()],
    )
    trainer.fit(FeatureModule(4), datamodule=data)
    # 12 steps with a 100 s validation after step 6: still 8 images per 0.25 s.
    assert meter.value == pytest.approx(BATCH / STEP_S)
    assert Seen.values and all(v == pytest.approx(BATCH / STEP_S) for v in Seen.values)
    assert float(trainer.logged_metrics["train/images_per_sec"]) == pytest.approx(32.0)
    # The clock (on a GPU: a host sync) is read at the epoch's start, every 2nd of the 12
    # steps and around the two validation runs (steps 6 and 12): 1 + 6 + 4 times, not 12+.
    assert len(reads) == 11


def test_batch_images_counts_images_not_views():
    views = (torch.zeros(5, 3, 2, 2), torch.zeros(5, 3, 2, 2))
    assert batch_images((views, torch.zeros(5))) == 5
    assert batch_images(torch.zeros(7, 3)) == 7


def test_rates_are_logged_as_host_tensors_of_the_same_values(monkeypatch):
    """A float would become a tensor on the module's device: on a GPU a blocking copy from the
    host at every logging step. A host tensor stays on the host (Lightning keeps a logged
    value's state on the value's device) and holds what the float did (float32)."""
    clock = Clock()
    monkeypatch.setattr(ips.time, "perf_counter", clock)

    class Advance(L.Callback):
        def on_train_batch_end(self, *args):
            clock.now += STEP_S

    module = FeatureModule(4)
    logged: dict[str, list] = {"train/images_per_sec": [], "images/s": []}
    log = module.log

    def spy(name, value, **kwargs):
        if name in logged:
            logged[name].append(value)
        return log(name, value, **kwargs)

    module.log = spy
    meter = ImagesPerSecond(window=2, log_every_n_steps=1)
    data = FeatureData(
        (torch.randn(48, 4), torch.zeros(48, dtype=torch.long)),
        (torch.randn(8, 4), torch.zeros(8, dtype=torch.long)),
        batch_size=BATCH,
    )
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[Advance(), meter])
    trainer.fit(module, datamodule=data)
    values = [v for name in logged for v in logged[name]]
    assert len(logged["images/s"]) == len(logged["train/images_per_sec"]) == 5  # steps 2-6
    for value in values:
        assert isinstance(value, torch.Tensor), value
        assert value.device.type == "cpu" and value.dtype == torch.float32
        assert float(value) == BATCH / STEP_S  # 32.0: exact in float32, and at 1 decimal
    assert trainer.logged_metrics["train/images_per_sec"].device.type == "cpu"
