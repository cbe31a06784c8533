"""Probe and kNN metrics under real 2-process DDP (gloo) equal one process on the same data."""

from __future__ import annotations

import pytest
import torch

from simclr_lightning.evaluation.knn import sharded_knn_predict
from tests.ddp_helpers import run_ddp_script, run_ddp_script_runs
from tests.ddp_monitor_script import CLASSES


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> dict[str, list[dict]]:
    """The 2-process runs with a float32 and a float16 bank, in one launch."""
    runs = {"float32": [], "float16": ["--bank-dtype", "float16"]}
    out = tmp_path_factory.mktemp("monitors") / "2dev"
    return run_ddp_script_runs("ddp_monitor_script.py", 2, out, runs)


def whole_bank_scores(ranks: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """The ranks' shards put together, scored by one process holding the whole bank the same
    way (same stored dtype): the sharded kNN must give exactly this."""
    shards = [r["knn"] for r in ranks]
    index = torch.cat([s["shard_index"] for s in shards])
    order = index.argsort()
    bank = torch.cat([s["shard"] for s in shards])[order]
    labels = torch.cat([s["shard_labels"] for s in shards])[order]
    scores = sharded_knn_predict(shards[0]["query"], bank, labels, index[order], CLASSES, k=10)
    return scores, index[order]


@pytest.mark.slow
def test_probe_and_knn_under_ddp_equal_single_process(tmp_path, two_processes):
    (single,) = run_ddp_script("ddp_monitor_script.py", 1, tmp_path / "1dev")
    ranks = two_processes["float32"]
    assert [r["knn"]["shard"].dtype for r in ranks] == [torch.float32] * 2
    assert [r["world"] for r in ranks] == [2, 2]
    names = ["probe/val_top1", "probe/val_top5", "knn/val_top1", "knn/val_top5"]
    names += ["probe/train_loss", "probe/train_top1"]
    assert set(names) <= single["metrics"].keys()

    # kNN: every rank scores exactly the single process's queries, in the same order, without
    # the padding repeats (36 labelled of 37 val images, 40 of 41 bank images) ...
    ref = single["knn"]
    assert len(ref["query"]) == 36 and len(ref["shard"]) == 40
    for r in ranks:
        torch.testing.assert_close(r["knn"]["query"], ref["query"], rtol=1e-4, atol=1e-5)
    # ... against its own half of the bank (rank 0: the 21 even positions of 41; rank 1 the
    # odd ones but the unlabelled image 7): together the shards are the single bank
    assert [len(r["knn"]["shard"]) for r in ranks] == [21, 19]
    scores, index = whole_bank_scores(ranks)
    assert torch.equal(index, ref["shard_index"])
    for r in ranks:
        # merged per-rank top-k = one process with the whole bank (to float rounding only)
        torch.testing.assert_close(r["knn"]["scores"], scores, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(r["knn"]["scores"], ref["scores"], rtol=1e-4, atol=1e-4)

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


@pytest.mark.slow
def test_half_precision_knn_bank_under_ddp_equals_whole_bank(two_processes):
    ranks = two_processes["float16"]
    assert [r["knn"]["shard"].dtype for r in ranks] == [torch.float16] * 2
    scores, _ = whole_bank_scores(ranks)
    for r in ranks:
        torch.testing.assert_close(r["knn"]["scores"], scores, rtol=1e-6, atol=1e-6)
        top1 = (scores.argmax(1) == r["knn"]["query_labels"]).float().mean()
        assert r["metrics"]["knn/val_top1"] == pytest.approx(top1.item(), abs=1e-6)


def test_sigterm_to_rank_1_alone_in_the_bank_pass_cuts_it_short_on_every_rank(tmp_path):
    """Rank 1 alone is signalled while it reads its second bank batch (item 13: rank r reads
    r, r + 2, ... of the unshuffled bank). Both ranks cut the pass at that batch, log no kNN
    figure, stop after the epoch's last step and save it once. And no step broadcast
    Lightning's SIGTERM flag (a wait for the GPU per step under NCCL): the agreement did."""
    out = tmp_path / "run"
    ranks = run_ddp_script("ddp_signal_script.py", 2, out, "--rank", "1", "--at", "13")
    for r, result in enumerate(ranks):
        assert result["read"] == list(range(r, 16, 2))  # batches 0 and 1 of 5, no more
        assert result["stopped"] and not result["knn_logged"]
        assert result["global_step"] == 5  # epoch 0 of 2
        counts = result["broadcasts"]
        assert len(counts) == 6 and len(set(counts)) == 1  # none during the 5 steps
    saved = torch.load(out / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 5
