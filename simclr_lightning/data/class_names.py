"""The class names a data module's datasets carry, for evaluation and plots."""

from __future__ import annotations


def dataset_class_names(datamodule) -> list[str] | None:
    """Class names of a data module's datasets (an ImageFolder's ``classes``), if it has any."""
    for attr in ("train_set", "val_set"):
        names = getattr(getattr(datamodule, attr, None), "classes", None)
        if names:
            return [str(n) for n in names]
    return None
