"""NT-Xent, the normalized temperature-scaled cross entropy of SimCLR (Chen et al. 2020, eq. 1)."""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simclr_lightning.distributed import gather_with_grad, rank_and_world_size
from simclr_lightning.errors import SettingError, require
from simclr_lightning.tiled_loss import TiledNTXent

LossReduction = Literal["sum_of_views", "mean"]
LOSS_REDUCTIONS = get_args(LossReduction)


def reduction_scale(reduction: str) -> float:
    """The factor from the mean over all 2N anchors (the paper's eq. 1) to ``reduction``:
    google-research/simclr's ``loss_a + loss_b`` averages each view's N anchors and sums the
    two, twice the mean. The scale matters under LARS: weight decay is added to the gradient
    before the trust ratio, and BatchNorm and bias parameters step by lr x gradient, so the
    official learning rates and weight decay reproduce the official runs only with it."""
    require(
        reduction in LOSS_REDUCTIONS,
        "model.loss_reduction",
        reduction,
        "one of " + ", ".join(LOSS_REDUCTIONS),
    )
    return 2.0 if reduction == "sum_of_views" else 1.0


def batch_layout(
    z_a: Tensor, z_b: Tensor, gather_distributed: bool, loss: str
) -> tuple[int, int, int]:
    """``(N, rank, world)`` for two ``[N, D]`` view embeddings, after checking that the global
    batch holds a negative at all."""
    if z_a.shape != z_b.shape or z_a.ndim != 2:
        raise ValueError(
            f"{loss} expects two [N, D] embeddings of equal shape, got "
            f"{tuple(z_a.shape)} and {tuple(z_b.shape)}"
        )
    n = z_a.shape[0]
    rank, world = rank_and_world_size() if gather_distributed else (0, 1)
    if n * world < 2:
        raise SettingError(
            f"{loss} needs a global batch of at least 2 images (got {n} per process x "
            f"{world} processes): raise data.batch_size, or drop a last partial batch of one "
            f"(drop_last)"
        )
    return n, rank, world


class NTXentLoss(nn.Module):
    """NT-Xent over the global batch.

    Each process scores its 2N local anchors against all 2NW embeddings of the world
    (gathered *with* gradients), so negatives are the global batch and the loss and
    its gradients at world size W equal one process holding all W batches. The result
    is the mean over this rank's 2N anchors; DDP's gradient averaging over ranks then
    yields the gradient of the global mean over all 2NW anchors.

    The similarities are computed ``block_size`` anchors at a time, in the forward and
    again in the backward (:class:`~simclr_lightning.tiled_loss.TiledNTXent`): memory is
    about ``block_size x 2NW`` floats plus the embeddings, never the whole 2N x 2NW matrix,
    so large batches fit. Computed in float32 (float64 for float64 inputs) whatever the
    autocast dtype: bf16 logits at temperature 0.1 lose the small differences the loss is
    made of.

    ``reduction``: ``mean`` is the paper's 1/(2N) mean over the anchors (as lightly and
    solo-learn); ``sum_of_views`` the official code's sum of the two views' means, twice
    that (see :func:`reduction_scale`).
    """

    def __init__(
        self,
        temperature: float = 0.5,
        gather_distributed: bool = True,
        block_size: int = 1024,
        reduction: LossReduction = "mean",
    ) -> None:
        super().__init__()
        require(temperature > 0, "model.temperature", temperature, "> 0")
        require(block_size >= 1, "model.loss_block_size", block_size, ">= 1")
        self.temperature = float(temperature)
        self.gather_distributed = gather_distributed
        self.block_size = block_size
        reduction_scale(reduction)  # refuse an unknown one now
        self.reduction = reduction

    @property
    def scale(self) -> float:
        return reduction_scale(self.reduction)

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        return self.forward_with_stats(z_a, z_b, with_stats=False)[0]

    def forward_with_stats(
        self, z_a: Tensor, z_b: Tensor, with_stats: bool = True
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss and, for monitoring, detached health signals of the same logits: mean
        positive and negative cosine, how often the positive is strictly the nearest
        embedding, and the std of the unit embeddings (healthy is about 1/sqrt(D), collapse
        drives it to 0). Statistics are over this rank's anchors."""
        n, rank, world = batch_layout(z_a, z_b, self.gather_distributed, "NT-Xent")
        dtype = torch.promote_types(z_a.dtype, torch.float32)
        with torch.autocast(device_type=z_a.device.type, enabled=False):
            local = F.normalize(torch.cat([z_a, z_b]).to(dtype), dim=1)  # [2N, D]
            if world > 1:
                gathered_a = gather_with_grad(local[:n])  # [W*N, D]
                gathered_b = gather_with_grad(local[n:])
                columns = torch.cat([gathered_a, gathered_b])  # [2WN, D]
            else:
                columns = local
            rows = torch.arange(n, device=local.device) + rank * n
            self_idx = torch.cat([rows, rows + world * n])
            pos_idx = torch.cat([rows + world * n, rows])
            loss, sums = TiledNTXent.apply(
                local, columns, self_idx, pos_idx, self.temperature, self.block_size, with_stats
            )
            if self.scale != 1.0:
                loss = loss * self.scale
        stats: dict[str, Tensor] = {}
        if with_stats:
            anchors = 2 * n
            pos_sum, neg_sum, hits = sums.unbind()
            stats = {
                "pos_cos": pos_sum / anchors,
                "neg_cos": neg_sum / (anchors * (len(columns) - 2)),
                "contrastive_acc": hits / anchors,
                "z_std": local.detach().std(dim=0).mean(),
            }
        return loss, stats
