"""RNGState's global generator states: restored on a machine that sees fewer GPUs than the one
that saved them (CUDA itself simulated here: CI has no GPU)."""

from __future__ import annotations

import random

import numpy as np
import torch

from simclr_lightning.resume import global_rng_states, set_global_rng_states


def test_cuda_states_of_more_gpus_than_visible_restore_those_there_are(monkeypatch):
    """A process of an 8-GPU node saves 8 CUDA states; resumed where it sees 1,
    set_rng_state_all indexed past the devices there are (IndexError)."""
    saved = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: saved)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: restored.append((d, s)))

    def refuse(states):
        raise IndexError("tuple index out of range")  # torch's, past device_count()

    monkeypatch.setattr(torch.cuda, "set_rng_state_all", refuse)
    states = global_rng_states()
    expected_python, expected_numpy = random.random(), np.random.rand()
    expected_torch = torch.rand(())
    set_global_rng_states(states)
    assert [(d, s.tolist()) for d, s in restored] == [(0, saved[0].tolist())]
    # and the host generators are back where they were saved
    assert (random.random(), np.random.rand()) == (expected_python, expected_numpy)
    assert torch.equal(torch.rand(()), expected_torch)
