"""Release 0.1's import paths keep working for one release, each with a DeprecationWarning."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest

import simclr_lightning
from simclr_lightning.cli import cli_main
from tests.helpers import REPO

# Every public name of 0.1's ``simclr_lightning`` (its __all__), written down from that release.
PUBLIC_0_1 = [
    "EmbeddingPlot", "KNNMonitor", "LinearEval", "OnlineLinearProbe", "PredictionWriter",
    "export_backbone", "knn_predict", "LARS", "CIFARDataModule", "ImageFolderDataModule",
    "MNISTDataModule", "NTXentLoss", "ProjectionHead", "SimCLR", "SimCLRAugmentation",
    "SimCLRDataModule", "build_resnet",
]  # fmt: skip

# (0.1 module, name, the module it lives in now), below simclr_lightning
MOVED = [
    ("knn", "KNNMonitor", "callbacks.knn_monitor"),
    ("knn", "knn_predict", "evaluation.knn"),
    ("knn", "RowCollector", "distributed"),
    ("linear_probe", "OnlineLinearProbe", "callbacks.linear_probe"),
    ("embedding_plot", "EmbeddingPlot", "callbacks.embedding_plot"),
    ("prediction", "PredictionWriter", "callbacks.prediction_writer"),
    ("linear_eval", "LinearEval", "evaluation.linear_eval"),
    ("linear_eval", "load_backbone_state", "checkpoint"),
    ("export", "export_backbone", "checkpoint"),
    ("cli_checkpoint", "with_class_path", "checkpoint"),
    ("transforms", "SimCLRAugmentation", "data.transforms"),
    ("gpu_augment", "GPUAugment", "data.gpu.augment"),
    ("gpu_augment", "sample_crop_boxes", "data.gpu.sampling"),
    ("gpu_augment", "adjust_hue", "data.gpu.functional"),
    ("device_data", "DeviceImageStore", "data.device_store"),
    ("encoded_images", "ImageBatch", "data.encoded"),
]  # fmt: skip


def test_every_public_name_of_0_1_is_still_exported():
    for name in PUBLIC_0_1:
        assert name in simclr_lightning.__all__ and hasattr(simclr_lightning, name), name


@pytest.mark.parametrize(("old", "name", "new"), MOVED, ids=[f"{o}.{n}" for o, n, _ in MOVED])
def test_old_path_warns_and_gives_the_same_object(old, name, new):
    old, new = f"simclr_lightning.{old}", f"simclr_lightning.{new}"
    module = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=rf"{old}\.{name} is deprecated.*{new}"):
        value = getattr(module, name)
    assert value is getattr(importlib.import_module(new), name)


def test_unknown_name_on_an_old_path_is_an_attribute_error():
    module = importlib.import_module("simclr_lightning.knn")
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        module.nothing  # noqa: B018


def test_old_export_command_still_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "simclr_lightning.export", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: simclr-lightning-export")
    assert "DeprecationWarning: simclr_lightning.export.main is deprecated" in proc.stderr


def test_old_class_path_in_a_config_still_builds_the_callback(cifar_tiny):
    args = ["--config", str(REPO / "configs" / "imagefolder.yaml"), "--data.root", str(cifar_tiny)]
    args += ["--trainer.accelerator=cpu", "--trainer.logger=false"]
    args += ["--trainer.callbacks+=simclr_lightning.knn.KNNMonitor"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = cli_main(args, run=False)
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)
    assert any(isinstance(c, simclr_lightning.KNNMonitor) for c in cli.trainer.callbacks)


def test_probing_an_old_module_for_dunders_warns_nothing():
    """``inspect`` (under ``torch.compile``) asks every loaded module for ``__file__``."""
    import importlib
    import warnings

    old = importlib.import_module("simclr_lightning.knn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not hasattr(old, "__file__")
