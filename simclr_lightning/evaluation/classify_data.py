"""What LinearEval checks and records of its data and checkpoints: single labelled views, the
class count, the evaluation preprocessing that prediction needs later (and its normalisation
against pretraining's), and whether a checkpoint is a pretraining one."""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from simclr_lightning.data.class_names import dataset_class_names
from simclr_lightning.data.transforms import preprocessing_of
from simclr_lightning.errors import SettingError


def classify_data(
    datamodule, num_classes: int, pretraining: dict[str, Any]
) -> tuple[list[str] | None, dict | None]:
    """The data's class names (checked against ``num_classes``) and evaluation preprocessing
    (its normalisation checked against ``pretraining``'s, a checkpoint's
    :func:`~simclr_lightning.checkpoint.pretraining_record`); refuses a data module that serves
    two views."""
    if getattr(datamodule, "task", "classify") != "classify":
        raise SettingError(
            "LinearEval trains on single labelled views: set data.task=classify "
            f"(got data.task={datamodule.task!r})"
        )
    names = dataset_class_names(datamodule)
    if names is not None and len(names) != num_classes:
        raise SettingError(
            f"model.num_classes={num_classes} but the data has {len(names)} classes "
            f"({listed(names)}): set --model.num_classes {len(names)}"
        )
    preprocessing = preprocessing_of(datamodule)
    check_normalisation(pretraining, preprocessing)
    return names, preprocessing


def listed(names: list[str], shown: int = 5) -> str:
    """The first ``shown`` names, and how many more: an ellipsis after a complete list read as
    classes left out."""
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


def check_normalisation(pretraining: dict[str, Any], here: dict | None) -> None:
    """Warn when linear evaluation normalises its images otherwise than pretraining did: the
    frozen encoder (its BatchNorm statistics too) then sees every input shifted from those it
    learned on, and the accuracy drops with no error. Nothing to compare when either side
    is unknown (a checkpoint from before the record, a user's own loaders)."""
    pretrained = pretraining.get("preprocessing")
    if not pretrained or not here:
        return
    saved, given = pretrained["mean"] + pretrained["std"], here["mean"] + here["std"]
    if len(saved) == len(given) and all(
        math.isclose(a, b, abs_tol=1e-6) for a, b in zip(saved, given, strict=True)
    ):
        return
    rank_zero_warn(
        f"model.checkpoint={pretraining.get('checkpoint')!r} was pretrained on images "
        f"normalised with mean={_rounded(pretrained['mean'])} std={_rounded(pretrained['std'])}, "
        f"but the data normalises with mean={_rounded(here['mean'])} std={_rounded(here['std'])}"
        f": the encoder sees inputs unlike those it learned on; set data.augmentation.mean and "
        f"data.augmentation.std to pretraining's",
        category=UserWarning,
    )


def _rounded(values: list[float]) -> list[float]:
    return [round(v, 4) for v in values]


def is_pretraining(checkpoint: dict[str, Any]) -> bool:
    """A SimCLR (not LinearEval) checkpoint: it has a projection head and no classifier."""
    state = checkpoint.get("state_dict") or {}
    class_path = str((checkpoint.get("hyper_parameters") or {}).get("_class_path", ""))
    has_head = any(k.startswith("head.net.") for k in state)
    return class_path.endswith(".SimCLR") or (has_head and "head.weight" not in state)


def refuse_pretraining(checkpoint: dict[str, Any], path: Any) -> None:
    """Refuse a SimCLR checkpoint given as LinearEval's ``--ckpt_path`` (before its weights
    load): it would resume SimCLR's epoch and step, training nothing, or fail deep inside
    Lightning."""
    if "linear_eval" not in checkpoint and is_pretraining(checkpoint):
        raise SettingError(
            f"ckpt_path={str(path)!r} is a SimCLR pretraining checkpoint, not a LinearEval "
            f"one: give it as --model.checkpoint (the encoder to evaluate); --ckpt_path "
            f"resumes or evaluates a LinearEval run"
        )


def classify_batch(batch) -> tuple[Tensor, Tensor]:
    x, y = batch
    if isinstance(x, (tuple, list)):
        raise SettingError(
            "LinearEval got two views per image: set data.task=classify for linear evaluation"
        )
    return x, y.long()  # cross_entropy takes int64 targets, a user's dataset may give int32
