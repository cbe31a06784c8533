"""``load_from_checkpoint`` that names the class a checkpoint is of: Lightning rebuilt the
model from another class's hyperparameters, and the first one that class refused was the
error (``model.head_layers=2 is invalid`` for a SimCLR checkpoint given to LinearEval)."""

from __future__ import annotations

import importlib
import inspect
import io
import sys
from typing import Any

import torch
from lightning.pytorch.utilities.model_helpers import _restricted_classmethod

from simclr_lightning.checkpoint_io import read_lazily
from simclr_lightning.errors import CheckpointError


class LoadsItsOwnCheckpoints:
    """Mixed into SimCLR and LinearEval, before ``LightningModule``."""

    @_restricted_classmethod  # Lightning's: called on an instance it raises, not loads nothing
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        hparams = refuse_other_class(cls, checkpoint_path)
        build = build_as(cls, hparams)
        if build is None:  # no way to keep the record from its **kwargs but to leave it out
            checkpoint_path, build = without_class_record(checkpoint_path), {}
        kwargs = build | kwargs  # the caller's own choices win
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)  # type: ignore[misc]


# LightningCLI's, which Lightning's load trusts: builds the class ``_class_path`` names
INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"


def build_as(cls: type, hparams: dict[str, Any]) -> dict[str, Any] | None:
    """The ``load_from_checkpoint`` arguments that build ``cls`` from a checkpoint whose
    ``_class_path`` is ``cls``'s or a base class of it (a user's subclass of SimCLR); None
    where only a copy of the checkpoint without that record can (:func:`without_class_record`).

    Lightning builds a checkpoint the CLI wrote through ``_instantiator``, which refuses any
    ``_class_path`` that is not ``cls`` or a subclass; without one it passes every saved
    hyperparameter, ``_class_path`` included, to an ``__init__`` that takes ``**kwargs``, and
    SimCLR's refuses it. So: a subclass of the recorded class is built by Lightning's plain
    rule (its ``__init__`` takes the hyperparameters it names), or, where it takes
    ``**kwargs``, by the instantiator told its own class path; a class it cannot name (one
    defined in a function, or recorded as another process's ``__main__``) from the copy."""
    saved = hparams.get("_class_path")
    if saved is None:
        return {}
    other = imported_class(saved)
    own = f"{cls.__module__}.{cls.__qualname__}"
    by_name = "<locals>" not in own  # a class in a function: no importable path
    takes_any = inspect.getfullargspec(cls.__init__).varkw is not None  # type: ignore[misc]
    if other is not None and other is not cls and issubclass(cls, other):
        if not takes_any:
            return {"_instantiator": None}
        return {"_instantiator": INSTANTIATOR, "_class_path": own} if by_name else None
    if not takes_any or (other is not None and "_instantiator" in hparams):
        return {}  # filtered out by Lightning, or the CLI's record of an imported class
    if other is cls and by_name:
        return {"_instantiator": INSTANTIATOR}  # _class_path is this library's record, no argument
    return None


def without_class_record(path: Any) -> Any:
    """The checkpoint at ``path`` as an in-memory file without ``_class_path`` and
    ``_instantiator`` in its hyperparameters (``path`` itself where it cannot be read here)."""
    checkpoint = read_lazily(path, "checkpoint_path")
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("hyper_parameters"), dict):
        return path
    hparams = dict(checkpoint["hyper_parameters"])
    for key in ("_class_path", "_instantiator"):
        hparams.pop(key, None)
    copy = io.BytesIO()
    torch.save({**checkpoint, "hyper_parameters": hparams}, copy)
    copy.seek(0)
    return copy


def refuse_other_class(cls: type, path: Any) -> dict[str, Any]:
    """Refuse a local checkpoint whose recorded class is neither ``cls`` nor related to it (a
    subclass of it, or it of that one: a user's subclass loads the library's checkpoints).
    Returns its hyperparameters ({} where it records none or is not a local file)."""
    try:
        checkpoint = read_lazily(path, "checkpoint_path")  # None: a stream, a remote URL
    except CheckpointError:
        return {}  # Lightning's own load says what it can
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    hparams = hparams if isinstance(hparams, dict) else {}
    saved = hparams.get("_class_path")
    other = imported_class(saved)
    if other is None or issubclass(other, cls) or issubclass(cls, other):
        return hparams
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
