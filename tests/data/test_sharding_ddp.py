"""The library's own training loaders under real 2-process DDP (gloo), sharded by its
ResumableSampler (a DistributedSampler, which Lightning keeps): each epoch the ranks' shards are
disjoint and together hold every image once, and they are reshuffled every epoch, on every data
path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.ddp_helpers import run_ddp_script_runs

N_IMAGES, WORLD, BATCH, EPOCHS = 48, 2, 4, 3


@pytest.fixture(scope="module")
def one_image_per_class(tmp_path_factory) -> Path:
    """48 class folders of one 8x8 image each: the label a batch carries is the image's id."""
    root = tmp_path_factory.mktemp("ids")
    gen = np.random.default_rng(0)
    for i in range(N_IMAGES):
        folder = root / "train" / f"c{i:02d}"
        folder.mkdir(parents=True)
        pixels = gen.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "img.png")
    return root


PATHS = {
    "gpu-resident": ["--augment", "gpu", "--resident"],
    "gpu-decoded-batches": ["--augment", "gpu"],
    "cpu": ["--augment", "cpu"],
}


@pytest.fixture(scope="module")
def steps_by_path(one_image_per_class, tmp_path_factory) -> dict[str, list[list[dict]]]:
    """Every data path's run, one after the other in one launch of the 2 processes."""
    args = ["--root", str(one_image_per_class), "--epochs", str(EPOCHS)]
    args += ["--batch-size", str(BATCH)]
    out = tmp_path_factory.mktemp("sharding") / "out"
    runs = run_ddp_script_runs("ddp_data_script.py", WORLD, out, PATHS, *args)
    for results in runs.values():
        assert [r["world"] for r in results] == [WORLD] * WORLD
    return {name: [r["steps"] for r in results] for name, results in runs.items()}


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
def test_shards_are_disjoint_complete_and_reshuffled(steps_by_path, path):
    per_rank = steps_by_path[path]
    for steps in per_rank:
        assert len(steps) == EPOCHS * N_IMAGES // (WORLD * BATCH)
        for step in steps:  # both views were made, at the configured size
            assert step["view_shape"] == (BATCH, 3, 8, 8) and step["view_dtype"] == "torch.float32"
            assert step["views_differ"]

    def shard(rank: int, epoch: int) -> list[int]:
        return [i for s in per_rank[rank] if s["epoch"] == epoch for i in s["ids"]]

    for epoch in range(EPOCHS):
        shards = [shard(r, epoch) for r in range(WORLD)]
        assert all(len(s) == len(set(s)) == N_IMAGES // WORLD for s in shards)
        assert not set(shards[0]) & set(shards[1])  # disjoint
        assert sorted(shards[0] + shards[1]) == list(range(N_IMAGES))  # complete
    for rank in range(WORLD):
        orders = [tuple(shard(rank, e)) for e in range(EPOCHS)]
        assert len(set(orders)) == EPOCHS  # a new order every epoch...
        assert len({frozenset(o) for o in orders}) > 1  # ...and a new subset, not a fixed split
