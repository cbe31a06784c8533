"""Per-step checks without host syncs: the lagged reads, the step watch that uses them, and
a training step (with the online probe) that reads nothing back on the host.

The CPU has no asynchronous queue, so a slow GPU is played by markers that stay "not done"
until waited for; the GPU-marked test at the end checks the same on a real device with
CUDA's own sync detector."""

from __future__ import annotations

import math
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader

from simclr_lightning import ImagesPerSecond, SimCLR
from simclr_lightning.callbacks import OnlineLinearProbe
from simclr_lightning.evaluation import LinearEval
from simclr_lightning.lagged_reads import LaggedReads
from simclr_lightning.run_checks import StepWatch
from tests.device_reads import DeviceReads, device_reads_per_step
from tests.helpers import quiet_trainer
from tests.test_checkpoint import save_simclr_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


class SlowMarker:
    """A point in a queue that a GPU has not reached yet: done when waited for, or when the
    test says so."""

    def __init__(self, log: list) -> None:
        self.done = False
        self.log = log

    def synchronize(self) -> None:
        self.log.append("wait")
        self.done = True


def slow_reads(depth: int = 4) -> tuple[LaggedReads, list[SlowMarker], list]:
    markers: list[SlowMarker] = []
    log: list = []

    def marker(device):
        markers.append(SlowMarker(log))
        return markers[-1]

    return LaggedReads(depth, marker=marker), markers, log


def test_reads_lag_exactly_depth_pushes_whatever_the_device_timing():
    """Under DDP every process must reach its verdict at the same step: the lag is a count,
    so a device that happens to be done early changes nothing."""
    reads, markers, log = slow_reads(depth=2)
    reads.push(0, torch.tensor(0.0), torch.tensor(0.0))
    reads.push(1, torch.tensor(1.0), torch.tensor(10.0))
    markers[0].done = markers[1].done = True
    assert list(reads.ready()) == []
    reads.push(2, torch.tensor(2.0), torch.tensor(20.0))
    assert list(reads.ready()) == [(0, [0.0, 0.0])]
    assert log == ["wait"]  # synchronize() on a finished marker returns at once on a GPU
    reads.push(3, torch.tensor(3.0), torch.tensor(30.0))
    assert list(reads.ready()) == [(1, [1.0, 10.0])]
    assert [key for key, _ in reads.drain()] == [2, 3]
    assert log == ["wait"] * 4 and len(reads) == 0


def test_on_the_cpu_values_are_read_at_once():
    reads = LaggedReads(depth=2)
    reads.push("a", torch.tensor(1.5))
    assert list(reads.ready()) == [("a", [1.5])]


def test_watch_reports_a_nan_step_late_and_at_every_flush_after():
    reads, markers, _ = slow_reads(depth=4)
    watch = StepWatch(output_dim=16, reads=reads)
    watch.push(0, torch.tensor(1.0), torch.tensor(0.25), watch_collapse=True)
    watch.push(1, torch.tensor(float("nan")), torch.tensor(0.25), watch_collapse=True)
    watch.push(2, torch.tensor(float("nan")), torch.tensor(0.25), watch_collapse=True)
    with pytest.raises(FloatingPointError, match=r"^train/loss is nan at step 1: lower"):
        watch.flush()
    with pytest.raises(FloatingPointError, match="at step 1"):
        watch.flush()  # sticky: a later checkpoint must not be written either


def test_watch_warns_of_collapse_only_at_watched_steps():
    watch = StepWatch(output_dim=16)  # CPU: read at once
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        watch.push(3, torch.tensor(1.0), torch.tensor(0.001), watch_collapse=False)
        assert not [w for w in record if "z_std" in str(w.message)]
        watch.push(4, torch.tensor(1.0), torch.tensor(0.001), watch_collapse=True)
    [message] = [str(w.message) for w in record if "z_std" in str(w.message)]
    assert message.startswith("train/z_std=0.001 at step 4")


def pairs(n: int, nan_from: int | None = None, batch: int = 4) -> list:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        a, b = torch.randn(3, 16, 16, generator=gen), torch.randn(3, 16, 16, generator=gen)
        if nan_from is not None and i >= nan_from * batch:
            a = torch.full_like(a, float("nan"))
        rows.append(((a, b), i % 3))
    return rows


def small_model() -> SimCLR:
    return SimCLR(
        backbone="timm:test_resnet",
        cifar_stem=False,
        head_hidden_dim=16,
        head_output_dim=8,
        optimizer="sgd",
        base_lr=0.01,
        warmup_epochs=0,
        batch_size=4,
    )


def test_no_checkpoint_holds_the_weights_of_a_nan_step(tmp_path):
    """The device lags (no step is read back before a flush); step 1 is NaN; a checkpoint is
    due after every step. The flush in on_save_checkpoint stops the run before the one after
    step 1 is written; the only checkpoint, after step 0, holds finite weights."""
    torch.manual_seed(0)
    model = small_model()
    model._watch.reads = slow_reads(depth=8)[0]
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
    trainer = quiet_trainer(
        max_steps=4, callbacks=[saver], enable_checkpointing=True, limit_val_batches=0
    )
    with pytest.raises(FloatingPointError, match="train/loss is nan at step 1"):
        trainer.fit(model, DataLoader(pairs(16, nan_from=1), batch_size=4))
    files = sorted(p.name for p in tmp_path.glob("*.ckpt"))
    assert files == ["epoch=0-step=1.ckpt"], files
    state = torch.load(tmp_path / files[0], weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


class HostReads(TorchFunctionMode):
    """Records every call that reads a tensor's value back on the host (on a GPU each of
    these waits for the device)."""

    NAMES = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero"}

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.NAMES:
            self.calls.append(name)
        if name == "__getitem__" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for i in (args[1] if isinstance(args[1], tuple) else (args[1],))
        ):
            self.calls.append("boolean index")
        return func(*args, **(kwargs or {}))


def watched(hook, mode: HostReads):
    def run(*args, **kwargs):
        with mode:
            return hook(*args, **kwargs)

    return run


def test_training_step_and_probe_read_nothing_back_on_the_host():
    torch.manual_seed(0)
    model = small_model()
    model._watch.reads = slow_reads(depth=8)[0]  # a GPU that lags: the watch reads nothing
    # SGD: Adam reads its step count, but that lives on the host even on a GPU.
    probe = OnlineLinearProbe(num_classes=3, optimizer="sgd")
    mode = HostReads()
    model.training_step = watched(model.training_step, mode)
    probe.on_train_batch_end = watched(probe.on_train_batch_end, mode)
    trainer = quiet_trainer(max_steps=3, callbacks=[probe], limit_val_batches=0)
    data = pairs(12)
    data[1] = (data[1][0], -1)  # an unlabelled row for the probe to leave out
    trainer.fit(model, DataLoader(data, batch_size=4))
    assert probe.steps == 3
    assert mode.calls == []
    # The mode does see host reads: the old NaN check was one.
    with mode:
        bool(torch.isfinite(torch.tensor(1.0)))
    assert mode.calls == ["__bool__"]


def test_linear_eval_training_step_reads_nothing_back_on_the_host(tmp_path):
    save_simclr_checkpoint(tmp_path / "s.ckpt", cifar_stem=True, in_channels=3)
    model = LinearEval(str(tmp_path / "s.ckpt"), num_classes=3, optimizer="sgd", lr=0.1)
    model._reads = slow_reads(depth=8)[0]  # a GPU that lags: the bar's loss reads nothing yet
    mode = HostReads()
    model.training_step = watched(model.training_step, mode)
    gen = torch.Generator().manual_seed(0)
    rows = [(torch.randn(3, 16, 16, generator=gen), i % 3 if i % 4 else -1) for i in range(12)]
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0)
    trainer.fit(model, DataLoader(rows, batch_size=4))
    assert trainer.global_step == 3
    assert mode.calls == []


class StepLosses(L.Callback):
    """Each step's loss, kept on the device (reading it here would be a read per step)."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach().clone())


def test_a_fit_reads_no_device_value_back_per_step_and_the_bar_shows_the_read_loss():
    """Lightning reads every progress-bar value on the host after every batch (whatever
    log_every_n_steps, even with the bar off): a device loss there made the host wait for
    the GPU at every step. The bar shows the loss the NaN watch has read, two steps late."""
    fits: dict[int, tuple[L.Trainer, list[torch.Tensor]]] = {}

    def fit(steps: int, callbacks: list[L.Callback]) -> None:
        torch.manual_seed(0)
        model = small_model()
        model._watch.reads = LaggedReads(2, marker=lambda device: SlowMarker([]))  # a GPU
        record = StepLosses()
        callbacks += [OnlineLinearProbe(num_classes=3), ImagesPerSecond(2, 1), record]
        trainer = quiet_trainer(
            max_steps=steps, callbacks=callbacks, limit_val_batches=0, log_every_n_steps=2
        )
        trainer.fit(model, DataLoader(pairs(4 * steps), batch_size=4))
        fits[steps] = trainer, record.losses

    assert device_reads_per_step(fit) == {}
    trainer, step_losses = fits[8]
    losses = [float(loss) for loss in step_losses]
    assert len(losses) == 8
    bar = trainer.progress_bar_metrics
    assert set(bar) == {"loss", "images/s"}, bar
    assert bar["loss"] == pytest.approx(losses[5], rel=1e-6)  # read at step 7, two late
    assert float(trainer.callback_metrics["train/loss_step"]) == pytest.approx(losses[7])


def test_device_reads_counts_reads_of_device_values_only():
    device = torch.randn(6)
    reads = DeviceReads(device)
    with reads:
        twice = device * 2
        assert torch.tensor(0.5).item() == 0.5  # made on the host: free
        float(twice.sum())
        twice[twice > 0]
    assert sorted(place.split(" at ")[0] for place in reads.counts) == [
        "_local_scalar_dense",
        "index",
    ]


class SyncDetector(L.Callback):
    """CUDA's sync detector from the second step to the epoch's end, the part of a run that
    repeats every step. Before it, Lightning copies each newly logged key's state to the
    device; at the epoch's end, once, the probe and the watch read their figures back."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 1:
            torch.cuda.set_sync_debug_mode("error")

    def on_train_epoch_end(self, trainer, pl_module):
        torch.cuda.set_sync_debug_mode("default")

    def on_exception(self, trainer, pl_module, exception):
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_fit_never_syncs_on_a_gpu_after_its_first_step():
    torch.manual_seed(0)
    model = small_model()
    probe = OnlineLinearProbe(num_classes=3)
    meter = ImagesPerSecond(window=4, log_every_n_steps=2)
    clock = meter._now

    def deliberate_sync(module):  # the meter's clock: a sync every log_every_n_steps, by design
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("default")
        try:
            return clock(module)
        finally:
            torch.cuda.set_sync_debug_mode(mode)

    meter._now = deliberate_sync
    # SyncDetector first: its epoch end (detector off) runs before the probe's
    trainer = quiet_trainer(
        accelerator="gpu",
        devices=1,
        max_steps=5,
        callbacks=[SyncDetector(), probe, meter],
        limit_val_batches=0,
        log_every_n_steps=2,
    )
    trainer.fit(model, DataLoader(pairs(20), batch_size=4))  # 5 steps: one epoch
    assert probe.steps == 5 and meter.value is not None
    assert math.isfinite(trainer.progress_bar_metrics["loss"])
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
