"""The one collective the loss needs: an all-gather that carries gradients back to their owner."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def rank_and_world_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, differentiably.

    The backward pass sums, on each rank, the gradients every rank computed for that
    rank's slice (a reduce-scatter). This is what Lightning's
    ``all_gather(..., sync_grads=True)`` does; a plain ``dist.all_gather`` would drop the
    gradient of the negatives that live on other ranks.
    """
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(tensor), dim=0)
