"""The training loader's batches and random streams: a classify run trains on every labelled
image each epoch (pretraining keeps dropping its partial batch), and the NumPy and ``random``
draws of a dataset differ between DDP ranks, the same again run to run."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from simclr_lightning.data.base import SimCLRDataModule
from simclr_lightning.errors import SettingError


class Numbered(Dataset):
    """Item ``i`` is ``(i, its NumPy draw, its random draw, label)``: the batch names its
    images, and what a user's transform would draw from the global generators."""

    def __init__(self, size: int) -> None:
        self.targets = [i % 10 for i in range(size)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return i, np.random.randint(0, 2**31), random.random(), self.targets[i]


class NumberedData(SimCLRDataModule):
    def __init__(self, size: int, **kwargs) -> None:
        self.size = size
        super().__init__(num_workers=0, persistent_workers=False, **kwargs)

    def make_dataset(self, split, transform):
        return Numbered(self.size) if split == "train" else None


def as_rank(dm: SimCLRDataModule, rank: int, world: int) -> SimCLRDataModule:
    """``dm`` as process ``rank`` of ``world`` sees it (what the loaders read of a Trainer)."""
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world)
    return dm


def epoch_ids(dm: SimCLRDataModule) -> list[list[int]]:
    dm.setup("fit")
    return [batch[0].tolist() for batch in dm.train_dataloader()]


@pytest.fixture(autouse=True)
def fixed_seed(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # seed_everything(0): one order on every rank


def test_a_classify_epoch_trains_on_every_labelled_image_once():
    """configs/finetune_semi.yaml on CIFAR-10: 1% of 50,000 labels, batch 256. Dropping the
    last batch trained on 256 of the 500 images an epoch, and 2 processes were refused."""
    dm = NumberedData(50_000, task="classify", label_fraction=0.01, batch_size=256)
    batches = epoch_ids(dm)
    labelled = set(dm.train_set.indices)
    assert len(labelled) == 500
    assert [len(b) for b in batches] == [256, 244]
    ids = [i for b in batches for i in b]
    assert len(ids) == len(set(ids)) == 500 and set(ids) == labelled

    shards = []
    for rank in range(2):
        dm = NumberedData(50_000, task="classify", label_fraction=0.01, batch_size=256)
        shards.append(epoch_ids(as_rank(dm, rank, world=2)))
    assert [[len(b) for b in shard] for shard in shards] == [[250], [250]]
    assert set(shards[0][0]) | set(shards[1][0]) == labelled


@pytest.mark.parametrize(
    ("size", "task", "drop_last", "sizes"),
    [
        (500, "pretrain", None, [256]),  # NT-Xent's full batches, as before
        (257, "classify", None, [256]),  # a last batch of one image cannot train BatchNorm
        (258, "classify", None, [256, 2]),
        (500, "classify", True, [256]),  # asked for
    ],
)
def test_which_last_batch_is_dropped(size, task, drop_last, sizes):
    default = {} if drop_last is None else {"drop_last": drop_last}  # None: left at its default
    dm = NumberedData(size, task=task, batch_size=256, **default)
    batches = epoch_ids(dm)
    assert [len(b) for b in batches] == sizes
    assert len({i for b in batches for i in b}) == sum(sizes)  # no image twice


def test_a_classify_run_needs_two_images_per_process():
    with pytest.raises(SettingError, match=r"needs at least 2 training images per process"):
        as_rank(NumberedData(3, task="classify", batch_size=2), 0, world=4).setup("fit")


def draws(rank: int, workers: int, resume: int = 0) -> dict[int, tuple[int, float]]:
    """{image: (its NumPy draw, its random draw)} over one epoch of rank ``rank`` of 2, in a
    process seeded as ``seed_everything(0)`` seeds every rank; from batch ``resume`` on."""
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    dm = as_rank(NumberedData(32, batch_size=4), rank, world=2)
    dm.num_workers = workers
    if resume:
        dm.load_state_dict({"train_order": {"seed": 0, "epoch": 0, "batches": resume}})
    dm.setup("fit")
    out = {}
    for ids, np_draws, py_draws, _ in dm.train_dataloader():
        for i, a, b in zip(ids.tolist(), np_draws.tolist(), py_draws.tolist(), strict=True):
            out[i] = (a, b)
    return out


def test_numpy_and_random_draws_differ_between_ranks_and_repeat():
    """Every rank's workers started from the same seed (and the data modules' worker_init_fn
    keeps Lightning's rank-aware one out): a user's NumPy and random draws were the same on
    every rank. Each sample's are now seeded from (seed, epoch, index), like torch's."""
    rank0, rank1 = draws(0, workers=2), draws(1, workers=2)
    assert len(rank0) == len(rank1) == 16 and not rank0.keys() & rank1.keys()
    for column in (0, 1):
        assert not {d[column] for d in rank0.values()} & {d[column] for d in rank1.values()}
    assert draws(0, workers=2) == rank0  # run to run
    assert draws(0, workers=0) == rank0  # whatever the number of workers
    resumed = draws(0, workers=1, resume=2)  # a checkpoint after 2 of 4 batches
    assert len(resumed) == 8 and resumed == {i: rank0[i] for i in resumed}


def test_without_workers_the_process_generators_are_left_alone():
    dm = NumberedData(32, batch_size=4)
    dm.setup("fit")
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    next(iter(dm.train_dataloader()))
    assert torch.equal(torch.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1]) and random.getstate() == before[2]


def test_a_pretraining_last_batch_of_one_is_refused_only_in_one_process():
    """data.drop_last=false, 17 images in batches of 8: one process ends on a batch of one,
    no negative for NT-Xent; two processes of 9 end on one each, a global batch of 2, which
    trains (it was refused)."""
    with pytest.raises(SettingError, match=r"leaves a last batch of 1 image \(17 in all\)"):
        NumberedData(17, task="pretrain", batch_size=8, drop_last=False).setup("fit")
    for rank in range(2):
        dm = as_rank(NumberedData(17, task="pretrain", batch_size=8, drop_last=False), rank, 2)
        dm.setup("fit")
        assert [len(b) for b in epoch_ids(dm)] == [8, 1]
