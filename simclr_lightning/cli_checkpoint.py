"""Make checkpoints of models built in Python readable by LightningCLI's ``--ckpt_path``."""

from __future__ import annotations

from typing import Any

import lightning as L


def with_class_path(module: L.LightningModule, checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's hyperparameters with ``_class_path`` set (a copy; empty stays empty).

    LightningCLI parses saved hyperparameters against ``--model``; its own runs record the
    class path, models built in Python do not, and that parsing then fails.
    """
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    if hparams:
        hparams.setdefault("_class_path", f"{type(module).__module__}.{type(module).__qualname__}")
    return hparams
