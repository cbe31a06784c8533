"""Per-rank random state in checkpoints: each rank draws its own numbers, and only rank 0
writes the file, so states are gathered into a list by rank on save and each rank takes its
own back on load."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist


def gather_per_rank(trainer: L.Trainer, obj: Any) -> list[Any]:
    """``obj`` of every rank, by rank (every rank must call it: Lightning dumps checkpoints on
    all ranks before rank 0 writes)."""
    if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered: list[Any] = [None] * trainer.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def own_rank(states: list[Any], trainer: L.Trainer) -> Any | None:
    """This rank's entry of :func:`gather_per_rank`'s list, or None for a rank the saving run
    did not have (resumed on more processes): that rank keeps the stream this run seeded for
    it. Taking another rank's state instead would give two ranks one stream, the same random
    crops and colours for every batch position."""
    rank = trainer.global_rank
    return states[rank] if rank < len(states) else None


def global_rng_states() -> dict[str, Any]:
    """python, numpy, torch and CUDA generator states, in types ``torch.load(weights_only=True)``
    reads back (numpy's key array as a tensor)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_global_rng_states(states: dict[str, Any]) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        # one state per GPU the saving process saw: a resume that sees fewer (another node
        # type, CUDA_VISIBLE_DEVICES) restores those it has; set_rng_state_all raised
        for device, state in enumerate(states["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, device)
