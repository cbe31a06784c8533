"""The collapse watch: ``train/z_std`` against its definition (float64, written out here) and
the threshold a tenth of 1/sqrt(D); a real SimCLR fit that collapses warns once, naming the
value and the step, and a healthy one does not warn. Under real DDP a NaN loss on one
process stops every process at the same step."""

from __future__ import annotations

import math
import re
import warnings
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from simclr_lightning import SimCLR
from simclr_lightning.errors import SettingError
from simclr_lightning.loss import NTXentLoss
from simclr_lightning.run_checks import CollapseWatch, check_equal_batches
from simclr_lightning.supcon import SupConLoss
from tests.ddp_helpers import run_ddp_script_runs
from tests.helpers import quiet_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def z_std_reference(z: np.ndarray) -> float:
    """The mean over dimensions of the (n-1) std of the L2-normalised rows, in float64."""
    z = np.asarray(z, dtype=np.float64)
    unit = z / np.sqrt((z**2).sum(axis=1, keepdims=True))
    n = len(unit)
    mean = unit.sum(axis=0) / n
    return float(np.mean(np.sqrt(((unit - mean) ** 2).sum(axis=0) / (n - 1))))


def threshold(dim: int) -> float:
    return 0.1 / math.sqrt(dim)


def collapse_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if "train/z_std" in str(w.message)]


def test_z_std_is_the_std_of_the_unit_embeddings():
    gen = torch.Generator().manual_seed(0)
    z_a = torch.randn(64, 128, dtype=torch.float64, generator=gen) * 3 + 1
    z_b = torch.randn(64, 128, dtype=torch.float64, generator=gen)
    want = z_std_reference(torch.cat([z_a, z_b]).numpy())
    _, stats = NTXentLoss(0.5, gather_distributed=False).forward_with_stats(z_a, z_b)
    assert float(stats["z_std"]) == pytest.approx(want, rel=1e-12)
    labels = torch.arange(64) % 4
    _, stats = SupConLoss(0.5, gather_distributed=False).forward_with_stats(z_a, z_b, labels)
    assert float(stats["z_std"]) == pytest.approx(want, rel=1e-6)  # SupCon works in float32
    # The healthy value the threshold is a tenth of: isotropic unit vectors in D = 128
    isotropic = torch.randn(4096, 128, dtype=torch.float64, generator=gen).numpy()
    assert z_std_reference(isotropic) == pytest.approx(1 / math.sqrt(128), rel=0.01)


def test_watch_warns_once_below_a_tenth_of_the_healthy_value():
    watch = CollapseWatch(output_dim=16)  # threshold 0.025
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        watch.update(threshold(16) * 1.001, step=3)
        assert collapse_warnings(record) == []
        watch.update(0.0249, step=7)
        watch.update(0.001, step=8)  # still collapsed: no second warning
    [message] = collapse_warnings(record)
    assert message.startswith("train/z_std=0.0249 at step 7 is below a tenth of its healthy 0.25")
    assert "model.temperature" in message


def fit(collapse_from: int | None, steps: int = 4, dim: int = 8) -> tuple[list[str], list[float]]:
    """A real SimCLR fit; from step ``collapse_from`` on the head's output is forced towards a
    constant (1e-4 x its own output plus a fixed vector), as a collapsed head would be. Returns
    the collapse warnings and the reference z_std of each step's embeddings."""
    torch.manual_seed(0)
    model = SimCLR(
        backbone="timm:test_resnet",
        cifar_stem=False,
        head_hidden_dim=16,
        head_output_dim=dim,
        optimizer="sgd",
        base_lr=0.01,
        warmup_epochs=0,
        batch_size=8,
    )
    constant = torch.linspace(1.0, 2.0, dim)
    seen: list[float] = []

    def hook(module, inputs, output):
        if not module.training:
            return None
        if collapse_from is not None and model.global_step >= collapse_from:
            output = constant + 1e-4 * output
        seen.append(z_std_reference(output.detach().numpy()))
        return output

    model.head.register_forward_hook(hook)
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(32, 3, 16, 16, generator=gen), torch.randn(32, 3, 16, 16, generator=gen)
    data = DataLoader([((a[i], b[i]), 0) for i in range(32)], batch_size=8)
    trainer = quiet_trainer(
        max_steps=steps, precision="32-true", log_every_n_steps=1, limit_val_batches=0
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(model, data)
    assert len(seen) == steps
    return collapse_warnings(record), seen


def test_healthy_fit_does_not_warn():
    found, z_std = fit(collapse_from=None)
    assert min(z_std) > threshold(8)  # the independent value: healthy at every step
    assert found == []


def test_collapsed_fit_warns_once_with_value_and_step():
    found, z_std = fit(collapse_from=2)
    assert all(v > threshold(8) for v in z_std[:2])
    assert all(v < threshold(8) for v in z_std[2:])
    assert len(found) == 1, found  # steps 2 and 3 collapsed: one warning
    match = re.match(r"train/z_std=(\S+) at step (\d+) is below a tenth of its healthy", found[0])
    assert match, found[0]
    assert int(match.group(2)) == 2
    assert float(match.group(1)) == pytest.approx(z_std[2], rel=5e-3)  # printed to 3 digits


@pytest.mark.slow
def test_a_nan_on_one_ddp_process_stops_every_process_at_the_same_step(tmp_path):
    """tests/ddp_nan_script.py: a NaN image on rank 0 at step 3, the watch lagging two steps.
    Without gathered embeddings only rank 0's loss is NaN at step 3: a rank that stopped
    alone would leave the other waiting in DDP's next all-reduce."""
    runs = {"gather": ["--gather", "1"], "local": ["--gather", "0"]}  # one launch for both
    results = run_ddp_script_runs("ddp_nan_script.py", 2, tmp_path / "ddp", runs)
    for name, ranks in results.items():
        for rank, result in enumerate(ranks):
            assert result["error"] == (
                "train/loss is nan at step 3: lower model.base_lr, raise model.temperature "
                "or warm up longer (model.warmup_epochs)"
            ), (name, rank)
            assert result["step"] == 5, (name, rank)  # two steps late, as on a GPU


class _SizesStrategy:
    """A strategy whose all-gather answers the processes' batch sizes, and counts its calls."""

    root_device = torch.device("cpu")

    def __init__(self, sizes: list[int]) -> None:
        self.sizes, self.calls = sizes, 0

    def all_gather(self, tensor):
        self.calls += 1
        return torch.tensor(self.sizes)


class _Trainer:
    def __init__(self, sizes: list[int], batches: float) -> None:
        self.world_size, self.num_training_batches = len(sizes), batches
        self.strategy, self.current_epoch = _SizesStrategy(sizes), 0
        progress = SimpleNamespace(is_last_batch=False)
        self.fit_loop = SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress))


def test_batch_sizes_are_compared_at_an_epochs_first_and_last_batch_only():
    """Every other step would be a host wait for the GPU; an iterable dataset without a length
    (an infinite count of batches) is compared at its first batch and at the one its loader
    ends with (where a shard runs short)."""
    for batches, compared in [(5, [0, 4]), (1, [0]), (math.inf, [0, 3])]:
        trainer = _Trainer([4, 4], batches)
        asked = []
        for batch_idx in range(6):
            trainer.fit_loop.epoch_loop.batch_progress.is_last_batch = batch_idx == 3
            before = trainer.strategy.calls
            check_equal_batches(trainer, 4, batch_idx)
            if trainer.strategy.calls > before:
                asked.append(batch_idx)
        assert asked == compared, batches
    single = _Trainer([4], 5)
    check_equal_batches(single, 4, 0)
    assert single.strategy.calls == 0  # one process: nothing to compare


def test_batch_sizes_that_differ_across_processes_are_refused_naming_the_sizes():
    with pytest.raises(SettingError, match=r"at batch 4 of epoch 0 \(\[4, 3\] images"):
        check_equal_batches(_Trainer([4, 3], 5), 4, 4)


@pytest.mark.slow
def test_ddp_refusals_stop_every_process_with_one_error(tmp_path):
    """tests/ddp_refused_script.py: without Lightning's DistributedSampler rank 1 runs one image
    short. The gather behind the loss would abort the processes in gloo (a received size that
    does not match) and, in NCCL, read past rank 1's rows; every rank must stop at once with
    the error, and without gathering the epoch trains through. A checkpoint folder that only
    rank 0 tries (it writes) stops every rank before the first step."""
    runs = {
        "local": ["--gather", "0", "--short", "last"],  # first: the error runs leave no peer
        "last": ["--short", "last"],
        "all": ["--short", "all"],
        "unwritable": ["--short", "none", "--unwritable", "1"],
    }
    results = run_ddp_script_runs("ddp_refused_script.py", 2, tmp_path / "ddp", runs)
    assert [r["error"] for r in results["local"]] == [None, None]
    assert [r["step"] for r in results["local"]] == [3, 3]
    for name, batch_idx, sizes, step in [("last", 2, "[4, 3]", 2), ("all", 0, "[4, 3]", 0)]:
        for rank, result in enumerate(results[name]):
            assert result["error"].startswith(
                f"the processes' batches differ in size at batch {batch_idx} of epoch 0 "
                f"({sizes} images, process by process)"
            ), (name, rank, result["error"])
            assert result["step"] == step, (name, rank)
    for rank, result in enumerate(results["unwritable"]):  # only rank 0 tried the folder
        assert result["error"].startswith("the ModelCheckpoint folder "), (rank, result)
        assert "cannot be written (Not a directory)" in result["error"]
        assert result["step"] == 0


def test_a_checkpoint_folder_that_cannot_be_written_is_refused_before_any_step(tmp_path):
    """It was found at the first save, after the first epoch (or at the end of the run, with
    save_last only), the training lost. A folder under a file: even root cannot write it."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    (tmp_path / "a_file").touch()
    folder = tmp_path / "a_file" / "checkpoints"
    model = SimCLR(
        backbone="timm:test_resnet", cifar_stem=False, head_hidden_dim=8, head_output_dim=8
    )
    trainer = quiet_trainer(
        max_steps=2, enable_checkpointing=True, callbacks=[ModelCheckpoint(folder, save_last=True)]
    )
    data = [((torch.randn(3, 8, 8), torch.randn(3, 8, 8)), 0) for _ in range(8)]
    with pytest.raises(SettingError) as caught:
        trainer.fit(model, DataLoader(data, batch_size=4))
    assert str(caught.value) == (
        f"the ModelCheckpoint folder {str(folder)!r} cannot be written (Not a directory): set "
        f"the checkpoint's dirpath (or trainer.default_root_dir) to a folder this run can write"
    )
    assert trainer.global_step == 0
    writable = tmp_path / "checkpoints"  # made by the check, and left without its test file
    saves = ModelCheckpoint(writable, save_last=True, save_top_k=0)
    trainer = quiet_trainer(max_steps=1, enable_checkpointing=True, callbacks=[saves])
    trainer.fit(model, DataLoader(data, batch_size=4))
    assert sorted(p.name for p in writable.iterdir()) == ["last.ckpt"]
    quick = ModelCheckpoint(tmp_path / "quick")  # fast_dev_run saves nothing: no folder
    quiet_trainer(fast_dev_run=True, enable_checkpointing=True, callbacks=[quick]).fit(
        model, DataLoader(data, batch_size=4)
    )
    assert not (tmp_path / "quick").exists()


def test_linear_eval_refuses_a_checkpoint_folder_that_cannot_be_written(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from simclr_lightning import LinearEval

    (tmp_path / "a_file").touch()
    saves = ModelCheckpoint(tmp_path / "a_file" / "checkpoints")
    trainer = quiet_trainer(max_steps=1, enable_checkpointing=True, callbacks=[saves])
    data = [(torch.randn(3, 8, 8), i % 2) for i in range(8)]
    with pytest.raises(SettingError, match="the ModelCheckpoint folder .* cannot be written"):
        trainer.fit(LinearEval(num_classes=2, backbone="resnet18"), DataLoader(data, batch_size=4))
    assert trainer.global_step == 0


def test_validate_of_simclr_without_a_monitor_says_it_measures_nothing():
    """It exited cleanly and printed no figure; with a monitor that takes the features (the
    kNN monitor here) nothing is said."""
    from simclr_lightning import KNNMonitor
    from tests.helpers import FeatureData

    model = SimCLR(
        backbone="timm:test_resnet", cifar_stem=False, head_hidden_dim=8, head_output_dim=8
    )
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 2, (8,))
    with pytest.warns(UserWarning, match="validate of a SimCLR model measures nothing"):
        quiet_trainer().validate(model, datamodule=FeatureData((x, y), (x, y)))
    # the progress bar (on in every CLI run) also has an on_validation_batch_end: it takes no
    # features, and the warning was never shown where it was due
    with pytest.warns(UserWarning, match="validate of a SimCLR model measures nothing"):
        quiet_trainer(enable_progress_bar=True).validate(model, FeatureData((x, y), (x, y)))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="validate of a SimCLR model")
        trainer = quiet_trainer(callbacks=[KNNMonitor(k=3)])
        trainer.validate(model, datamodule=FeatureData((x, y), (x, y)))
    assert "knn/val_top1" in trainer.callback_metrics


class TwoViews(torch.utils.data.Dataset):
    """``n`` random ``((view_a, view_b), label)`` samples of 16 px."""

    def __init__(self, n: int) -> None:
        self.images = torch.rand(n, 2, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return (self.images[i, 0], self.images[i, 1]), 0


@pytest.mark.parametrize(
    ("images", "drop_last", "limit", "refused"),
    [
        (17, False, None, True),
        (17, True, None, False),
        (17, False, 2, False),
        (16, False, None, False),
    ],
)
def test_a_plain_loaders_last_batch_of_one_is_refused_before_any_step(images, drop_last, limit,
                                                                       refused):  # fmt: skip
    """17 images in batches of 8 given to fit as a DataLoader: the run stopped at the end of
    its epoch on the batch of one, advising a larger data.batch_size (it was 8)."""
    loader = DataLoader(TwoViews(images), batch_size=8, drop_last=drop_last)
    model = SimCLR(backbone="resnet18", head_hidden_dim=16, head_output_dim=8, optimizer="sgd")
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=limit, limit_val_batches=0)
    if refused:
        said = (
            r"^the training DataLoader \(batch_size=8, drop_last=False\) leaves a last batch of "
            r"1 image \(17 images\), which holds no negative for NT-Xent"
        )
        with pytest.raises(SettingError, match=said):
            trainer.fit(model, loader)
        assert trainer.global_step == 0
    else:
        trainer.fit(model, loader)
        assert trainer.global_step == (limit or images // 8)


@pytest.mark.parametrize(
    ("world", "gathered", "max_steps", "refused"),
    [(1, True, -1, True), (2, True, -1, False), (2, False, -1, True), (1, True, 2, False)],
)
def test_a_last_batch_of_one_per_process_is_refused_only_where_it_is_the_global_batch(
    world, gathered, max_steps, refused
):
    """Under DDP with the gather, one image per process is a global batch of W, which trains
    (it was refused); max_steps inside the first epoch never reaches it."""
    from simclr_lightning.run_checks import check_last_batch

    loader = DataLoader(TwoViews(17), batch_size=8)  # batches of 8, 8, 1 in this process
    trainer = SimpleNamespace(
        train_dataloader=loader, world_size=world, num_training_batches=3, max_steps=max_steps
    )
    if refused:
        with pytest.raises(SettingError, match="leaves a last batch of 1 image"):
            check_last_batch(trainer, gathered)
    else:
        check_last_batch(trainer, gathered)


class UserCallback(L.Callback):
    """A user's callback with a validation hook: it may read what validation logs."""

    def on_validation_end(self, trainer, pl_module) -> None:
        pass


class OwnValidation(SimCLR):
    """A user's subclass that measures something of its own in validation."""

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.log("val/norm", self(batch[0]).norm(dim=1).mean())


@pytest.mark.parametrize(("model_class", "callback", "reads"), [
    (SimCLR, None, False), (SimCLR, "knn", True), (SimCLR, "user", True),
    (OwnValidation, None, True), (SimCLR, "timer", False),
])  # fmt: skip
def test_a_fit_nothing_reads_validation_from_runs_none(model_class, callback, reads, caplog):
    """Every epoch computed the features of the whole validation split, which nothing read
    without a monitor (13 s of each quick-start epoch on 2 cores); a monitor, a user's own
    callback with a validation hook, or a subclass with its own validation still gets every
    pass. Lightning's own callbacks (its Timer, which has validation hooks) read nothing of
    it."""
    from lightning.pytorch.callbacks import Timer

    from simclr_lightning import KNNMonitor

    made = {"knn": lambda: KNNMonitor(k=3), "user": UserCallback, "timer": Timer}
    callbacks = [made[callback]()] if callback else []
    val = DataLoader([(torch.randn(3, 16, 16), i % 2) for i in range(8)], batch_size=4)
    model = model_class(backbone="resnet18", head_hidden_dim=16, head_output_dim=8)
    trainer = quiet_trainer(max_epochs=2, limit_train_batches=1, callbacks=callbacks)
    data = L.LightningDataModule.from_datasets(TwoViews(8), batch_size=4)
    data.val_dataloader = data.eval_train_dataloader = lambda: val  # what the kNN bank reads
    with caplog.at_level("INFO"):
        trainer.fit(model, datamodule=data)
    validated = trainer.fit_loop.epoch_loop.val_loop.batch_progress.total.completed
    assert (validated > 0) == reads and trainer.global_step == 2
    assert ("no callback reads validation, so none runs" in caplog.text) != reads
    # the Trainer's own limit, back for what it runs next (it stayed 0: a LinearEval fit on
    # this Trainer then validated nothing)
    assert trainer.limit_val_batches == 1.0


@pytest.mark.parametrize("cadence", [
    {"check_val_every_n_epoch": 2}, {"val_check_interval": 2},
    {"val_check_interval": "00:00:10:00"},  # by time: the Trainer then has no val_check_interval
])  # fmt: skip
def test_validation_is_kept_where_a_checkpoint_acts_at_its_end(tmp_path, cadence, caplog):
    """At another cadence than each epoch's end, ModelCheckpoint and EarlyStopping act when
    validation ends: without validation a run of 4 epochs wrote no checkpoint until the end."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    val = DataLoader([(torch.randn(3, 16, 16), i % 2) for i in range(8)], batch_size=4)
    data = L.LightningDataModule.from_datasets(TwoViews(8), batch_size=4)
    data.val_dataloader = lambda: val
    saves = ModelCheckpoint(tmp_path, "{epoch}", save_top_k=-1)
    trainer = quiet_trainer(max_epochs=4, limit_train_batches=2, callbacks=[saves],
                            enable_checkpointing=True, **cadence)  # fmt: skip
    model = SimCLR(backbone="resnet18", head_hidden_dim=16, head_output_dim=8)
    with caplog.at_level("INFO"):
        trainer.fit(model, datamodule=data)
    assert "so none runs" not in caplog.text
    saved = len(list(tmp_path.glob("epoch=*.ckpt")))
    by_time = isinstance(cadence.get("val_check_interval"), str)  # not in a 4-step run
    assert saved == (0 if by_time else 2 if "check_val_every_n_epoch" in cadence else 4)


def test_a_failed_fit_leaves_no_skip_behind():
    """The skip set the Trainer's limit_val_batches to 0 and put it back at teardown, which a
    fit stopped by an exception never reaches: a LinearEval validated on that Trainer then
    ran nothing. Now the Trainer is left alone, and the module's next run clears its own
    skip before Lightning checks for a validation_step."""
    from simclr_lightning import KNNMonitor, LinearEval

    class Fails(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            raise RuntimeError("stopped")

    val = DataLoader([(torch.randn(3, 16, 16), i % 2) for i in range(8)], batch_size=4)
    data = L.LightningDataModule.from_datasets(TwoViews(8), batch_size=4)
    data.val_dataloader = data.eval_train_dataloader = lambda: val
    trainer = quiet_trainer(max_epochs=1, callbacks=[Fails()])
    model = SimCLR(backbone="resnet18", head_hidden_dim=16, head_output_dim=8)
    with pytest.raises(RuntimeError, match="stopped"):
        trainer.fit(model, datamodule=data)
    assert trainer.limit_val_batches == 1.0 and "validation_step" in vars(model)
    classifier = LinearEval(num_classes=2)
    torch.nn.init.normal_(classifier.head.weight)  # as if trained: an untrained one is refused
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no model.checkpoint: a random encoder, said
        assert "val/top1" in trainer.validate(classifier, val)[0]
    watched = quiet_trainer(callbacks=[KNNMonitor(k=3)])
    assert "knn/val_top1" in watched.validate(model, datamodule=data)[0]  # skip cleared
