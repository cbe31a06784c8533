"""The class names a data module's datasets carry, for evaluation and plots."""

from __future__ import annotations

from torch.utils.data import Subset


def dataset_class_names(datamodule) -> list[str] | None:
    """Class names of a data module's datasets (an ImageFolder's ``classes``), if it has any."""
    for attr in ("train_set", "val_set"):
        dataset = getattr(datamodule, attr, None)
        while isinstance(dataset, Subset):  # a labelled subset (data.label_fraction)
            dataset = dataset.dataset
        names = getattr(dataset, "classes", None)
        if names:
            return [str(n) for n in names]
    return None


def says_unlabeled(datamodule) -> bool:
    """The data module has a ``num_classes`` and it is None: it holds no class labels (an image
    folder without class folders). One without the attribute says nothing either way."""
    return hasattr(datamodule, "num_classes") and datamodule.num_classes is None
