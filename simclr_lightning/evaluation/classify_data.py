"""What LinearEval checks and records of its data and checkpoints: single labelled views, the
class count, the evaluation preprocessing that prediction needs later, and whether a
checkpoint is a pretraining one."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from simclr_lightning.data.class_names import dataset_class_names
from simclr_lightning.errors import SettingError


def classify_data(datamodule, num_classes: int) -> tuple[list[str] | None, dict | None]:
    """The data's class names (checked against ``num_classes``) and evaluation preprocessing;
    refuses a data module that serves two views."""
    if getattr(datamodule, "task", "classify") != "classify":
        raise SettingError(
            "LinearEval trains on single labelled views: set data.task=classify "
            f"(got data.task={datamodule.task!r})"
        )
    names = dataset_class_names(datamodule)
    if names is not None and len(names) != num_classes:
        raise SettingError(
            f"model.num_classes={num_classes} but the data has "
            f"{len(names)} classes ({', '.join(names[:5])}...)"
        )
    aug = getattr(datamodule, "augmentation", None)
    preprocessing = None
    if aug is not None:
        preprocessing = {
            "image_size": aug.image_size,
            "mean": list(aug.mean),
            "std": list(aug.std),
            "resize_ratio": getattr(datamodule, "eval_resize_ratio", None),
        }
    return names, preprocessing


def is_pretraining(checkpoint: dict[str, Any]) -> bool:
    """A SimCLR (not LinearEval) checkpoint: it has a projection head and no classifier."""
    state = checkpoint.get("state_dict") or {}
    class_path = str((checkpoint.get("hyper_parameters") or {}).get("_class_path", ""))
    has_head = any(k.startswith("head.net.") for k in state)
    return class_path.endswith(".SimCLR") or (has_head and "head.weight" not in state)


def classify_batch(batch) -> tuple[Tensor, Tensor]:
    x, y = batch
    if isinstance(x, (tuple, list)):
        raise SettingError(
            "LinearEval got two views per image: set data.task=classify for linear evaluation"
        )
    return x, y
