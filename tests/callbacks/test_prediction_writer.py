"""``simclr-lightning predict`` on image files: one row per image, names and probabilities."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from simclr_lightning.cli import cli_main
from simclr_lightning.data.image_folder import ImageFolderDataModule
from simclr_lightning.data.transforms import SimCLRAugmentation
from simclr_lightning.errors import CorruptImageError
from simclr_lightning.evaluation import LinearEval
from tests.helpers import REPO, quiet_trainer, write_png_folder

CONFIG = REPO / "configs" / "linear_eval.yaml"
# Normalisation of the training run, not the ImageNet default: prediction must reuse it.
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def classifier(cifar_tiny, tmp_path_factory) -> Path:
    """A LinearEval checkpoint trained a few steps on the CIFAR-10 JPEGs (accuracy irrelevant:
    predictions are compared with the same model run by hand)."""
    L.seed_everything(0, verbose=False)
    data = ImageFolderDataModule(
        str(cifar_tiny),
        augmentation=SimCLRAugmentation(image_size=32, mean=MEAN, std=STD),
        task="classify",
        batch_size=20,
        num_workers=0,
    )
    trainer = quiet_trainer(
        max_steps=3,
        limit_val_batches=0,
    )
    trainer.fit(LinearEval(num_classes=10, lr=0.5), datamodule=data)
    path = tmp_path_factory.mktemp("classifier") / "linear.ckpt"
    trainer.save_checkpoint(path)
    return path


def predict(ckpt: Path, paths: list[Path], output: Path) -> None:
    cli_main(
        [
            "predict",
            f"--config={CONFIG}",
            f"--ckpt_path={ckpt}",
            "--data=simclr_lightning.ImageFilesDataModule",
            f"--data.paths=[{', '.join(map(str, paths))}]",
            "--data.batch_size=3",
            "--data.num_workers=0",
            "--trainer.callbacks+=simclr_lightning.PredictionWriter",
            f"--trainer.callbacks.output={output}",
            "--trainer.precision=32",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={output.parent}",  # where the CLI saves config.yaml
            "--trainer.enable_progress_bar=false",
        ]
    )


def reference(ckpt: Path, files: list[Path]) -> torch.Tensor:
    """The checkpoint's model on hand-preprocessed images."""
    model = LinearEval.load_from_checkpoint(ckpt).eval()
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    rgb = [np.asarray(Image.open(f).convert("RGB"), np.float32) / 255 for f in files]
    x = (torch.from_numpy(np.stack(rgb)).permute(0, 3, 1, 2) - mean) / std
    with torch.no_grad():
        return model(x).softmax(dim=1)


@pytest.fixture
def images(cifar_tiny, tmp_path) -> tuple[Path, list[Path]]:
    """A folder with one validation JPEG per class (nested one level), and one file outside."""
    folder = tmp_path / "to_predict"
    (folder / "nested").mkdir(parents=True)
    classes = sorted(p.name for p in (cifar_tiny / "val").iterdir())
    for i, name in enumerate(classes[:6]):
        source = sorted((cifar_tiny / "val" / name).iterdir())[0]
        target = folder / ("nested" if i % 2 else ".") / f"{name}.jpg"
        target.write_bytes(source.read_bytes())
    single = tmp_path / "single.jpg"
    single.write_bytes(sorted((cifar_tiny / "val" / classes[-1]).iterdir())[1].read_bytes())
    files = sorted(p for p in folder.rglob("*.jpg")) + [single]
    return folder, files


@pytest.mark.slow
def test_predict_writes_csv_rows(classifier, images, cifar_tiny, tmp_path):
    folder, files = images
    out = tmp_path / "out" / "predictions.csv"
    predict(classifier, [folder, files[-1]], out)
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    names = LinearEval.load_from_checkpoint(classifier).class_names
    assert names == sorted(p.name for p in (cifar_tiny / "train").iterdir())  # ImageFolder's
    assert [r["file"] for r in rows] == [str(f) for f in files]
    assert list(rows[0]) == ["file", "prediction"] + [f"prob_{n}" for n in names]
    probs = torch.tensor([[float(r[f"prob_{n}"]) for n in names] for r in rows])
    want = reference(classifier, files)
    torch.testing.assert_close(probs, want, atol=2e-6, rtol=1e-5)  # written with 6 digits
    assert [r["prediction"] for r in rows] == [names[k] for k in want.argmax(1).tolist()]
    assert list(out.parent.glob(".predictions*")) == []  # the temporary file was renamed


@pytest.mark.slow
def test_predict_writes_json_lines(classifier, images, tmp_path):
    _, files = images
    out = tmp_path / "predictions.jsonl"
    predict(classifier, files[:2], out)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    want = reference(classifier, files[:2])
    assert [r["file"] for r in records] == [str(f) for f in files[:2]]
    for record, p in zip(records, want, strict=True):
        names = list(record["probabilities"])
        assert len(names) == 10
        torch.testing.assert_close(torch.tensor(list(record["probabilities"].values())), p)
        assert record["prediction"] == names[int(p.argmax())]


def test_unreadable_image_is_named(classifier, images, tmp_path):
    folder, _ = images
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    out = tmp_path / "predictions.csv"
    with pytest.raises(CorruptImageError, match="broken.jpg"):
        predict(classifier, [folder], out)
    assert not out.exists() and list(tmp_path.glob(".predictions.csv*")) == []


def test_missing_path_is_named(classifier, tmp_path):
    # jsonargparse reports the data module's FileNotFoundError as a ValueError, message kept.
    with pytest.raises((FileNotFoundError, ValueError), match="nowhere does not exist"):
        predict(classifier, [tmp_path / "nowhere"], tmp_path / "p.csv")


class Features(L.LightningModule):
    """predict_step as SimCLR's: the encoder's features (post-ReLU), not probabilities."""

    def predict_step(self, batch, batch_idx):
        return torch.relu(batch[0] @ torch.ones(4, 6))


def test_features_are_refused_not_written_as_probabilities(tmp_path):
    """A pretraining checkpoint under PredictionWriter wrote a "prediction" (the largest
    feature) and one "probability" per feature."""
    from torch.utils.data import DataLoader, TensorDataset

    from simclr_lightning import PredictionWriter, SettingError

    out = tmp_path / "predictions.csv"
    loader = DataLoader(TensorDataset(torch.rand(5, 4)), batch_size=2)
    trainer = quiet_trainer(callbacks=[PredictionWriter(str(out))])
    with pytest.raises(SettingError, match=r"Features.predict_step returned values of shape "):
        trainer.predict(Features(), loader)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary file left
    with pytest.raises(SettingError, match=r"^PredictionWriter\.output='p\.txt' is invalid"):
        PredictionWriter("p.txt")

    class Probabilities(L.LightningModule):
        def predict_step(self, batch, batch_idx):
            return batch[0][:, :3].softmax(dim=1)

    trainer = quiet_trainer(callbacks=[PredictionWriter(str(out), class_names=["a", "b"])])
    with pytest.raises(SettingError, match=r"class_names has 2 names for the model's 3 classes"):
        trainer.predict(Probabilities(), loader)
    trainer = quiet_trainer(callbacks=[PredictionWriter(str(out), class_names=["a", "b", "c"])])
    trainer.predict(Probabilities(), loader)
    assert out.read_text().splitlines()[0] == "file,prediction,prob_a,prob_b,prob_c"


def test_rows_keep_their_dataset_index_when_a_bad_file_is_left_out(tmp_path):
    """With skip_corrupt the loader leaves a bad file out of its batch: Lightning's batch
    indices then no longer matched the rows, and the whole batch was written without ids."""

    from simclr_lightning import PredictionWriter

    write_png_folder(tmp_path / "data", 8, 16, ("train", "val"))
    (tmp_path / "data" / "val" / "c1" / "3.png").write_bytes(b"not a png")  # dataset index 5
    data = ImageFolderDataModule(
        str(tmp_path / "data"),
        augmentation=SimCLRAugmentation(image_size=16, mean=MEAN, std=STD),
        task="classify",
        batch_size=4,
        num_workers=0,
        skip_corrupt=True,
    )

    class Probabilities(L.LightningModule):
        def predict_step(self, batch, batch_idx):
            return batch[0].flatten(1)[:, :3].softmax(dim=1)

    out = tmp_path / "predictions.csv"
    trainer = quiet_trainer(callbacks=[PredictionWriter(str(out))])
    with pytest.warns(UserWarning, match="3.png"):
        trainer.predict(Probabilities(), datamodule=data)
    with open(out, newline="") as f:
        ids = [row["file"] for row in csv.DictReader(f)]
    files = sorted(str(f) for f in (tmp_path / "data" / "val").rglob("*.png"))  # by class
    assert ids == [files[i] for i in (0, 1, 2, 3, 4, 6, 7)]  # the bad file, index 5, has no row
