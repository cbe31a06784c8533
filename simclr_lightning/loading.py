"""``load_from_checkpoint`` that names the class a checkpoint is of: Lightning rebuilt the
model from another class's hyperparameters, and the first one that class refused was the
error (``model.head_layers=2 is invalid`` for a SimCLR checkpoint given to LinearEval)."""

from __future__ import annotations

import importlib
import sys
from typing import Any

from lightning.pytorch.utilities.model_helpers import _restricted_classmethod

from simclr_lightning.checkpoint_io import read_lazily
from simclr_lightning.errors import CheckpointError


class LoadsItsOwnCheckpoints:
    """Mixed into SimCLR and LinearEval, before ``LightningModule``."""

    @_restricted_classmethod  # Lightning's: called on an instance it raises, not loads nothing
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        refuse_other_class(cls, checkpoint_path)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)  # type: ignore[misc]


def refuse_other_class(cls: type, path: Any) -> None:
    """Refuse a local checkpoint whose recorded class is neither ``cls`` nor related to it (a
    subclass of it, or it of that one: a user's subclass loads the library's checkpoints)."""
    try:
        checkpoint = read_lazily(path, "checkpoint_path")  # None: a stream, a remote URL
    except CheckpointError:
        return  # Lightning's own load says what it can
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    saved = (hparams or {}).get("_class_path")
    other = imported_class(saved)
    if other is None or issubclass(other, cls) or issubclass(cls, other):
        return
    fix = f"load it with {other.__name__}.load_from_checkpoint"
    if cls.__name__ == "LinearEval":
        fix += f"; to evaluate its encoder give it as LinearEval(checkpoint={str(path)!r})"
    raise CheckpointError(
        "checkpoint_path", path, f"is a checkpoint of {saved}, not of {cls.__name__}: {fix}"
    )


def class_of(class_path: str | None) -> type | None:
    """The class a dotted ``class_path`` names, or None when it cannot be imported."""
    module, _, name = (class_path or "").rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    return found if isinstance(found, type) else None


def imported_class(class_path: Any) -> type | None:
    """The class a checkpoint's ``class_path`` names among the modules already imported, or
    None: importing a module a file names would run its code (Lightning guards the same)."""
    module, _, name = class_path.rpartition(".") if isinstance(class_path, str) else ("", "", "")
    found = getattr(sys.modules.get(module), name, None) if module else None
    return found if isinstance(found, type) else None
