"""A checkpoint taken in the middle of an epoch, resumed with another global batch (another
``data.batch_size``, or another number of processes at the same per-process batch, as a
SLURM requeue on fewer nodes gives): the epoch goes on after exactly the images trained on.
Before, the loader skipped the checkpoint's count of batches in this run's size, so a larger
batch left images of the epoch out and a smaller one trained on some twice."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import simclr_lightning.data.sampler as sampler_module
from simclr_lightning import (
    ImageFolderDataModule,
    OnlineLinearProbe,
    SimCLR,
    SimCLRAugmentation,
)
from simclr_lightning.data.loaders import TrainOrder
from tests.helpers import quiet_trainer, write_png_folder
from tests.reference import cosine_schedule_reference

pytestmark = pytest.mark.usefixtures("one_thread")

N, SEED = 48, 11


def rank_orders(world: int, batch: int, drop_last: bool, state: dict | None = None):
    """Each rank's training loader as built under a ``world``-process Trainer (with
    ``state``, a checkpoint's ``train_order``, loaded first), and each rank's TrainOrder."""
    loaders, orders = [], []
    for rank in range(world):
        order = TrainOrder()
        order.load_state_dict(state or {"seed": SEED, "epoch": 0, "batches": 0})
        trainer = SimpleNamespace(world_size=world, global_rank=rank)
        loader = order.loader(list(range(N)), trainer, batch, seeded=False, drop_last=drop_last)
        loader.sampler.set_epoch(1)  # as Lightning does before the epoch
        loaders.append(loader)
        orders.append(order)
    return loaders, orders


def indices(loader) -> list[list[int]]:
    return [[index for index, _ in batch] for batch in loader.batch_sampler]


@pytest.mark.parametrize(
    "world, batch, new_world, new_batch, drop_last",
    [
        (2, 4, 4, 4, False),  # requeued on more nodes: twice the global batch
        (4, 4, 2, 4, False),  # on fewer nodes: half
        (2, 4, 2, 6, False),  # another data.batch_size
        (2, 6, 3, 2, True),  # both, drop_last (pretraining's)
        (2, 4, 3, 8, True),
    ],
)
def test_the_resumed_epoch_goes_on_after_exactly_the_images_trained_on(
    world, batch, new_world, new_batch, drop_last
):
    """Brute force: the first 3 batches of every rank of the saving run, against every rank's
    batches of the resumed one. Every image of the epoch once: none twice; none left out
    but those a drop_last loader leaves in an incomplete last batch of each rank."""
    done = 3
    old, _ = rank_orders(world, batch, drop_last)
    trained = [i for loader in old for b in indices(loader)[:done] for i in b]
    state = {"seed": SEED, "epoch": 1, "batches": done, "images": done * world * batch}
    new, orders = rank_orders(new_world, new_batch, drop_last, state)
    batches = [indices(loader) for loader in new]  # once: the skip is for one pass
    rest = [i for rank in batches for b in rank for i in b]
    assert len(set(trained)) == len(trained) and len(set(rest)) == len(rest)
    assert not set(trained) & set(rest)
    left_out = set(range(N)) - set(trained) - set(rest)
    assert len(left_out) < (new_world * new_batch if drop_last else 1)
    # Lightning's count of the epoch's batches goes on from this run's batches of them
    full_epoch = len(indices(rank_orders(new_world, new_batch, drop_last)[0][0]))
    for rank, order in zip(batches, orders, strict=True):
        assert order.loop_at == (1, done, full_epoch - len(rank))


def test_an_unchanged_global_batch_is_left_to_the_old_rule_and_older_checkpoints_too():
    state = {"seed": SEED, "epoch": 1, "batches": 3, "images": 3 * 8}
    same, orders = rank_orders(4, 2, False, state)  # 4 x 2 = 2 x 4: the same global batch
    old, _ = rank_orders(2, 4, False)
    trained = {i for loader in old for b in indices(loader)[:3] for i in b}
    rest = {i for loader in same for b in indices(loader) for i in b}
    assert trained | rest == set(range(N)) and not trained & rest
    assert all(order.loop_at is None for order in orders)
    older = {"seed": SEED, "epoch": 1, "batches": 3}  # no images: its own batches
    loaders, orders = rank_orders(1, 4, False, older)
    assert [len(b) for b in indices(loaders[0])] == [4] * (N // 4 - 3)
    assert orders[0].loop_at is None


def record_reads(monkeypatch) -> list[int]:
    """The dataset indices the training loader reads, in order (read in this process: no
    workers), from now on."""
    read: list[int] = []
    getitem = sampler_module.SeededSamples.__getitem__

    def recording(self, key):
        read.append(key[0])
        return getitem(self, key)

    monkeypatch.setattr(sampler_module.SeededSamples, "__getitem__", recording)
    return read


class Steps(Callback):
    """(batch_idx, learning rate, the online probe's rate) of every training step."""

    def __init__(self, probe: OnlineLinearProbe) -> None:
        self.probe = probe
        self.rows: list[tuple[int, float, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rows.append((batch_idx, trainer.optimizers[0].param_groups[0]["lr"], 0.0))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # the probe sets its rate just before its step, in its own on_train_batch_end
        self.rows[-1] = (*self.rows[-1][:2], self.probe.optimizer.param_groups[0]["lr"])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume-batch-images")
    write_png_folder(root, 20, 8)
    return root


@pytest.mark.parametrize("new_batch", [2, 8])
def test_a_fit_resumed_mid_epoch_with_another_batch_size(folder, tmp_path, monkeypatch, new_batch):
    """20 images: batches of 4 (5 steps an epoch), saved after 1 batch of epoch 1, resumed
    at batch 2 (10 an epoch) or 8 (2, drop_last). The images read after the resume are the
    16 the epoch had left; the steps count on from this run's batches of the 4 trained on,
    at the rates of this run's schedules at that point: the paper's rule (warm-up 0) and
    the online probe's cosine."""
    read = record_reads(monkeypatch)

    def fit(batch: int, ckpt_path=None, **trainer_kwargs):
        data = ImageFolderDataModule(
            str(folder), SimCLRAugmentation(image_size=8), batch_size=batch, num_workers=0
        )
        model = SimCLR(
            cifar_stem=False, warmup_epochs=0, base_lr=0.3, head_hidden_dim=8, head_output_dim=8
        )
        probe = OnlineLinearProbe(num_classes=2, optimizer="sgd", lr=0.5, schedule="cosine")
        steps = Steps(probe)
        more = trainer_kwargs.pop("cb", [])
        trainer = quiet_trainer(
            max_epochs=2, limit_val_batches=0, callbacks=[probe, steps, *more], **trainer_kwargs
        )
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
        return steps.rows

    save = ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=6, save_top_k=1)
    fit(4, cb=[save], enable_checkpointing=True)
    epoch_1 = read[20:]
    read.clear()
    rows = fit(new_batch, tmp_path / "step=6.ckpt")

    assert read == epoch_1[4:]  # the rest of epoch 1, in its order
    per_epoch = 20 // new_batch
    done = 4 // new_batch  # this run's batches of the 4 images trained on
    assert [i for i, _, _ in rows] == list(range(done, per_epoch))
    points = [per_epoch + b for b in range(done, per_epoch)]  # of 2 * per_epoch steps
    peak = 0.3 * new_batch / 256
    want = [peak * cosine_schedule_reference(s, 0, 2 * per_epoch, 0.0) for s in points]
    assert [lr for _, lr, _ in rows] == pytest.approx(want)
    probe_want = [0.5 * cosine_schedule_reference(s, 0, 2 * per_epoch, 0.0) for s in points]
    assert [lr for _, _, lr in rows] == pytest.approx(probe_want)


def test_a_second_stop_in_the_resumed_epoch_counts_its_images(tmp_path, monkeypatch):
    """40 images (no drop_last): batch 8 stops after 1 batch (8 images); resumed at batch 6,
    which counts those 8 as 2 of its batches, it stops after 2 more (20 images). Its
    checkpoint said 3 x 6 = 18 images: the second resume trained 2 images twice. Every image
    of the epoch once, whatever the stops."""
    from collections import Counter

    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.helpers import write_png_folder

    write_png_folder(tmp_path / "images", 40, 8)
    read = record_reads(monkeypatch)
    trained: list[int] = []

    def fit(batch: int, max_steps: int, ckpt_path=None) -> None:
        read.clear()
        data = ImageFolderDataModule(
            str(tmp_path / "images"), SimCLRAugmentation(image_size=8), batch_size=batch,
            num_workers=0, drop_last=False,
        )  # fmt: skip
        model = SimCLR(cifar_stem=False, warmup_epochs=0, head_hidden_dim=8, head_output_dim=8)
        saves = ModelCheckpoint(tmp_path / "ckpts", save_last=True, save_top_k=0)
        sizes: list[int] = []

        class Sizes(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                sizes.append(len(batch[0][0]))

        trainer = quiet_trainer(
            max_epochs=1, max_steps=max_steps, limit_val_batches=0, enable_checkpointing=True,
            callbacks=[saves, Sizes()],
        )  # fmt: skip
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
        trained.extend(read[: sum(sizes)])  # (the loader reads a batch ahead)

    last = tmp_path / "ckpts" / "last.ckpt"
    fit(8, 1)
    fit(6, 3, last)  # steps 2 and 3: 12 more images
    fit(6, -1, last)
    counts = Counter(trained)
    assert sorted(counts) == list(range(40)) and set(counts.values()) == {1}


def test_a_resume_under_an_integer_batch_limit_carries_the_schedule(folder, tmp_path):
    """trainer.limit_train_batches=4 makes every epoch 4 steps at any batch size: the schedule
    kept the checkpoint's step (5: epoch 1 after a batch of 4 images) while the loader went
    on after this run's 2 batches of those images, so the cosine never reached its end (at
    one process from two, 84% of the way). Reference: the paper's rule from step 4 + 2."""

    class Rates(Callback):
        def __init__(self) -> None:
            self.rows: list[tuple[int, float]] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.rows.append((batch_idx, trainer.optimizers[0].param_groups[0]["lr"]))

    def fit(batch: int, ckpt_path=None, **trainer_kwargs):
        data = ImageFolderDataModule(
            str(folder), SimCLRAugmentation(image_size=8), batch_size=batch, num_workers=0
        )
        model = SimCLR(
            cifar_stem=False, warmup_epochs=0, base_lr=0.3, head_hidden_dim=8, head_output_dim=8
        )
        rates = Rates()
        trainer = quiet_trainer(
            max_epochs=2,
            limit_train_batches=4,
            limit_val_batches=0,
            callbacks=[rates, *trainer_kwargs.pop("cb", [])],
            **trainer_kwargs,
        )
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
        return rates.rows, trainer

    save = ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=5, save_top_k=1)
    fit(4, cb=[save], enable_checkpointing=True)
    rows, trainer = fit(2, tmp_path / "step=5.ckpt")
    assert [i for i, _ in rows] == [2, 3]  # this run's batches 2 and 3 of epoch 1's 4
    peak = 0.3 * 2 / 256
    want = [peak * cosine_schedule_reference(s, 0, 8, 0.0) for s in (6, 7)]
    assert [lr for _, lr in rows] == pytest.approx(want)
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 8  # the cosine's end


def test_a_smaller_batch_past_the_integer_limit_is_refused_before_any_step(folder, tmp_path):
    """limit_train_batches=4: batches of 4 stop after 3 of epoch 1 (12 images); at batch 2
    this run's epoch holds 8 images, fewer than those trained on. Lightning then ran epoch 1
    again (4 more steps at its count), and the schedule reached 0 before the run's end."""
    from simclr_lightning.errors import SettingError

    def fit(batch: int, ckpt_path=None, **trainer_kwargs):
        data = ImageFolderDataModule(
            str(folder), SimCLRAugmentation(image_size=8), batch_size=batch, num_workers=0
        )
        model = SimCLR(cifar_stem=False, warmup_epochs=0, head_hidden_dim=8, head_output_dim=8)
        trainer = quiet_trainer(
            max_epochs=3, limit_train_batches=4, limit_val_batches=0, **trainer_kwargs
        )
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
        return trainer

    save = ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=7, save_top_k=1)
    fit(4, callbacks=[save], enable_checkpointing=True)
    with pytest.raises(SettingError, match=(
        r"^trainer.limit_train_batches=4 ends epoch 1 of this run \(global batch 2\) within the "
        r"12 images the checkpoint trained in it \(6 of its batches\): resume with the "
        r"checkpoint's global batch or without an integer limit_train_batches$"
    )):  # fmt: skip
        fit(2, tmp_path / "step=7.ckpt")
    assert fit(8, tmp_path / "step=7.ckpt").global_step == 7 + 1 + 2  # epoch 1's last 8, then 2
