"""NT-Xent, the normalized temperature-scaled cross entropy of SimCLR (Chen et al. 2020, eq. 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simclr_lightning.distributed import gather_with_grad, rank_and_world_size
from simclr_lightning.errors import require


class NTXentLoss(nn.Module):
    """NT-Xent over the global batch.

    Each process scores its 2N local anchors against all 2NW embeddings of the world
    (gathered *with* gradients), so negatives are the global batch and the loss and
    its gradients at world size W equal one process holding all W batches. The result
    is the mean over this rank's 2N anchors; DDP's gradient averaging over ranks then
    yields the gradient of the global mean over all 2NW anchors.

    Computed in float32 whatever the autocast dtype: bf16 logits at temperature 0.1
    lose the small differences the loss is made of.
    """

    def __init__(self, temperature: float = 0.5, gather_distributed: bool = True) -> None:
        super().__init__()
        require(temperature > 0, "model.temperature", temperature, "> 0")
        self.temperature = float(temperature)
        self.gather_distributed = gather_distributed

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        return self.forward_with_stats(z_a, z_b, with_stats=False)[0]

    def forward_with_stats(
        self, z_a: Tensor, z_b: Tensor, with_stats: bool = True
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss and, for monitoring, detached health signals of the same logits."""
        if z_a.shape != z_b.shape or z_a.ndim != 2:
            raise ValueError(
                f"NTXentLoss expects two [N, D] embeddings of equal shape, got "
                f"{tuple(z_a.shape)} and {tuple(z_b.shape)}"
            )
        n = z_a.shape[0]
        rank, world = rank_and_world_size() if self.gather_distributed else (0, 1)
        if n * world < 2:
            raise ValueError(
                f"NT-Xent needs a global batch of at least 2 images (got {n} per process x "
                f"{world} processes): raise data.batch_size"
            )
        with torch.autocast(device_type=z_a.device.type, enabled=False):
            local = F.normalize(torch.cat([z_a, z_b]).float(), dim=1)  # [2N, D]
            if world > 1:
                gathered_a = gather_with_grad(local[:n])  # [W*N, D]
                gathered_b = gather_with_grad(local[n:])
                columns = torch.cat([gathered_a, gathered_b])  # [2WN, D]
            else:
                columns = local
            cos = local @ columns.T  # [2N, 2WN]
            rows = torch.arange(n, device=cos.device)
            offset = rank * n
            self_idx = torch.cat([rows + offset, rows + offset + world * n])
            pos_idx = torch.cat([rows + offset + world * n, rows + offset])
            anchors = torch.arange(2 * n, device=cos.device)
            logits = cos / self.temperature
            logits[anchors, self_idx] = float("-inf")  # an anchor is not its own negative
            loss = F.cross_entropy(logits, pos_idx)
        stats: dict[str, Tensor] = {}
        if with_stats:
            with torch.no_grad():
                stats = _health(cos.detach(), local.detach(), anchors, self_idx, pos_idx)
        return loss, stats


def _health(
    cos: Tensor, local: Tensor, anchors: Tensor, self_idx: Tensor, pos_idx: Tensor
) -> dict[str, Tensor]:
    """Signals that show collapse early: positives and negatives equally similar, a top-1
    stuck at chance, or embedding std near 0 (healthy is about 1/sqrt(D))."""
    pos = cos[anchors, pos_idx]
    neg_mask = torch.ones_like(cos, dtype=torch.bool)
    neg_mask[anchors, self_idx] = False
    neg_mask[anchors, pos_idx] = False
    scored = cos.masked_fill(~neg_mask, float("-inf"))
    scored[anchors, pos_idx] = pos
    return {
        "pos_cos": pos.mean(),
        "neg_cos": cos[neg_mask].mean(),
        "contrastive_acc": (scored.argmax(dim=1) == pos_idx).float().mean(),
        "z_std": local.std(dim=0).mean(),
    }
