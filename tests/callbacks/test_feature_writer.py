"""``simclr-lightning predict`` of a SimCLR checkpoint with ``FeatureWriter``: the encoder's
features, one row per image, checked against the encoder run by hand in float64."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from simclr_lightning import (
    FeatureWriter,
    ImageFolderDataModule,
    PredictionWriter,
    SimCLR,
    SimCLRAugmentation,
)
from simclr_lightning.cli import cli_main
from simclr_lightning.errors import SettingError
from tests.helpers import REPO, quiet_trainer, write_png_folder

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    """A tiny SimCLR checkpoint (random weights: features are compared with the same encoder
    run by hand), saved as pretraining saves one."""
    L.seed_everything(0, verbose=False)
    model = SimCLR(backbone="timm:test_resnet", cifar_stem=False, zero_init_residual=False)
    trainer = quiet_trainer()
    trainer.strategy.connect(model)
    path = tmp_path_factory.mktemp("encoder") / "simclr.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture
def images(tmp_path) -> list[Path]:
    """7 random 16x16 PNGs, some nested, in the order ImageFilesDataModule lists them."""
    gen = np.random.default_rng(0)
    folder = tmp_path / "images"
    (folder / "nested").mkdir(parents=True)
    for i in range(7):
        pixels = gen.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / ("nested" if i % 2 else ".") / f"{i}.png")
    return sorted(folder.rglob("*.png"))


def reference(ckpt: Path, files: list[Path]) -> torch.Tensor:
    """The checkpoint's encoder, in float64, on images preprocessed by hand (16 px: no
    resize)."""
    model = SimCLR.load_from_checkpoint(ckpt).double().eval()
    mean = torch.tensor(MEAN, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float64).view(3, 1, 1)
    rgb = [np.asarray(Image.open(f).convert("RGB"), np.float64) / 255 for f in files]
    x = (torch.from_numpy(np.stack(rgb)).permute(0, 3, 1, 2) - mean) / std
    with torch.no_grad():
        return model(x)


def test_cli_writes_the_encoders_features(encoder, images, tmp_path):
    """The user's command: predict with a SimCLR checkpoint, features to one .npz."""
    out = tmp_path / "out" / "features.npz"
    cli_main(
        [
            "predict",
            f"--config={REPO / 'configs' / 'quickstart.yaml'}",
            f"--ckpt_path={encoder}",
            "--data=simclr_lightning.ImageFilesDataModule",
            f"--data.paths=[{images[0].parent}]",
            "--data.batch_size=3",  # 7 images: the last batch is short
            "--data.image_size=16",
            f"--data.mean=[{', '.join(map(str, MEAN))}]",
            f"--data.std=[{', '.join(map(str, STD))}]",
            "--data.resize_ratio=1",
            "--trainer.callbacks+=simclr_lightning.FeatureWriter",
            f"--trainer.callbacks.output={out}",
            "--trainer.accelerator=cpu",
            "--trainer.precision=32-true",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    with np.load(out) as written:  # no pickles: loads with numpy's safe default
        assert sorted(written.files) == ["features", "ids"]  # file paths, no labels
        features, ids = written["features"], written["ids"]
    assert features.dtype == np.float32 and features.shape == (7, 96)
    assert ids.tolist() == [str(f) for f in images]
    want = reference(encoder, images)
    assert len({tuple(row) for row in want.tolist()}) == 7  # one row per image
    torch.testing.assert_close(torch.from_numpy(features).double(), want, atol=1e-5, rtol=1e-4)
    assert sorted(p.name for p in out.parent.iterdir()) == ["features.npz"]  # no temporary


class Watch(L.Callback):
    """After FeatureWriter: whether the output file exists at each batch end and at the end
    of predict; ``fail_at`` raises at that batch."""

    def __init__(self, out: Path, fail_at: int | None = None) -> None:
        self.out, self.fail_at, self.seen = out, fail_at, []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *args):
        self.seen.append(self.out.exists())
        if batch_idx == self.fail_at:
            raise RuntimeError("interrupted")

    def on_predict_end(self, trainer, pl_module):
        self.seen.append(self.out.exists())


def test_pt_file_with_labels_appears_only_when_predict_ends(encoder, tmp_path):
    """A TensorDataset of (images, labels): rows named by dataset index, labels kept, and the
    file only there once every batch is written; an interrupted run leaves nothing."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 3, 16, 16, generator=gen), torch.tensor([3, 0, 2, 2, 1])
    loader = DataLoader(TensorDataset(x, y), batch_size=2)
    out = tmp_path / "features.pt"
    watch = Watch(out)
    trainer = quiet_trainer(callbacks=[FeatureWriter(str(out)), watch])
    trainer.predict(SimCLR.load_from_checkpoint(encoder), loader, return_predictions=False)
    assert watch.seen == [False, False, False, False]  # 3 batches, then on_predict_end
    written = torch.load(out, weights_only=True)
    assert written["ids"] == ["0", "1", "2", "3", "4"]
    assert torch.equal(written["labels"], y) and written["labels"].dtype == torch.int64
    model = SimCLR.load_from_checkpoint(encoder).double().eval()
    with torch.no_grad():
        want = model(x.double())
    assert written["features"].dtype == torch.float32
    torch.testing.assert_close(written["features"].double(), want, atol=1e-5, rtol=1e-4)

    out.unlink()
    trainer = quiet_trainer(callbacks=[FeatureWriter(str(out)), Watch(out, fail_at=1)])
    with pytest.raises(RuntimeError, match="interrupted"):
        trainer.predict(SimCLR.load_from_checkpoint(encoder), loader)
    assert list(tmp_path.iterdir()) == []  # no file, no temporary file


def test_a_skipped_file_has_no_row(encoder, tmp_path):
    """An image folder with ``skip_corrupt``: rows keep their file and label (ids were bare
    dataset indices, which left the user to find ``val_set.samples``)."""
    files = sorted(write_png_folder(tmp_path / "data", 8, 16, ("train", "val"))[8:])
    # (ImageFolder's order: c0/0, 2, 4, 6, then c1/1, 3, 5, 7)
    files[5].write_bytes(b"not a png")  # c1/3.png, dataset index 5
    data = ImageFolderDataModule(
        str(tmp_path / "data"),
        augmentation=SimCLRAugmentation(image_size=16, mean=MEAN, std=STD),
        task="classify",
        batch_size=3,
        num_workers=0,
        skip_corrupt=True,
    )
    out = tmp_path / "features.npz"
    trainer = quiet_trainer(callbacks=[FeatureWriter(str(out))])
    with pytest.warns(UserWarning, match="3.png"):
        trainer.predict(SimCLR.load_from_checkpoint(encoder), datamodule=data)
    kept = [0, 1, 2, 3, 4, 6, 7]
    with np.load(out) as written:
        assert written["ids"].tolist() == [str(files[i]) for i in kept]
        assert written["labels"].tolist() == [0, 0, 0, 0, 1, 1, 1]
        torch.testing.assert_close(
            torch.from_numpy(written["features"]).double(),
            reference(encoder, [files[i] for i in kept]),
            atol=1e-5, rtol=1e-4,
        )  # fmt: skip


class Linear(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 6)

    def predict_step(self, batch, batch_idx):
        return self.layer(batch[0])


def test_bf16_features_are_written_as_float32(tmp_path):
    L.seed_everything(0, verbose=False)
    x = torch.randn(5, 4)
    out = tmp_path / "features.npz"
    model = Linear()
    weight, bias = model.layer.weight.detach().double(), model.layer.bias.detach().double()
    trainer = quiet_trainer(precision="bf16-true", callbacks=[FeatureWriter(str(out))])
    trainer.predict(model, DataLoader(TensorDataset(x), batch_size=2))
    with np.load(out) as written:
        features = torch.from_numpy(written["features"])
        assert written["ids"].tolist() == ["0", "1", "2", "3", "4"]
    assert features.dtype == torch.float32 and features.shape == (5, 6)
    torch.testing.assert_close(features.double(), x.double() @ weight.T + bias, atol=0.1, rtol=0.02)


def test_settings_that_cannot_work_are_one_line(tmp_path):
    with pytest.raises(SettingError, match=r"^FeatureWriter\.output='f\.csv' is invalid: .*\.npz"):
        FeatureWriter("f.csv")

    class Maps(L.LightningModule):
        def predict_step(self, batch, batch_idx):
            return batch[0].view(-1, 1, 2, 2)

    loader = DataLoader(TensorDataset(torch.rand(4, 4)), batch_size=2)
    trainer = quiet_trainer(callbacks=[FeatureWriter(str(tmp_path / "f.npz"))])
    with pytest.raises(SettingError, match=r"Maps\.predict_step returned a tensor of shape "):
        trainer.predict(Maps(), loader)
    assert list(tmp_path.iterdir()) == []

    # an output folder that cannot be made (a file is in its place): the setting and the
    # user's path, not the temporary file's name
    (tmp_path / "taken").write_text("")
    for writer, name in ((FeatureWriter, "f.npz"), (PredictionWriter, "p.csv")):
        output = str(tmp_path / "taken" / name)
        trainer = quiet_trainer(callbacks=[writer(output)])
        with pytest.raises(SettingError) as raised:
            trainer.predict(Linear(), loader)
        message = str(raised.value)
        assert message.startswith(f"{writer.__name__}.output={output!r} cannot be written (")
        assert ".tmp" not in message and "\n" not in message
    # the folder is there, but the temporary file cannot be made in it (a folder in its place,
    # as a read-only folder fails for a user who is not root): reported as the user's path
    for writer, name in ((FeatureWriter, "f.npz"), (PredictionWriter, "p.csv")):
        (tmp_path / "there" / f".{name}.tmp").mkdir(parents=True)
        output = str(tmp_path / "there" / name)
        with pytest.raises(SettingError) as raised:
            quiet_trainer(callbacks=[writer(output)]).predict(Linear(), loader)
        message = str(raised.value)
        assert message.startswith(f"{writer.__name__}.output={output!r} cannot be written (")
        assert message.endswith(f": {tmp_path / 'there'}): give a file in a folder you can write")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any folder")
def test_a_read_only_folder_is_named_not_the_temporary_file(tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o500)
    loader = DataLoader(TensorDataset(torch.rand(4, 4)), batch_size=2)
    try:
        for writer, name in ((FeatureWriter, "f.npz"), (PredictionWriter, "p.csv")):
            output = str(folder / name)
            with pytest.raises(SettingError, match=r"cannot be written") as raised:
                quiet_trainer(callbacks=[writer(output)]).predict(Linear(), loader)
            assert f"{writer.__name__}.output={output!r}" in str(raised.value)
            assert ".tmp" not in str(raised.value)
    finally:
        folder.chmod(0o700)


def test_each_process_writes_its_own_shard(tmp_path):
    """Under DDP, rank r writes ``<stem>.rank<r><suffix>`` (the hooks as Lightning calls them
    in process 1 of 2)."""
    out = tmp_path / "features.pt"
    writer = FeatureWriter(str(out))
    trainer = SimpleNamespace(world_size=2, global_rank=1, predict_dataloaders=None)
    writer.on_predict_start(trainer, None)
    features = torch.arange(6.0).view(3, 2)
    writer.write_on_batch_end(trainer, None, features, [1, 3, 5], (features, None), 0, 0)
    writer.teardown(trainer, None, "predict")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.rank1.pt"]
    written = torch.load(tmp_path / "features.rank1.pt", weights_only=True)
    assert written["ids"] == ["1", "3", "5"] and torch.equal(written["features"], features)
    assert "labels" not in written


def test_a_simclr_checkpoint_under_prediction_writer_points_to_feature_writer(encoder, tmp_path):
    loader = DataLoader(TensorDataset(torch.randn(2, 3, 16, 16)), batch_size=2)
    trainer = quiet_trainer(callbacks=[PredictionWriter(str(tmp_path / "p.csv"))])
    with pytest.raises(SettingError, match=r"simclr_lightning\.FeatureWriter instead \(--trainer"):
        trainer.predict(SimCLR.load_from_checkpoint(encoder), loader)


def test_a_classifier_under_feature_writer_points_to_prediction_writer(tmp_path):
    """A LinearEval checkpoint's predict_step returns class probabilities: they were written
    as the "features" of every image, silently. Refused before predicting, no file left."""
    from simclr_lightning import LinearEval

    model = LinearEval(num_classes=3, backbone="resnet18")
    loader = DataLoader(TensorDataset(torch.rand(4, 3, 16, 16)), batch_size=2)
    trainer = quiet_trainer(callbacks=[FeatureWriter(str(tmp_path / "f.npz"))])
    with pytest.raises(SettingError, match="LinearEval.predict_step returns class probabilit"):
        trainer.predict(model, loader)
    assert list(tmp_path.iterdir()) == []
