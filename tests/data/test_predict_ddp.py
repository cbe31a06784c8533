"""``trainer.predict`` under real 2-process DDP (gloo) over an image folder whose images do not
fill the same number of batches on both ranks (Lightning does not pad prediction shards): it
finishes, and the two ranks together predict every image once, as one process does."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.ddp_helpers import launch, run_ddp_script
from tests.ddp_predict_script import BATCH, CLASSES, N_IMAGES, model, predict

WORLD = 2


@pytest.fixture
def uneven_folder(tmp_path) -> Path:
    """9 random 16x16 images in val/ (and a few in train/): 5 for rank 0, 4 for rank 1."""
    gen = np.random.default_rng(0)
    for split, n in (("train", CLASSES), ("val", N_IMAGES)):
        for i in range(n):
            folder = tmp_path / "data" / split / f"c{i % CLASSES}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(gen.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                folder / f"{i}.png"
            )
    return tmp_path / "data"


@pytest.mark.slow
def test_uneven_shards_predict_every_image_once_as_one_process(uneven_folder, tmp_path):
    assert N_IMAGES % (WORLD * BATCH)  # the case under test: ranks with unequal batches
    ranks = run_ddp_script(
        "ddp_predict_script.py", WORLD, tmp_path / "out", "--root", str(uneven_folder)
    )
    assert [r["world"] for r in ranks] == [WORLD] * WORLD
    assert [r["batches"] for r in ranks] == [2, 1]

    indices = [i for r in ranks for i in r["indices"]]
    assert sorted(indices) == list(range(N_IMAGES))  # every image, once

    single = model()
    single.load_state_dict(ranks[0]["state_dict"])
    reference = predict(single, str(uneven_folder), devices=1)
    assert reference.indices == list(range(N_IMAGES))
    expected = torch.cat(reference.predictions)
    assert expected.shape == (N_IMAGES, CLASSES)
    assert len({tuple(row) for row in expected.tolist()}) == N_IMAGES  # one row per image
    got = torch.cat([r["predictions"] for r in ranks])
    torch.testing.assert_close(got, expected[indices], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [
        # rank 0 predicts for 2 x 4 s, past the process group's 5 s timeout
        ["--slow-rank0", "4"],
        ["--files"],  # ImageFilesDataModule, the README's predict command's data module
    ],
)
def test_a_corrupt_file_on_rank_1_fails_every_rank(uneven_folder, tmp_path, options):
    """A prediction batch is read by one process alone (no padded shards, no per-batch
    agreement): rank 1 raised on its corrupt file while rank 0 finished, wrote its predictions
    and exited 0, so a script saw success with half the images missing. Now rank 1 waits,
    however long rank 0 takes, and both fail naming the file, leaving no predictions file."""
    from torchvision import datasets

    # Lightning's unpadded predict shards: rank r gets the images r, r + 2, ... in folder order
    bad = Path(datasets.ImageFolder(str(uneven_folder / "val")).samples[3][0])
    bad.write_bytes(b"not a png")
    out = tmp_path / "out"
    out.mkdir()
    csv = out / "predictions.csv"
    args = ["--root", str(uneven_folder), "--csv", str(csv), *options]
    proc = launch("ddp_predict_script.py", WORLD, out, args)
    assert proc.returncode != 0
    assert f"{bad}" in proc.stderr and "read by process 1 of 2" in proc.stderr
    assert "Timed out" not in proc.stderr
    assert not list(out.iterdir())  # no rank went on as if it had succeeded


@pytest.mark.slow
def test_any_failure_of_one_rank_ends_predict_on_every_rank(uneven_folder, tmp_path):
    """The end-of-predict agreement joined only for a bad file: a rank failing otherwise
    never came, and the others waited in it for a day."""
    out = tmp_path / "out"
    out.mkdir()
    args = ["--root", str(uneven_folder), "--csv", str(out / "p.csv"), "--fail-rank1", "--files"]
    started = time.monotonic()
    proc = launch("ddp_predict_script.py", WORLD, out, args, timeout=120)
    assert proc.returncode != 0 and time.monotonic() - started < 120
    assert "process 1 of 2 failed: RuntimeError: boom on rank 1" in proc.stderr
    assert not list(out.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("files", [True, False], ids=["files", "folder"])
def test_fewer_images_than_processes_is_refused_on_every_rank(tmp_path, files):
    """One image for 2 processes: Lightning's unpadded sampler gave rank 1 none and failed
    there with a bare assertion while rank 0 waited in a collective, both for good (a
    SIGTERM did not end them)."""
    for split in ("train", "val"):
        folder = tmp_path / "data" / split / "c0"
        folder.mkdir(parents=True)
        Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(folder / "0.png")
    out = tmp_path / "out"
    out.mkdir()
    args = ["--root", str(tmp_path / "data"), *(["--files"] if files else [])]
    started = time.monotonic()
    proc = launch("ddp_predict_script.py", WORLD, out, args, timeout=150)
    assert proc.returncode != 0 and time.monotonic() - started < 150
    what = "data.paths" if files else "ImageFolderDataModule's held-out split"
    said = f"{what}.* holds 1 image\\(s\\) for 2 processes, and each predicts its own share"
    assert len(re.findall(said, proc.stderr)) == WORLD, proc.stderr[-3000:]
    assert "predict on at most 1 device(s) (--trainer.devices 1)" in proc.stderr
