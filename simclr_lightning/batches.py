"""The shape of a SimCLR training batch, checked before any work: a loader of another library
(lightly's ``(views, targets, filenames)``), views without labels, or images with another
number of channels than the encoder takes fail in one clear line."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from simclr_lightning.errors import SettingError


def two_views(batch: Any) -> tuple[tuple[Tensor, Tensor], Tensor]:
    """``batch`` as ``((view_a, view_b), labels)``; any other shape (lightly's ``(views,
    targets, filenames)``, a dict, views without labels) is one clear error, not an unpacking
    error deep in the step or a convolution of two stacked views."""
    views = batch[0] if isinstance(batch, (tuple, list)) and len(batch) == 2 else None
    ok = isinstance(views, (tuple, list)) and len(views) == 2
    if not ok or not all(isinstance(v, Tensor) for v in (*views, batch[1])):
        raise TypeError(
            "SimCLR takes training batches ((view_a, view_b), labels) as this library's data "
            f"modules make them (labels -1 when unknown); got {_shape_of(batch)}"
        )
    return (views[0], views[1]), batch[1]


def _shape_of(batch: Any) -> str:
    if isinstance(batch, Tensor):
        return f"a tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, (tuple, list)):
        return f"({', '.join(_shape_of(b) for b in batch)})" if len(batch) <= 4 else "a long list"
    return type(batch).__name__


def check_channels(x: Tensor, expected: int | None, fix: str) -> None:
    """Refuse images of another number of channels than the encoder's (grayscale MNIST into
    an RGB stem), whose convolution would fail with a traceback, in one line with ``fix``.
    A shape read: no wait for the GPU."""
    if expected is None or x.ndim != 4 or x.shape[1] == expected:
        return
    raise SettingError(
        f"the images have {x.shape[1]} channel(s) but the encoder takes {expected}: {fix}"
    )
