"""A data module's training order across fits: a resume point loaded from a checkpoint serves
the fit that resumed, not a later fresh fit of the same module (it skipped that many batches),
and Lightning's own sampler (``overfit_batches``) can read the library's training sets."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from simclr_lightning import ImageFolderDataModule, SimCLRAugmentation
from simclr_lightning.errors import SettingError
from tests.ddp_helpers import spawn_gloo
from tests.helpers import quiet_trainer

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGES, BATCH = 28, 4  # 7 batches an epoch


class Recorder(L.LightningModule):
    """Records the labels (here each image's own id) of every training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        (view_a, _), labels = batch[0], batch[1]
        self.seen.append(labels.tolist())
        return (self.weight * view_a.float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture
def one_image_per_class(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        folder = tmp_path / "data" / "train" / f"c{i:02d}"
        folder.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / "0.png")
    return tmp_path / "data"


def module(root: Path, augment: str = "cpu") -> ImageFolderDataModule:
    augmentation = SimCLRAugmentation(image_size=8, blur_prob=0.0)
    return ImageFolderDataModule(
        str(root), augmentation=augmentation, augment=augment, batch_size=BATCH, num_workers=0
    )


def test_a_fresh_fit_after_a_resumed_one_trains_the_whole_epoch(one_image_per_class, tmp_path):
    L.seed_everything(0)
    full = Recorder()
    saver = ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer = quiet_trainer(
        max_epochs=1, limit_val_batches=0, enable_checkpointing=True, callbacks=[saver]
    )
    trainer.fit(full, module(one_image_per_class))
    assert len(full.seen) == IMAGES // BATCH
    step2 = next((tmp_path / "ckpt").glob("*step=2.ckpt"))

    data = module(one_image_per_class)
    resumed = Recorder()
    quiet_trainer(max_epochs=1, limit_val_batches=0).fit(resumed, data, ckpt_path=step2)
    assert resumed.seen == full.seen[2:]  # the resumed fit skips the 2 trained batches

    fresh = Recorder()
    quiet_trainer(max_epochs=1, limit_val_batches=0).fit(fresh, data)
    assert len(fresh.seen) == IMAGES // BATCH  # not 5: the old resume point is spent
    assert sorted(i for batch in fresh.seen for i in batch) == list(range(IMAGES))


@pytest.mark.parametrize("augment", ["cpu", "gpu"])
def test_overfit_batches_trains_on_the_same_first_batches(one_image_per_class, augment):
    """Lightning swaps in a SequentialSampler of plain indices; the (index, seed) keys the
    library's sampler yields were unpacked from an int and every fit crashed."""
    model = Recorder()
    trainer = quiet_trainer(max_epochs=2, overfit_batches=2, limit_val_batches=0)
    trainer.fit(model, module(one_image_per_class, augment))
    assert model.seen == [[0, 1, 2, 3], [4, 5, 6, 7]] * 2


def _iterate_in_a_group(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from simclr_lightning.data.sampler import ResumableSampler

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        shard = [i for i, _ in ResumableSampler(8, num_replicas=2, rank=rank)]
        try:
            list(ResumableSampler(8))  # built without a Trainer: for one process
            outcome = "no error"
        except SettingError as err:
            outcome = str(err)
        torch.save({"shard": shard, "outcome": outcome}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_loader_built_for_one_process_is_refused_in_two(tmp_path):
    """``trainer.fit(model, train_dataloaders=dm.train_dataloader())`` under DDP: the loader,
    built before any Trainer, held a sampler for one process, which Lightning keeps (it is a
    DistributedSampler): every process trained on the same batches, with the same views."""
    spawn_gloo(_iterate_in_a_group, 2, lambda init: (init, str(tmp_path)), tmp_path)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert sorted(results[0]["shard"] + results[1]["shard"]) == list(range(8))  # as built
    for result in results:
        assert result["outcome"].startswith(
            "the training loader was built for 1 process(es) but this run has 2"
        )
        assert "datamodule=dm" in result["outcome"]


def test_a_loader_built_without_a_trainer_warns_that_it_resumes_at_the_epochs_start(
    one_image_per_class, tmp_path
):
    """It checkpointed no position (its TrainOrder had no Trainer to read), so a mid-epoch
    resume replayed the epoch from its first batch without a word."""
    data = module(one_image_per_class)
    saver = ModelCheckpoint(tmp_path, every_n_train_steps=2)
    trainer = quiet_trainer(max_steps=2, enable_checkpointing=True, callbacks=[saver])
    with pytest.warns(UserWarning, match=r"built without a Trainer .* pass the data module"):
        trainer.fit(Recorder(), train_dataloaders=data.train_dataloader())
