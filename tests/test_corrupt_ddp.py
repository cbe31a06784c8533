"""An undecodable file under DDP (no ``data.skip_corrupt``): every process stops at the same
batch, one line names the file and the process that read it, and the last finished step is
saved, for the training, validation and kNN-bank loaders."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tests.preemption_runs import (
    STEPS,
    assert_stopped_on,
    cli,
    global_step,
    steps_logged,
    write_config,
)


def damage(path: Path) -> Path:
    """Replace the symlink ``path`` by a file that starts like a JPEG; returns its target."""
    original = path.readlink()
    path.unlink()
    path.write_bytes(b"\xff\xd8\xff\xe0 not the rest of a JPEG")
    return original


def ddp_run(root: Path, work: Path, trainer: dict, callbacks: list | None = None):
    """A 2-process ``simclr-lightning fit`` of ``write_config``'s run on ``root``; its exit code
    and output."""
    work.mkdir()
    config = write_config(root, work)
    settings = yaml.safe_load(config.read_text())
    settings["trainer"] |= {"devices": 2, "strategy": "ddp", **trainer}
    settings["trainer"]["callbacks"] += callbacks or []
    config.write_text(yaml.safe_dump(settings))
    proc = cli(config)
    out, _ = proc.communicate(timeout=300)
    return config, proc.returncode, out.decode()


def mend_and_resume(bad: Path, original: Path, config: Path, work: Path) -> None:
    """Put the file back, resume from last.ckpt: steps 1 to the end, each once per rank."""
    bad.unlink()
    bad.symlink_to(original)
    resumed = cli(config, "--ckpt_path", "last")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out.decode()[-3000:]
    assert steps_logged(work) == sorted(2 * list(range(1, STEPS // 2 + 1)))


@pytest.mark.slow
def test_corrupt_file_under_ddp_stops_every_rank_at_one_step_and_saves_it(tiny_folder, tmp_path):
    """2 processes; rank 1's third batch holds a damaged file. Both ranks finish steps 1-2,
    stop together before step 3 with one line naming the file, and last.ckpt holds step 2;
    with the file mended, resuming trains steps 3-6 once each."""
    from torchvision.datasets import ImageFolder

    from simclr_lightning.data.sampler import ResumableSampler

    root = tmp_path / "data"
    shutil.copytree(tiny_folder, root, symlinks=True)
    files = [Path(path) for path, _ in ImageFolder(str(root / "train")).samples]
    sampler = ResumableSampler(len(files), num_replicas=2, rank=1, seed=3)  # the config's seed
    sampler.set_epoch(0)
    bad = files[[i for i, _ in sampler][6]]  # rank 1, batch 3 (batches of 3)
    original = damage(bad)

    work = tmp_path / "run"
    config, code, out = ddp_run(root, work, {})
    assert_stopped_on(bad, code, out)
    assert steps_logged(work) == [1, 1, 2, 2], out[-3000:]  # both ranks, steps 1 and 2
    assert global_step(work / "ckpts" / "last.ckpt") == 2
    mend_and_resume(bad, original, config, work)


@pytest.mark.slow
def test_corrupt_validation_file_under_ddp_stops_every_rank_and_saves_the_epoch(
    tiny_folder, tmp_path
):
    """Rank 1's second validation batch holds a damaged file: after epoch 1's three steps both
    ranks stop in validation with one line naming it (rank 0 has no bad file, it would have
    waited for rank 1 in a collective), last.ckpt holds step 3, and with the file mended the
    resumed run trains steps 4-6 once each."""
    from simclr_lightning import ImageFolderDataModule

    root = tmp_path / "data"
    shutil.copytree(tiny_folder, root, symlinks=True)
    dm = ImageFolderDataModule(str(root), batch_size=3, num_workers=0)
    dm.setup("validate")
    served = dm.val_sample()  # the validation images in the order the loader serves them
    rank1 = list(torch.utils.data.DistributedSampler(served, 2, rank=1, shuffle=False))
    bad = Path(dm.val_set.samples[served.indices[rank1[3]]][0])  # rank 1, batch 2 (of 3)
    original = damage(bad)

    work = tmp_path / "run"
    reads = [{"class_path": "simclr_lightning.OnlineLinearProbe"}]  # else no validation runs
    trainer = {"limit_val_batches": None, "num_sanity_val_steps": 0}
    config, code, out = ddp_run(root, work, trainer, reads)
    assert_stopped_on(bad, code, out)
    assert steps_logged(work) == [1, 1, 2, 2, 3, 3], out[-3000:]
    assert global_step(work / "ckpts" / "last.ckpt") == 3
    mend_and_resume(bad, original, config, work)


@pytest.mark.slow
def test_corrupt_file_only_the_knn_bank_reads_stops_every_rank_and_saves_the_epoch(
    tiny_folder, tmp_path
):
    """Each rank trains 3 batches of 3 of its 10 images: drop_last leaves one image each that
    no training step reads, and the kNN monitor's bank reads all 20 at the epoch's end. One
    of those two is damaged: both ranks stop in the bank pass together, the other rank
    saying which process read it, and last.ckpt holds step 3."""
    from torchvision.datasets import ImageFolder

    from simclr_lightning.data.sampler import ResumableSampler

    root = tmp_path / "data"
    shutil.copytree(tiny_folder, root, symlinks=True)
    files = [Path(path) for path, _ in ImageFolder(str(root / "train")).samples]
    dropped = []
    for rank in (0, 1):
        sampler = ResumableSampler(len(files), num_replicas=2, rank=rank, seed=3)
        sampler.set_epoch(0)
        dropped += [i for i, _ in list(sampler)[9:]]  # after the 3 full batches
    assert len(dropped) == 2
    bad = files[dropped[0]]
    damage(bad)

    knn = {"class_path": "simclr_lightning.KNNMonitor", "init_args": {"k": 3}}
    trainer = {"limit_val_batches": None, "max_epochs": 1}
    _, code, out = ddp_run(root, tmp_path / "run", trainer, [knn])
    # the bank is split unshuffled: rank r of 2 reads the images r, r + 2, ...
    assert_stopped_on(bad, code, out, reader=dropped[0] % 2)
    assert steps_logged(tmp_path / "run") == [1, 1, 2, 2, 3, 3], out[-3000:]
    assert global_step(tmp_path / "run" / "ckpts" / "last.ckpt") == 3
