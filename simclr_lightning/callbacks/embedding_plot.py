"""A picture of the validation embeddings, coloured by class: whether classes separate is
visible long before a linear evaluation is worth running."""

from __future__ import annotations

import colorsys
import importlib.util
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image, ImageDraw
from torch import Tensor

from simclr_lightning.callbacks.validation_due import validation_due, within_epoch
from simclr_lightning.data.class_names import dataset_class_names
from simclr_lightning.distributed import RowCollector, validation_loader
from simclr_lightning.errors import require

Projection = Literal["pca", "tsne"]

# matplotlib's tab10, then evenly spaced hues for more classes; grey for unlabeled (-1).
TAB10 = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]  # fmt: skip
UNLABELED = (190, 190, 190)


def class_colour(label: int) -> tuple[int, int, int]:
    if label < 0:
        return UNLABELED
    if label < len(TAB10):
        return TAB10[label]
    r, g, b = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.65, 0.85)
    return int(r * 255), int(g * 255), int(b * 255)


def pca_2d(features: Tensor) -> Tensor:
    """Coordinates on the first two principal components. Randomised SVD oversampled to 32
    directions (near exact, and cheap for 2,000 x 2,048 features), with a private seed: the
    training run's random stream is left alone and the same features give the same picture."""
    x = features.detach().double().cpu()
    if x.shape[1] < 2 or len(x) < 3:
        return torch.zeros(len(x), 2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        _, _, v = torch.pca_lowrank(x, q=min(32, *x.shape), center=True, niter=6)
    return ((x - x.mean(dim=0)) @ v[:, :2]).float()


def tsne_2d(features: Tensor, seed: int = 0) -> Tensor:
    """scikit-learn's t-SNE (cosine distances, PCA initialisation, a fixed seed): neighbourhoods
    kept, distances between clusters not."""
    from sklearn.manifold import TSNE

    x = features.detach().double().cpu().numpy()
    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
    tsne = TSNE(2, perplexity=perplexity, metric="cosine", init="pca", random_state=seed)
    return torch.from_numpy(tsne.fit_transform(x)).float()


def project_2d(features: Tensor, projection: Projection = "pca") -> Tensor:
    """2-D coordinates of L2-normalised features: SimCLR compares features by cosine, so the
    direction is what carries the class, not the length (raw post-ReLU features all lie in
    one orthant, and their PCA is a one-sided fan dominated by feature norms)."""
    unit = F.normalize(features.detach().double(), dim=1)
    return tsne_2d(unit) if projection == "tsne" else pca_2d(unit)


def render_scatter(
    points: Tensor,
    labels: Tensor,
    class_names: list[str] | None = None,
    size: int = 512,
    title: str = "",
) -> Image.Image:
    """An RGB scatter plot with a legend, drawn with PIL (no plotting library needed)."""
    legend_width = 130 if class_names or len(labels) else 0
    image = Image.new("RGB", (size + legend_width, size), "white")
    draw = ImageDraw.Draw(image)
    margin = 24
    pts = points.double()
    if len(pts):
        low, high = pts.min(dim=0).values, pts.max(dim=0).values
        span = (high - low).clamp_min(1e-12)
        xy = margin + (pts - low) / span * (size - 2 * margin)
        xy[:, 1] = size - xy[:, 1]  # y grows upwards, as in a plot
        for (x, y), label in zip(xy.tolist(), labels.tolist(), strict=True):
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=class_colour(int(label)))
    draw.rectangle(
        (margin // 2, margin // 2, size - margin // 2, size - margin // 2), outline=(200, 200, 200)
    )
    if title:
        draw.text((margin, 4), title, fill="black")
    present = sorted({int(v) for v in labels.tolist()})
    for row, label in enumerate(present[:40]):
        name = (
            "unlabeled"
            if label < 0
            else (class_names[label] if class_names and label < len(class_names) else str(label))
        )
        y = margin + 14 * row
        draw.rectangle((size + 4, y, size + 12, y + 8), fill=class_colour(label))
        draw.text((size + 16, y - 2), name[:18], fill="black")
    return image


class EmbeddingPlot(L.Callback):
    """Every ``every_n_epochs`` (at the epoch's end; at the run's last validation; in a
    ``validate`` run), a 2-D
    scatter of up to ``max_points`` validation features (``validation_step``'s ``features``,
    dataloader 0, gathered over ranks), L2-normalised, coloured by class, logged as an image to
    each active logger: TensorBoard
    ``add_image``, W&B ``log_image``, any other logger with a ``log_dir`` (CSV) gets
    ``<log_dir>/embeddings/epoch=NNN.png`` (``epoch=NNN-step=SSSSSSS.png`` for a validation
    inside an epoch, when validation is counted in steps). The last picture is kept in
    ``self.image`` (a PIL image), its coordinates and labels in ``self.points`` /
    ``self.labels``.

    Args:
        projection: ``pca`` (linear, fast, shows global spread) or ``tsne`` (scikit-learn's
            t-SNE: local neighbourhoods, slower; needs ``pip install scikit-learn``).
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        max_points: int = 2000,
        size: int = 512,
        tag: str = "embeddings/val",
        projection: Projection = "pca",
    ) -> None:
        require(every_n_epochs >= 1, "EmbeddingPlot.every_n_epochs", every_n_epochs, ">= 1")
        require(max_points >= 3, "EmbeddingPlot.max_points", max_points, ">= 3")
        require(
            projection in ("pca", "tsne"), "EmbeddingPlot.projection", projection, "pca or tsne"
        )
        require(
            projection != "tsne" or importlib.util.find_spec("sklearn") is not None,
            "EmbeddingPlot.projection",
            projection,
            "pca unless scikit-learn is installed (pip install scikit-learn)",
        )
        self.projection = projection
        self.points: Tensor | None = None
        self.labels: Tensor | None = None
        self.every_n_epochs = every_n_epochs
        self.max_points = max_points
        self.size = size
        self.tag = tag
        self.rows = RowCollector()
        self.active = False
        self.image: Image.Image | None = None

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.rows.reset()
        # outside fit (``validate``) the picture is what was asked for, whatever the epoch
        self.active = validation_due(trainer, self.every_n_epochs)

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if not self.active or dataloader_idx != 0 or not isinstance(outputs, dict):
            return
        if "features" in outputs and "labels" in outputs:
            loader = validation_loader(trainer, dataloader_idx)
            self.rows.add(loader, batch_idx, outputs["features"], outputs["labels"])

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self.active:
            return
        self.active = False
        features, labels = self.rows.gather(trainer, pl_module.device)
        self.rows.reset()
        if len(features) < 3:
            return
        if len(features) > self.max_points:
            pick = torch.randperm(len(features), generator=torch.Generator().manual_seed(0))
            pick = pick[: self.max_points].to(features.device)
            features, labels = features[pick], labels[pick]
        self._plot(trainer, features, labels.cpu())

    @rank_zero_only
    def _plot(self, trainer: L.Trainer, features: Tensor, labels: Tensor) -> None:
        points = project_2d(features, self.projection)  # rank 0 only: the others would drop it
        self.points, self.labels = points, labels
        epoch = trainer.current_epoch
        # The step Lightning logs this epoch's validation metrics at: the picture lines up.
        step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
        # a validation inside the epoch gets its own file (named as ModelCheckpoint would),
        # not the end-of-epoch one's name
        when = f"epoch={epoch:03d}"
        if trainer.state.fn == "fit" and within_epoch(trainer):
            when += f"-step={trainer.global_step:07d}"
        names = dataset_class_names(trainer.datamodule)
        method = "t-SNE" if self.projection == "tsne" else "PCA"
        title = f"{self.tag}  {when}  ({method} of unit features, {len(points)} points)"
        self.image = render_scatter(points, labels, names, self.size, title)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                chw = torch.from_numpy(np.array(self.image)).permute(2, 0, 1)
                logger.experiment.add_image(self.tag, chw, global_step=step)
            elif isinstance(logger, WandbLogger):
                logger.log_image(key=self.tag, images=[self.image], step=step)
            elif getattr(logger, "log_dir", None):
                out = Path(logger.log_dir) / "embeddings" / f"{when}.png"
                out.parent.mkdir(parents=True, exist_ok=True)
                self.image.save(out)
