"""The embedding plot: PCA against numpy's SVD, and the picture on TensorBoard and CSV loggers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image

from simclr_lightning.callbacks.embedding_plot import (
    TAB10,
    UNLABELED,
    EmbeddingPlot,
    pca_2d,
    project_2d,
)
from tests.helpers import FeatureData, FeatureModule, quiet_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_pca_2d_matches_numpy_svd():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=gen) * torch.linspace(5, 0.1, 12)
    got = pca_2d(x).double().numpy()
    centred = x.double().numpy() - x.double().numpy().mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    want = centred @ vt[:2].T
    for i in range(2):  # components are defined up to sign
        assert abs(np.corrcoef(got[:, i], want[:, i])[0, 1]) > 0.999


def clusters(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = 8 * torch.eye(3, 10)[y] + 0.3 * torch.randn(n, 10, generator=gen)
    y[::10] = -1
    return x, y


def plot_pixels(image: Image.Image, colour) -> np.ndarray:
    """Coordinates of the plot-area pixels of exactly ``colour`` (the legend is right of 512)."""
    rgb = np.asarray(image.convert("RGB"))[:, :512]
    return np.argwhere((rgb == np.array(colour)).all(axis=2))


def test_embedding_plot_on_tensorboard_and_csv(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    plot = EmbeddingPlot(every_n_epochs=2)
    loggers = [TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv")]
    trainer = quiet_trainer(
        max_epochs=4,
        logger=loggers,
        callbacks=[plot],
    )
    trainer.fit(FeatureModule(10), datamodule=FeatureData(clusters(30, 0), clusters(60, 1)))

    # Classes 0-2 in their own colours, well apart; unlabeled rows grey.
    centres = []
    for label in range(3):
        pixels = plot_pixels(plot.image, TAB10[label])
        assert len(pixels) > 10, label
        centres.append(pixels.mean(axis=0))
    assert min(np.linalg.norm(a - b) for i, a in enumerate(centres) for b in centres[i + 1 :]) > 50
    assert len(plot_pixels(plot.image, UNLABELED)) > 0

    events = EventAccumulator(str(loggers[0].log_dir), size_guidance={"images": 0})
    events.Reload()
    images = events.Images("embeddings/val")
    assert len(images) == 2  # epochs 2 and 4
    assert (images[-1].width, images[-1].height) == plot.image.size
    pngs = sorted((Path(loggers[1].log_dir) / "embeddings").glob("*.png"))
    assert [p.name for p in pngs] == ["epoch=001.png", "epoch=003.png"]
    assert np.array_equal(np.asarray(Image.open(pngs[-1]).convert("RGB")), np.asarray(plot.image))


def test_projection_uses_directions_not_lengths():
    """SimCLR features are compared by cosine: scaling a row must not move its point."""
    x, _ = clusters(90, 2)
    x = x.abs()  # post-ReLU-like: one orthant
    scale = torch.rand(len(x), 1, generator=torch.Generator().manual_seed(1)) * 20 + 0.1
    torch.testing.assert_close(project_2d(x * scale), project_2d(x), rtol=1e-4, atol=1e-4)
    unit = x.double() / x.double().norm(dim=1, keepdim=True)
    want = pca_2d(unit)  # PCA of the unit vectors
    got = project_2d(x * scale)
    for i in range(2):
        assert abs(np.corrcoef(got[:, i], want[:, i])[0, 1]) > 0.999


def test_tsne_projection_keeps_classes_apart():
    pytest.importorskip("sklearn")
    x, y = clusters(90, 3)
    points = project_2d(x, "tsne")
    keep = y >= 0
    points, y = points[keep].double(), y[keep]
    # nearest neighbour in the picture has the same class (brute force over all pairs)
    dist = torch.cdist(points, points)
    dist.fill_diagonal_(float("inf"))
    assert (y[dist.argmin(dim=1)] == y).float().mean() == 1.0


def test_plot_runs_at_the_last_epoch_and_rejects_unknown_projection(tmp_path):
    plot = EmbeddingPlot(every_n_epochs=10)
    trainer = quiet_trainer(max_epochs=2, callbacks=[plot])
    trainer.fit(FeatureModule(10), datamodule=FeatureData(clusters(30, 0), clusters(60, 1)))
    assert plot.image is not None and len(plot.points) == 60  # shown although 2 < 10 epochs
    with pytest.raises(ValueError, match="EmbeddingPlot.projection='umap' is invalid"):
        EmbeddingPlot(projection="umap")


def test_a_validate_run_plots_whatever_the_epoch():
    """``simclr-lightning validate --ckpt_path ...`` is asked for the picture: it draws one, as
    the kNN monitor measures one, whatever ``every_n_epochs`` says."""
    plot = EmbeddingPlot(every_n_epochs=10)
    trainer = quiet_trainer(max_epochs=5, callbacks=[plot])
    trainer.validate(FeatureModule(10), datamodule=FeatureData(clusters(30, 0), clusters(60, 1)))
    assert plot.image is not None and len(plot.points) == 60


class CountingPlot(EmbeddingPlot):
    """Records the step of every picture drawn."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.steps: list[int] = []

    def _plot(self, trainer, features, labels) -> None:
        self.steps.append(trainer.global_step)
        super()._plot(trainer, features, labels)


def csv_pngs(logger: CSVLogger) -> list[str]:
    return sorted(p.name for p in (Path(logger.log_dir) / "embeddings").glob("*.png"))


def test_a_run_bounded_by_max_steps_gets_its_picture(tmp_path):
    """max_epochs=-1 with max_steps: no epoch is "the last" by count, and a run shorter than
    every_n_epochs ended without a picture."""
    plot, logger = CountingPlot(every_n_epochs=10), CSVLogger(tmp_path)
    trainer = quiet_trainer(max_epochs=-1, max_steps=8, logger=logger, callbacks=[plot])
    trainer.fit(FeatureModule(10), datamodule=FeatureData(clusters(30, 0), clusters(60, 1)))
    assert plot.steps == [8]  # 4 batches an epoch: the end of the second, the run's end
    assert csv_pngs(logger) == ["epoch=001.png"]


def test_validations_inside_an_epoch_draw_once_an_epoch(tmp_path):
    """val_check_interval=0.5 drew twice an epoch, the second picture over the first's file."""
    plot, logger = CountingPlot(every_n_epochs=1), CSVLogger(tmp_path)
    trainer = quiet_trainer(max_epochs=2, val_check_interval=0.5, logger=logger, callbacks=[plot])
    trainer.fit(FeatureModule(10), datamodule=FeatureData(clusters(32, 0), clusters(60, 1)))
    assert plot.steps == [4, 8]
    assert csv_pngs(logger) == ["epoch=000.png", "epoch=001.png"]


def test_validations_counted_in_steps_each_get_a_file(tmp_path):
    """check_val_every_n_epoch=None: validation every 3 steps across epochs, never at an
    epoch's end; each picture is kept, under its step."""
    plot, logger = CountingPlot(every_n_epochs=1), CSVLogger(tmp_path)
    trainer = quiet_trainer(
        max_steps=8,
        val_check_interval=3,
        check_val_every_n_epoch=None,
        logger=logger,
        callbacks=[plot],
    )
    trainer.fit(FeatureModule(10), datamodule=FeatureData(clusters(32, 0), clusters(60, 1)))
    assert plot.steps == [3, 6]
    assert csv_pngs(logger) == ["epoch=000-step=0000003.png", "epoch=001-step=0000006.png"]
