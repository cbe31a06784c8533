"""notebooks/quickstart.ipynb runs top to bottom on a CPU (nbclient) and draws its figures;
the committed file carries no outputs.

The run here is one pretraining epoch and one linear-evaluation epoch instead of 4 and 3
(``SIMCLR_NOTEBOOK_EPOCHS``): every cell and figure runs the same code, in a third of the time;
the accuracies the README quotes come from the notebook's default length."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.helpers import REPO

NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
FIGURES = ["views", "curves", "embeddings", "retrieval", "predictions"]


def test_committed_notebook_has_no_outputs():
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


@pytest.mark.slow
def test_notebook_runs_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("SIMCLR_NOTEBOOK_EPOCHS", "1")  # the kernel inherits the environment
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=1200,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    text = "".join(
        out.get("text", "") for cell in notebook.cells for out in cell.get("outputs", [])
    )
    assert "randomly initialised encoder" in text and "linear evaluation: top-1" in text
    assert "max_epochs=1` reached" in text  # the shortened run, not the default one
    assert "torch.float32" in text  # predicted probabilities
    for name in FIGURES:
        image = np.asarray(
            Image.open(tmp_path / "outputs" / "notebook" / "figures" / f"{name}.png").convert("RGB")
        )
        assert image.shape[0] > 150 and image.shape[1] > 300, name
        assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50, name  # not blank
