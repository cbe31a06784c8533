"""Probe and kNN metrics under real 2-process DDP (gloo) equal one process on the same data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.ddp_helpers import run_ddp_script


def run(tmp_path: Path, devices: int) -> list[dict]:
    return run_ddp_script("ddp_monitor_script.py", devices, tmp_path / f"{devices}dev")


@pytest.mark.slow
def test_probe_and_knn_under_ddp_equal_single_process(tmp_path):
    (single,) = run(tmp_path, devices=1)
    ranks = run(tmp_path, devices=2)
    assert [r["world"] for r in ranks] == [2, 2]
    names = ["probe/val_top1", "probe/val_top5", "knn/val_top1", "knn/val_top5"]
    names += ["probe/train_loss", "probe/train_top1"]
    assert set(names) <= single["metrics"].keys()

    # kNN: every rank scores exactly the single process's query and bank, in the same order,
    # without the padding repeats (36 labelled of 37 val images, 40 of 41 bank images).
    ref = single["knn_inputs"]
    assert len(ref["query"]) == 36 and len(ref["bank"]) == 40
    for r in ranks:
        got = r["knn_inputs"]
        torch.testing.assert_close(got["query"], ref["query"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got["bank"], ref["bank"], rtol=1e-4, atol=1e-5)
        assert torch.equal(got["bank_labels"], ref["bank_labels"])

    # Probe: identical on both ranks, equal to the single-process probe.
    assert single["probe_steps"] == 2 and [r["probe_steps"] for r in ranks] == [2, 2]
    for name, weight in single["probe"].items():
        assert torch.equal(ranks[0]["probe"][name], ranks[1]["probe"][name])
        torch.testing.assert_close(ranks[0]["probe"][name], weight, rtol=1e-4, atol=1e-5)

    for name in names:
        for r in ranks:
            assert r["metrics"][name] == pytest.approx(single["metrics"][name], abs=1e-5), name

    # KNNReport encodes every held-out and bank image once over both ranks, before and after.
    assert single["report"]["queries"] == 36 and single["report"]["bank"] == 40
    for r in ranks:
        for key, value in single["report"].items():
            assert r["report"][key] == pytest.approx(value, abs=1e-6), key
