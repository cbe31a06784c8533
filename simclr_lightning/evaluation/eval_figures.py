"""LinearEval's validation and test figures, per dataloader: each loader of a stage is its own
split (a user's ``[val_a, val_b]``), so its top-1 must not pool another's images."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from simclr_lightning.distributed import already_synced, sum_over_processes


class StageFigures(nn.Module):
    """Top-1/top-5 (torchmetrics, micro: the fraction of images, as papers report) and the mean
    loss of one evaluation stage for each of its loaders, over the labelled images of every
    process, each counted once (the caller drops DistributedSampler's padding rows). A loader
    without a labelled image has no figures: 0% and a loss of 0 would read as a result (a
    perfect one to ``ModelCheckpoint(monitor="val/loss")``)."""

    def __init__(self, stage: str, num_classes: int) -> None:
        super().__init__()
        self.stage = stage
        self.num_classes = num_classes
        self.loaders = nn.ModuleList()
        # loss sum and labelled rows per loader, this process's; a tensor, not a buffer, which
        # a bf16-true run would round
        self.sums = torch.zeros(0, 2)
        self._warned: set[int] = set()

    def start(self, loaders: int, device: torch.device) -> None:
        """Reset for an epoch over ``loaders`` loaders (every process has them all)."""
        for metric in self.loaders.modules():
            if isinstance(metric, MulticlassAccuracy):
                metric.reset()
        self.sums = torch.zeros(0, 2, device=device)
        self._cover(loaders, device)

    def _cover(self, loaders: int, device: torch.device) -> None:
        """Metrics and sums for loaders ``0 .. loaders - 1``, keeping those already counted."""
        top5 = min(5, self.num_classes)
        while len(self.loaders) < loaders:
            pair = {k: MulticlassAccuracy(self.num_classes, k, average="micro") for k in (1, top5)}
            self.loaders.append(nn.ModuleList(pair.values()).to(device))
        if loaders > len(self.sums):
            more = torch.zeros(loaders - len(self.sums), 2, device=device)
            self.sums = torch.cat([self.sums.to(device), more])

    def update(self, loader: int, logits: Tensor, y: Tensor) -> None:
        """Labelled rows only (``y >= 0``); counted on the device, never read on the host."""
        self._cover(loader + 1, logits.device)  # (more only for a step called by hand)
        if len(y):  # torchmetrics cannot take an empty update
            for metric in self.loaders[loader]:
                metric.update(logits, y)
        loss_sum = F.cross_entropy(logits, y, reduction="sum").float()
        self.sums[loader] += torch.stack([loss_sum, loss_sum.new_tensor(len(y))])

    def results(self) -> dict[str, Tensor]:
        """``{stage}/top1``, ``/top5``, ``/loss`` (suffixed ``/dataloader_idx_<i>``, as
        Lightning names per-loader figures, when the stage has several loaders). Call on
        every process: the sums are all-reduced and the metrics synchronised."""
        out: dict[str, Tensor] = {}
        sums = sum_over_processes(self.sums)
        several = len(sums) > 1
        for i, (loss_sum, rows) in enumerate(sums.tolist()):  # one read per epoch
            suffix = f"/dataloader_idx_{i}" if several else ""
            if rows == 0:
                if i not in self._warned:
                    self._warned.add(i)
                    rank_zero_warn(
                        f"LinearEval: the {self.stage} split{suffix} holds no labelled image "
                        f"(all labels are -1): its {self.stage}/top1, top5 and loss are not logged"
                    )
                continue
            top1, top5 = self.loaders[i]
            out[f"{self.stage}/top1{suffix}"] = top1.compute()
            out[f"{self.stage}/top5{suffix}"] = top5.compute()
            out[f"{self.stage}/loss{suffix}"] = torch.tensor(loss_sum / rows)
        return out

    def log_to(self, module) -> None:
        """Logs :meth:`results` through ``module``: over every labelled image of all processes
        (without DistributedSampler's padding repeats); ``sync_dist`` would average the
        processes' means instead, which differ in size. Every process logs them, as DDP needs
        the same keys everywhere."""
        for name, value in self.results().items():
            already_synced(name)
            top1 = name.startswith(f"{self.stage}/top1")
            module.log(name, value, prog_bar=top1, add_dataloader_idx=False)  # named already
