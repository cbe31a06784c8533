"""notebooks/quickstart.ipynb runs top to bottom on a CPU (nbclient) and draws its figures, in
its CPU run and in its GPU run's settings (``GPU_RUN = True``); the committed file carries no
outputs.

Each run here is one pretraining epoch and at most one linear-evaluation epoch
(``SIMCLR_NOTEBOOK_EPOCHS``): every cell and figure runs the same code, in a fraction of the
time; the accuracies the README quotes come from the notebook's default length."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simclr_lightning.data import sample_root
from tests.helpers import REPO, write_cifar_batches

NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
FIGURES = ["views", "curves", "embeddings", "retrieval", "predictions"]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_committed_notebook_has_no_outputs():
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


def run_notebook(notebook, folder: Path) -> str:
    """Execute ``notebook`` in ``folder`` (its working directory) and return its text output,
    once sure that every figure was drawn."""
    nbclient = pytest.importorskip("nbclient")
    client = nbclient.NotebookClient(
        notebook,
        timeout=1200,
        kernel_name="python3",
        resources={"metadata": {"path": str(folder)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    for name in FIGURES:
        image = np.asarray(
            Image.open(folder / "outputs" / "notebook" / "figures" / f"{name}.png").convert("RGB")
        )
        assert image.shape[0] > 150 and image.shape[1] > 300, name
        assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50, name  # not blank
    return "".join(
        out.get("text", "") for cell in notebook.cells for out in cell.get("outputs", [])
    )


@pytest.mark.slow
def test_notebook_runs_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("SIMCLR_NOTEBOOK_EPOCHS", "1")  # the kernel inherits the environment
    nbformat = pytest.importorskip("nbformat")
    text = run_notebook(nbformat.read(NOTEBOOK, as_version=4), tmp_path)
    assert "randomly initialised encoder" in text and "linear evaluation: top-1" in text
    assert "max_epochs=1` reached" in text  # the shortened run, not the default one
    assert "torch.float32" in text  # predicted probabilities


def write_cifar_stand_in(data_dir: Path, train_per_class: int, val_per_class: int) -> dict:
    """``cifar-10-batches-py/`` in torchvision's pickle format, written from the bundled
    sample's photographs (in a seeded random order, as in CIFAR's batches); returns the md5
    table that torchvision checks, of these files instead of the published ones."""

    def rows(split: str, per_class: int) -> tuple[np.ndarray, list[int]]:
        files = [sorted((sample_root() / split / name).iterdir())[:per_class] for name in CLASSES]
        items = [(path, label) for label, paths in enumerate(files) for path in paths]
        order = np.random.default_rng(0).permutation(len(items))
        pixels = [np.asarray(Image.open(items[i][0]).convert("RGB")) for i in order]
        labels = [items[i][1] for i in order]
        return np.stack(pixels).transpose(0, 3, 1, 2).reshape(len(labels), -1), labels

    train, train_labels = rows("train", train_per_class)
    parts = np.array_split(np.arange(len(train)), 5)
    batches = {
        f"data_batch_{b}": (train[part], [train_labels[i] for i in part])
        for b, part in enumerate(parts, start=1)
    }
    batches["test_batch"] = rows("val", val_per_class)
    return write_cifar_batches(data_dir / "cifar-10-batches-py", batches, CLASSES)


@pytest.mark.slow
def test_gpu_run_settings_run_on_a_cifar_stand_in(tmp_path, monkeypatch):
    """``GPU_RUN = True``, set as a user sets it, on the CPU: CIFARDataModule (images in
    arrays, no files: the views, retrieval and prediction cells must not need any), views made
    by GPUAugment on the device the run has, the official command's model and batch of 512.
    No CIFAR-10 pickles exist offline: data/ holds 600 training and 200 held-out images of the
    bundled sample in CIFAR-10's format, and a cell added first gives the kernel's torchvision
    their md5s (the only code the user's notebook lacks); one epoch."""
    monkeypatch.setenv("SIMCLR_NOTEBOOK_EPOCHS", "1")
    nbformat = pytest.importorskip("nbformat")
    md5s = write_cifar_stand_in(tmp_path / "data", train_per_class=60, val_per_class=20)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    (settings,) = [cell for cell in notebook.cells if "GPU_RUN = False" in cell.source]
    settings.source = settings.source.replace("GPU_RUN = False", "GPU_RUN = True", 1)
    checksums = "from torchvision import datasets\n" + "".join(
        f"datasets.CIFAR10.{name} = {value!r}\n" for name, value in md5s.items()
    )
    notebook.cells.insert(0, nbformat.v4.new_code_cell(checksums))
    text = run_notebook(notebook, tmp_path)
    assert f"600 training images, 200 held-out, classes: {CLASSES}" in text
    assert "max_epochs=1` reached" in text and "linear evaluation: top-1" in text
    predicted = (tmp_path / "outputs" / "notebook" / "to_predict").glob("*/*.png")
    classes = [path.parent.name for path in predicted]  # PNGs of the arrays, by class
    assert len(classes) == 6 and set(classes) <= set(CLASSES)
