"""A fit stopped inside an epoch by its budget (``max_steps``; ``max_time`` and other
``should_stop`` stops alike) and resumed with a longer one goes on at the next batch of the
same epoch, exactly as the run that was never stopped. Lightning counts such an epoch as done
by the time its end-of-epoch or end-of-fit ``ModelCheckpoint`` saves: the resumed run began
the next epoch, leaving the rest of this one out (from an epoch-end save, it counted this
epoch while the loader served the next one's order)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from simclr_lightning import ImageFolderDataModule, LinearEval, SimCLR, SimCLRAugmentation
from simclr_lightning.callbacks import RNGState
from tests.helpers import quiet_trainer, write_png_folder

pytestmark = pytest.mark.usefixtures("one_thread")

STOP, STEPS = 2, 7  # 20 images in batches of 4: 5 steps an epoch


class Rows(L.Callback):
    """(epoch, batch_idx, global step, loss, learning rate) of every training step; with
    ``stop_at``, asks the Trainer to stop after that many steps (as ``max_time`` does)."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.rows: list[tuple] = []
        self.stop_at = stop_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        loss = outputs["loss"].detach().clone()
        self.rows.append((trainer.current_epoch, batch_idx, trainer.global_step, loss, lr))
        if trainer.global_step == self.stop_at:
            trainer.should_stop = True


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("stop-images")
    write_png_folder(root, 20, 12)
    return root


class EpochFigures(L.Callback):
    """The online probe's figures of each epoch, as logged at its end (after the probe's)."""

    def __init__(self) -> None:
        self.epochs: dict[int, float] = {}

    def on_train_epoch_end(self, trainer, pl_module):
        if "probe/train_loss" in trainer.callback_metrics:
            loss = float(trainer.callback_metrics["probe/train_loss"])
            self.epochs[trainer.current_epoch] = loss


def fit(folder, max_steps: int, rows: Rows, saves=(), ckpt_path=None, workers=0, epochs=3):
    L.seed_everything(3, verbose=False)
    data = ImageFolderDataModule(
        str(folder), SimCLRAugmentation(image_size=8), batch_size=4, num_workers=workers
    )
    model = SimCLR(
        cifar_stem=False, warmup_epochs=1, base_lr=0.3, head_hidden_dim=8, head_output_dim=8
    )
    trainer = quiet_trainer(
        max_epochs=epochs,
        max_steps=max_steps,
        limit_val_batches=0,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in saves),
        callbacks=[rows, RNGState(), *saves],
    )
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return trainer


SAVES = {  # where Lightning's ModelCheckpoint writes last.ckpt after the stop
    "fit end": dict(save_last=True, save_top_k=0),
    "epoch end": dict(save_last=True, save_top_k=-1, every_n_epochs=1),
}


@pytest.mark.parametrize("stop", ["max_steps", "should_stop"])
@pytest.mark.parametrize("save", list(SAVES))
def test_a_fit_stopped_inside_an_epoch_resumes_at_its_next_batch(folder, tmp_path, stop, save):
    whole = Rows()
    fit(folder, STEPS, whole)
    assert [r[:3] for r in whole.rows][STOP] == (0, STOP, STOP + 1)

    stopped = Rows(stop_at=STOP if stop == "should_stop" else None)
    saves = [ModelCheckpoint(tmp_path, **SAVES[save])]
    fit(folder, STOP if stop == "max_steps" else STEPS, stopped, saves)
    assert len(stopped.rows) == STOP

    resumed = Rows()
    fit(folder, STEPS, resumed, ckpt_path=tmp_path / "last.ckpt")
    assert [r[:3] for r in resumed.rows] == [r[:3] for r in whole.rows[STOP:]]
    for got, want in zip(resumed.rows, whole.rows[STOP:], strict=True):
        assert torch.equal(got[3], want[3]), f"loss differs at step {got[2]}"
        assert got[4] == want[4], f"learning rate differs at step {got[2]}"


def test_linear_eval_saves_a_stop_inside_an_epoch_as_that_epoch(folder, tmp_path):
    """The same rewrite for LinearEval (and its data module's order): the checkpoint Lightning
    would mark as epoch 1, after 2 of epoch 0's 5 batches."""
    data = ImageFolderDataModule(
        str(folder), SimCLRAugmentation(image_size=8), batch_size=4, num_workers=0, task="classify"
    )
    trainer = quiet_trainer(
        max_epochs=3,
        max_steps=STOP,
        limit_val_batches=0,
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(tmp_path, **SAVES["fit end"])],
    )
    trainer.fit(LinearEval(num_classes=2, backbone="resnet18"), datamodule=data)
    assert trainer.current_epoch == 1  # Lightning's count: the epoch done
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["epoch"] == 0
    assert saved["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"] == 0
    assert saved["ImageFolderDataModule"]["train_order"]["epoch"] == 0
    assert saved["ImageFolderDataModule"]["train_order"]["batches"] == STOP


class Stream(torch.utils.data.IterableDataset):
    """Two-view pairs from a loader without a length (a WebDataset-style stream)."""

    def __iter__(self):
        gen = torch.Generator().manual_seed(0)
        for i in range(12):
            yield (torch.randn(3, 8, 8, generator=gen), torch.randn(3, 8, 8, generator=gen)), i % 2


def test_an_epoch_of_a_loader_without_a_length_that_ran_dry_stays_done(tmp_path):
    """Its batch count is unknown (infinite to Lightning): the epoch ended at its last batch,
    not inside it, and a resume goes on with the next epoch."""
    trainer = quiet_trainer(
        max_epochs=1,
        limit_val_batches=0,
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(tmp_path, **SAVES["fit end"])],
    )
    model = SimCLR(cifar_stem=False, warmup_epochs=0, head_hidden_dim=8, head_output_dim=8)
    trainer.fit(model, torch.utils.data.DataLoader(Stream(), batch_size=4))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 3 and saved["epoch"] == 1
    assert saved["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"] == 1


def test_a_checkpoint_written_after_lightning_counted_the_epoch_done_resumes_at_the_next(
    folder, tmp_path
):
    """A stop in the end-of-epoch validation or kNN pass saves after Lightning has counted
    the epoch done (its current epoch already the next): the order said the epoch after
    that, and with loader workers (whose iterator is made before Lightning sets the epoch)
    the resumed run trained the next epoch on the one after's images and views, then again
    on them, as if seen before. Written here by trainer.save_checkpoint after the fit."""
    whole = Rows()
    fit(folder, -1, whole, workers=1)
    first = fit(folder, -1, Rows(), workers=1, epochs=1)
    assert first.current_epoch == 1  # counted done
    first.save_checkpoint(tmp_path / "after.ckpt")
    resumed = Rows()
    fit(folder, -1, resumed, ckpt_path=tmp_path / "after.ckpt", workers=1)
    assert [r[:3] for r in resumed.rows] == [r[:3] for r in whole.rows[5:]]
    for got, want in zip(resumed.rows, whole.rows[5:], strict=True):
        assert torch.equal(got[3], want[3]), f"loss differs at step {got[2]}"


def test_the_probes_figures_of_a_stopped_epoch_cover_all_of_it(folder, tmp_path):
    """The probe (and LinearEval) cleared its epoch's sums at the fit's end, before the
    fit-end save: resumed, the epoch's probe/train_loss covered only the batches after it."""
    from simclr_lightning import OnlineLinearProbe

    def run(max_steps: int, saves=(), ckpt_path=None) -> EpochFigures:
        figures = EpochFigures()
        probe = OnlineLinearProbe(num_classes=2, optimizer="sgd", lr=0.1)
        fit(folder, max_steps, Rows(), [probe, figures, *saves], ckpt_path, epochs=1)
        return figures

    whole = run(-1)
    run(STOP, [ModelCheckpoint(tmp_path, **SAVES["fit end"])])
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"]
    (probe_state,) = [v for k, v in saved.items() if k.startswith("OnlineLinearProbe")]
    assert probe_state["train_sums_epoch"] == 0  # the stopped epoch's, not cleared
    resumed = run(-1, ckpt_path=tmp_path / "last.ckpt")
    assert resumed.epochs[0] == pytest.approx(whole.epochs[0], rel=1e-6)
