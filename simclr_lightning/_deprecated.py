"""Module paths of release 0.1, from before the package was split into ``data/``, ``callbacks/``
and ``evaluation/``. They stay importable for one more release, with a DeprecationWarning, so
configs and scripts that name them (``simclr_lightning.knn.KNNMonitor``) keep working.

One import hook serves them all instead of a stub file per old module, so the package's tree
shows only where things live now.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from typing import Any

# old module -> the modules its names now live in, searched in order
MOVED: dict[str, tuple[str, ...]] = {
    "simclr_lightning.knn": (
        "simclr_lightning.callbacks.knn_monitor",
        "simclr_lightning.evaluation.knn",
        "simclr_lightning.distributed",
    ),
    "simclr_lightning.linear_probe": ("simclr_lightning.callbacks.linear_probe",),
    "simclr_lightning.embedding_plot": ("simclr_lightning.callbacks.embedding_plot",),
    "simclr_lightning.prediction": ("simclr_lightning.callbacks.prediction_writer",),
    "simclr_lightning.linear_eval": (
        "simclr_lightning.evaluation.linear_eval",
        "simclr_lightning.checkpoint",
    ),
    "simclr_lightning.export": ("simclr_lightning.checkpoint",),
    "simclr_lightning.cli_checkpoint": ("simclr_lightning.checkpoint",),
    "simclr_lightning.transforms": ("simclr_lightning.data.transforms",),
    "simclr_lightning.gpu_augment": (
        "simclr_lightning.data.gpu.augment",
        "simclr_lightning.data.gpu.functional",
        "simclr_lightning.data.gpu.sampling",
    ),
    "simclr_lightning.device_data": ("simclr_lightning.data.device_store",),
    "simclr_lightning.encoded_images": ("simclr_lightning.data.encoded",),
}

REMOVAL = "0.3.0"

# What an old module runs: attribute access is forwarded; ``python -m simclr_lightning.export``
# runs the new entry point.
_SHIM = """
from simclr_lightning._deprecated import moved_attribute as _moved


def __getattr__(name):
    return _moved(__spec__.name, name)


if __name__ == "__main__":
    _moved(__spec__.name, "main", stacklevel=2)()
"""


def moved_attribute(old_module: str, name: str, stacklevel: int = 3) -> Any:
    """``old_module.name`` from where it lives now, with a DeprecationWarning naming that.
    Module dunders (``__file__``, which ``inspect`` and ``torch.compile`` probe on every loaded
    module) are not forwarded: the old module simply has none."""
    if name.startswith("__") and name.endswith("__"):
        raise AttributeError(f"module {old_module!r} has no attribute {name!r}")
    for new_module in MOVED[old_module]:
        module = importlib.import_module(new_module)
        if hasattr(module, name):
            value = getattr(module, name)
            home = getattr(value, "__module__", None) or new_module  # where it is defined
            top = " (or simclr_lightning)" if hasattr(sys.modules["simclr_lightning"], name) else ""
            warnings.warn(
                f"{old_module}.{name} is deprecated and removed in {REMOVAL}: import it from "
                f"{home}{top}",
                DeprecationWarning,
                stacklevel=stacklevel,
            )
            return value
    raise AttributeError(f"module {old_module!r} has no attribute {name!r}")


class _OldModuleLoader(importlib.abc.InspectLoader):
    def is_package(self, fullname: str) -> bool:
        return False

    def get_source(self, fullname: str) -> str:
        return _SHIM


class _OldModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, _OldModuleLoader())


def install() -> None:
    """Put the hook last on ``sys.meta_path``: only names no real file answers reach it."""
    if not any(isinstance(f, _OldModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(_OldModuleFinder())
