"""Supervised contrastive loss (Khosla et al. 2020, eq. 2, L_out): SimCLR's loss with every image
of the same class as a positive, over the global batch like NT-Xent."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from simclr_lightning.data.class_names import says_unlabeled
from simclr_lightning.distributed import gather_with_grad
from simclr_lightning.errors import SettingError, require
from simclr_lightning.loss import LossReduction, batch_layout, reduction_scale


class SupConLoss(nn.Module):
    """``L = mean_i -1/|P(i)| sum_{p in P(i)} log(exp(z_i.z_p/t) / sum_{a != i} exp(z_i.z_a/t))``.

    ``P(i)`` holds every other view in the global batch whose label equals ``i``'s: the other view
    of the same image and both views of every image of its class. Unlabeled images (label -1)
    have only their own other view as positive, so with all labels distinct (or -1) this is
    exactly NT-Xent. Embeddings are gathered with gradients and labels without, so under DDP
    the loss and gradients equal one process holding the whole batch. The mean over anchors
    (the paper sums) keeps the scale of NT-Xent, and ``reduction`` scales it as NT-Xent's
    (:func:`~simclr_lightning.loss.reduction_scale`), so that a SimCLR recipe it is added to
    keeps its learning rate. Float32 whatever the autocast dtype. It holds the full
    ``[2N, 2NW]`` similarity matrix: fine for batches of a few thousand.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        gather_distributed: bool = True,
        reduction: LossReduction = "mean",
    ) -> None:
        super().__init__()
        require(temperature > 0, "model.temperature", temperature, "> 0")
        self.temperature = float(temperature)
        self.gather_distributed = gather_distributed
        reduction_scale(reduction)  # refuse an unknown one now
        self.reduction = reduction

    @property
    def scale(self) -> float:
        return reduction_scale(self.reduction)

    def forward(self, z_a: Tensor, z_b: Tensor, labels: Tensor) -> Tensor:
        return self.forward_with_stats(z_a, z_b, labels)[0]

    def forward_with_stats(
        self, z_a: Tensor, z_b: Tensor, labels: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss, and the health signals of NT-Xent generalised to classes (positives:
        same label; ``contrastive_acc``: the nearest other embedding shares the label)."""
        n, rank, world = batch_layout(z_a, z_b, self.gather_distributed, "SupConLoss")
        if labels.shape != (n,):
            raise ValueError(f"SupConLoss expects [N={n}] labels, got {tuple(labels.shape)}")
        # unlabeled images: a class of their own, unique across the world
        ids = torch.arange(n, device=labels.device) + rank * n
        labels = torch.where(labels < 0, -2 - ids, labels.long())
        with torch.autocast(device_type=z_a.device.type, enabled=False):
            local = F.normalize(torch.cat([z_a, z_b]).float(), dim=1)  # [2N, D]
            if world > 1:
                columns = torch.cat([gather_with_grad(local[:n]), gather_with_grad(local[n:])])
                all_labels = _gather(labels)
            else:
                columns, all_labels = local, labels
            col_labels = torch.cat([all_labels, all_labels])  # [2WN]
            row_labels = torch.cat([labels, labels])  # [2N]
            cos = local @ columns.T  # [2N, 2WN]
            rows = torch.arange(n, device=cos.device) + rank * n
            self_idx = torch.cat([rows, rows + world * n])
            anchors = torch.arange(2 * n, device=cos.device)
            not_self = torch.ones_like(cos, dtype=torch.bool)
            not_self[anchors, self_idx] = False
            positive = (row_labels[:, None] == col_labels[None, :]) & not_self
            logits = (cos / self.temperature).masked_fill(~not_self, float("-inf"))
            log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
            per_anchor = log_prob.masked_fill(~positive, 0.0).sum(1) / positive.sum(1)
            loss = -per_anchor.mean() * self.scale
        with torch.no_grad():
            cos, local = cos.detach(), local.detach()
            negative = ~positive & not_self
            nearest = cos.masked_fill(~not_self, float("-inf")).argmax(dim=1)
            # Masked sums, not cos[mask] or `if negative.any()`: both would make the host wait
            # for the GPU every step. Every anchor has a positive (its other view); a batch of
            # one class has no negative, and its neg_cos is 0.
            stats = {
                "pos_cos": torch.where(positive, cos, 0.0).sum() / positive.sum(),
                "neg_cos": torch.where(negative, cos, 0.0).sum() / negative.sum().clamp_min(1),
                "contrastive_acc": (col_labels[nearest] == row_labels).float().mean(),
                "z_std": local.std(dim=0).mean(),
            }
        return loss, stats


def _gather(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, without gradient (the labels)."""
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out)


def require_labels(datamodule) -> None:
    """Refuse SupCon over a data module without labels, before any work: every image would
    be its own class, which is NT-Xent under another name."""
    if says_unlabeled(datamodule):
        raise SettingError(
            f"model.loss='supcon' needs labelled images, and the data module "
            f"({type(datamodule).__name__}) has none (num_classes=None, e.g. data.root/train "
            f"without class folders): every image would be its own class, which is NT-Xent; "
            f"use model.loss=ntxent, or give class folders (train/<class>/<image>)"
        )
