"""LinearEval under real 2-process DDP (gloo) equals one process holding both processes'
batches: the classifier it trains and every figure it logs, even where the processes hold
different numbers of labelled rows (training) or images (validation, with
DistributedSampler's padding repeat)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.ddp_helpers import run_ddp_script
from tests.ddp_linear_eval_script import EPOCHS, STEPS


def reference_val_figures(run: dict) -> dict[str, float]:
    """Top-1, top-5 and mean cross-entropy over the labelled validation images, in float64
    from the saved features and classifier."""
    keep = run["val_labels"] >= 0
    x, y = run["val_features"][keep].double(), run["val_labels"][keep]
    head = run["head"]
    logits = x @ head["weight"].double().T + head["bias"].double()
    top5 = logits.topk(5, dim=1).indices
    return {
        "val/top1": (top5[:, 0] == y).double().mean().item(),
        "val/top5": (top5 == y[:, None]).any(1).double().mean().item(),
        "val/loss": F.cross_entropy(logits, y).item(),
    }


@pytest.mark.slow
def test_two_processes_train_and_report_as_one_holding_both_batches(tmp_path):
    (single,) = run_ddp_script("ddp_linear_eval_script.py", 1, tmp_path / "1dev")
    ranks = run_ddp_script("ddp_linear_eval_script.py", 2, tmp_path / "2dev")
    assert [r["world"] for r in ranks] == [2, 2] and single["world"] == 1
    assert single["steps"] == STEPS * EPOCHS and [r["steps"] for r in ranks] == [6, 6]
    for run in (single, *ranks):  # model.lr_scaling=linear on the global batch of 12
        assert run["peak_lr"] == pytest.approx([0.5, 0.5], rel=1e-12)

    # The classifier: the same on both ranks, and the single process's (a mean per process
    # would weigh each rank's labelled rows by how few it holds).
    for name, weight in single["head"].items():
        assert torch.equal(ranks[0]["head"][name], ranks[1]["head"][name])
        torch.testing.assert_close(ranks[0]["head"][name], weight, rtol=1e-5, atol=1e-6)

    names = ["train/loss_epoch", "train/top1", "val/top1", "val/top5", "val/loss"]
    assert set(names) <= single["metrics"].keys()
    for name in names:
        for r in ranks:
            assert r["metrics"][name] == pytest.approx(single["metrics"][name], abs=1e-5), name

    # Validation and test (the same images) against a float64 reference over the 36
    # labelled images, counted once each.
    for run in (single, *ranks):
        for name, value in reference_val_figures(run).items():
            assert run["metrics"][name] == pytest.approx(value, abs=1e-5), name
            test_name = name.replace("val/", "test/")
            assert run["metrics"][test_name] == pytest.approx(value, abs=1e-5), test_name
    assert 0 < single["metrics"]["val/top1"] < single["metrics"]["val/top5"] < 1
