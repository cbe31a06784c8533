"""A checkpoint resumed on more processes than saved it: each saved rank continues its own
random streams, and a rank the saving run did not have keeps the one this run seeded for it.
Taking another rank's state (``rank % saved``, before) gave two ranks the same augmentation
stream: the same crops and colours at every batch position."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from simclr_lightning import CIFARDataModule
from simclr_lightning.callbacks import RNGState

IMAGES = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator())


def data_on_rank(rank: int, world: int, seed: int = 0) -> CIFARDataModule:
    """A data module with augment: gpu as ``setup`` leaves it on ``rank`` (on the CPU)."""
    dm = CIFARDataModule("/nonexistent", augment="gpu", batch_size=8)
    cpu = SimpleNamespace(root_device=torch.device("cpu"))
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, strategy=cpu)
    torch.manual_seed(seed)
    dm._seed_gpu_augment()
    return dm


def views(dm: CIFARDataModule) -> torch.Tensor:
    (a, b), _ = dm.views_of(IMAGES, torch.arange(len(IMAGES)))
    return torch.cat([a, b])


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_the_checkpoint_had_not_keep_streams_of_their_own(world):
    saving = data_on_rank(0, 1, seed=5)
    views(saving)  # the saved stream has moved on
    saved = saving.state_dict()
    continued = views(saving)  # what the one-process run draws next

    resumed = []
    for rank in range(world):
        dm = data_on_rank(rank, world)
        dm.load_state_dict(saved)
        resumed.append(views(dm))
    torch.testing.assert_close(resumed[0], continued, rtol=0, atol=0)  # rank 0: its own
    for rank in range(1, world):  # the new ranks: each the stream of a fresh run's rank
        torch.testing.assert_close(resumed[rank], views(data_on_rank(rank, world)), rtol=0, atol=0)
        assert not any(torch.equal(resumed[rank], resumed[other]) for other in range(rank))


def test_a_state_of_another_device_type_is_said_and_left():
    """A CUDA generator's state (16 bytes: seed and offset) cannot be set on a CPU generator,
    nor the reverse: torch raised 'RNG state is wrong size' at the resume."""
    dm = data_on_rank(0, 1)
    before = dm.gpu_augment.generator.get_state()
    cuda_like = {"gpu_augment_generator": [torch.zeros(16, dtype=torch.uint8)]}
    with pytest.warns(UserWarning, match="augment: gpu random state is of another device type"):
        dm.load_state_dict(cuda_like)
    assert torch.equal(dm.gpu_augment.generator.get_state(), before)


def test_global_random_states_of_a_rank_the_checkpoint_had_not_are_its_own():
    callback = RNGState()
    random.seed(1)
    torch.manual_seed(1)
    saved = callback.state_dict()["ranks"]  # a one-process run's
    torch.manual_seed(2)
    random.seed(2)
    own = (torch.get_rng_state(), random.getstate())
    callback.load_state_dict({"ranks": saved, "epoch_end": True})
    callback._restore(SimpleNamespace(global_rank=1))
    assert torch.equal(torch.get_rng_state(), own[0]) and random.getstate() == own[1]
    callback.load_state_dict({"ranks": saved, "epoch_end": True})
    callback._restore(SimpleNamespace(global_rank=0))
    assert torch.equal(torch.get_rng_state(), saved[0]["torch"])
