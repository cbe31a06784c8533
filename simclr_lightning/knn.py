"""Weighted kNN evaluation of the encoder (InstDisc, solo-learn, lightly): no training needed,
so it tracks representation quality from the first epoch, without a probe's own dynamics."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler


def knn_predict(
    query: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> Tensor:
    """Class scores ``[Q, num_classes]`` of weighted kNN: the ``k`` most cosine-similar bank rows
    vote for their label with weight ``exp(sim / temperature)``.

    ``query`` and ``bank`` need not be normalised. At most ``chunk_size`` query rows are scored
    at a time, so memory stays at ``chunk_size x len(bank)`` similarities. ``k`` larger than the
    bank uses the whole bank. Ties at the k-th similarity are broken towards the lower bank
    index, so the result does not depend on how ``topk`` orders equal values.
    """
    if k < 1 or temperature <= 0 or chunk_size < 1:
        raise ValueError(
            f"knn_predict needs k >= 1, temperature > 0, chunk_size >= 1, got "
            f"k={k}, temperature={temperature}, chunk_size={chunk_size}"
        )
    if len(bank) != len(bank_labels):
        raise ValueError(f"bank has {len(bank)} rows but bank_labels {len(bank_labels)}")
    query = F.normalize(query.float(), dim=1)
    bank = F.normalize(bank.float(), dim=1)
    bank_labels = bank_labels.to(query.device, torch.long)
    scores = query.new_zeros(len(query), num_classes)
    if len(bank) == 0:
        return scores
    k = min(k, len(bank))
    for start in range(0, len(query), chunk_size):
        sim = query[start : start + chunk_size] @ bank.T
        top_sim, top_idx = _topk_lowest_index_first(sim, k)
        weights = (top_sim / temperature).exp()
        scores[start : start + chunk_size].scatter_add_(1, bank_labels[top_idx], weights)
    return scores


def _topk_lowest_index_first(sim: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``topk`` along dim 1 with a defined choice among values tied with the k-th largest."""
    values, indices = sim.topk(k, dim=1)
    ambiguous = (sim >= values[:, -1:]).sum(dim=1) > k
    if ambiguous.any():  # rare outside duplicated images: redo those rows with a stable sort
        rows = ambiguous.nonzero().squeeze(1)
        sorted_values, order = sim[rows].sort(dim=1, descending=True, stable=True)
        values[rows], indices[rows] = sorted_values[:, :k], order[:, :k]
    return values, indices


def top_k_accuracy(scores: Tensor, labels: Tensor, k: int) -> Tensor:
    """Fraction of rows whose label is among the ``k`` highest scores."""
    k = min(k, scores.shape[1])
    hits = (scores.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    return hits.float().mean()


# -- distributed bookkeeping shared by the monitors ---------------------------------------------


def sample_positions(dataloader: DataLoader, batch_idx: int, batch_len: int) -> Tensor | None:
    """Dataset positions of the rows of batch ``batch_idx``, or None when the loader's order
    cannot be known (shuffled, custom batch sampler).

    Under DDP, Lightning gives rank r of W the samples r, r+W, r+2W, ... of an unshuffled
    loader and pads with repeats up to a multiple of W; padded rows get positions >= the
    dataset size, so callers can drop them and score every sample exactly once.
    """
    batch_size = dataloader.batch_size
    if batch_size is None:
        return None
    local = torch.arange(batch_idx * batch_size, batch_idx * batch_size + batch_len)
    sampler = dataloader.sampler
    if isinstance(sampler, DistributedSampler) and not sampler.shuffle:
        return sampler.rank + local * sampler.num_replicas
    if isinstance(sampler, SequentialSampler):
        return local
    return None


def dataset_size(dataloader: DataLoader) -> int:
    sampler = dataloader.sampler
    if isinstance(sampler, DistributedSampler):
        return len(sampler.dataset)
    return len(dataloader.dataset)


def gather_rows(trainer: L.Trainer, *tensors: Tensor) -> list[Tensor]:
    """Concatenate same-length tensors from every rank along dim 0 (ranks may hold different
    numbers of rows); a no-op in one process."""
    if trainer.world_size == 1:
        return list(tensors)
    strategy = trainer.strategy
    n = torch.tensor([len(tensors[0])], device=tensors[0].device)
    sizes = strategy.all_gather(n).flatten().tolist()
    longest = max(sizes)
    out = []
    for t in tensors:
        padded = t.new_zeros((longest, *t.shape[1:]))
        padded[: len(t)] = t
        gathered = strategy.all_gather(padded)
        out.append(torch.cat([gathered[r, :size] for r, size in enumerate(sizes)]))
    return out


class RowCollector:
    """Accumulates ``(features, labels, positions)`` of one pass over a loader and, after
    :meth:`gather`, holds every rank's rows once each, in dataset order when it is known."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.features: list[Tensor] = []
        self.labels: list[Tensor] = []
        self.positions: list[Tensor] = []
        self.ordered = True
        self.size: int | None = None

    def add(self, dataloader: DataLoader | None, batch_idx: int, features: Tensor, labels: Tensor):
        positions = None
        if dataloader is not None:
            positions = sample_positions(dataloader, batch_idx, len(features))
        if positions is not None:
            self.size = dataset_size(dataloader)
        else:
            self.ordered = False
            positions = torch.full((len(features),), -1)
        self.features.append(features.detach().float())
        self.labels.append(labels.detach().long())
        self.positions.append(positions.to(features.device))

    def __len__(self) -> int:
        return sum(len(f) for f in self.features)

    def gather(self, trainer: L.Trainer, device: torch.device) -> tuple[Tensor, Tensor]:
        """All ranks' features and labels; padding duplicates dropped when positions are known."""
        dim = self.features[0].shape[1] if self.features else 0
        if trainer.world_size > 1:  # a rank with no rows still joins the collectives
            dim = int(trainer.strategy.all_gather(torch.tensor(dim, device=device)).max())
        if self.features:
            feats = torch.cat(self.features).to(device)
            labels = torch.cat(self.labels).to(device)
            pos = torch.cat(self.positions).to(device)
        else:
            feats = torch.zeros(0, dim, device=device)
            labels = torch.zeros(0, dtype=torch.long, device=device)
            pos = torch.zeros(0, dtype=torch.long, device=device)
        ordered = self.ordered
        if trainer.world_size > 1:
            ordered = trainer.strategy.reduce_boolean_decision(ordered, all=True)
            feats, labels, pos = gather_rows(trainer, feats, labels, pos)
        if ordered and self.size is not None and len(pos):
            keep = pos < self.size  # DistributedSampler's padding
            feats, labels, pos = feats[keep], labels[keep], pos[keep]
            pos, order = pos.sort(stable=True)
            first = torch.ones_like(pos, dtype=torch.bool)
            first[1:] = pos[1:] != pos[:-1]  # the same sample seen by several ranks
            feats, labels = feats[order][first], labels[order][first]
        return feats, labels


def pick_loader(loaders, dataloader_idx: int = 0) -> DataLoader | None:
    """Loader ``dataloader_idx`` of ``trainer.val_dataloaders`` (or ``test_dataloaders``)."""
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[dataloader_idx] if dataloader_idx < len(loaders) else None
    elif isinstance(loaders, dict):
        loaders = list(loaders.values())[dataloader_idx]
    return loaders if isinstance(loaders, DataLoader) else None


def validation_loader(trainer: L.Trainer, dataloader_idx: int = 0) -> DataLoader | None:
    return pick_loader(trainer.val_dataloaders, dataloader_idx)


def shard_loader(loader: DataLoader, trainer: L.Trainer) -> DataLoader:
    """``loader`` split across ranks the way Lightning splits validation loaders (unshuffled,
    padded), so :func:`sample_positions` can undo it."""
    if trainer.world_size == 1:
        return loader
    kwargs = trainer.strategy.distributed_sampler_kwargs or {}
    sampler = DistributedSampler(loader.dataset, shuffle=False, **kwargs)
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        persistent_workers=loader.persistent_workers,
    )


class KNNMonitor(L.Callback):
    """Weighted kNN top-1/top-5 of validation features against the labelled training split.

    Every ``every_n_epochs`` validation epochs, it encodes the datamodule's
    ``eval_train_dataloader()`` (training images, no augmentation) with the module's
    ``forward`` as the memory bank and scores the features ``validation_step`` returned
    (dataloader 0) with :func:`knn_predict`; logged as ``knn/val_top1`` and ``knn/val_top5``.
    Under DDP each rank encodes its shard of the bank and of the validation set; both are
    gathered once, DistributedSampler's padding repeats dropped, so every rank scores the
    same global set and the metrics equal a single process's. Rows labelled -1 are ignored.

    Args:
        num_classes: None reads it as 1 + the largest bank label.
        k / temperature: neighbours and the softmax temperature of their votes.
        every_n_epochs: the bank pass costs one inference epoch over the training set.
        chunk_size: query rows scored at once (memory: chunk_size x bank size floats).
    """

    def __init__(
        self,
        num_classes: int | None = None,
        k: int = 200,
        temperature: float = 0.1,
        every_n_epochs: int = 1,
        chunk_size: int = 1024,
    ) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs={every_n_epochs!r} is invalid: must be >= 1")
        if k < 1 or temperature <= 0:
            raise ValueError(f"k={k!r} and temperature={temperature!r} must be >= 1 and > 0")
        self.num_classes = num_classes
        self.k = k
        self.temperature = temperature
        self.every_n_epochs = every_n_epochs
        self.chunk_size = chunk_size
        self.val_rows = RowCollector()
        self.active = False
        self._bank_loader: DataLoader | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._bank_loader = None  # a new run may bring a new datamodule

    def _due(self, trainer: L.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        if trainer.state.fn != "fit":
            return True
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.val_rows.reset()
        self.active = self._due(trainer)

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if not self.active or dataloader_idx != 0:
            return
        if not isinstance(outputs, dict) or "features" not in outputs:
            raise RuntimeError(
                "KNNMonitor needs validation_step to return {'features': ..., 'labels': ...}"
            )
        loader = validation_loader(trainer, dataloader_idx)
        self.val_rows.add(loader, batch_idx, outputs["features"], outputs["labels"])

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self.active:
            return
        self.active = False
        device = pl_module.device
        query, query_labels = self.val_rows.gather(trainer, device)
        self.val_rows.reset()
        bank, bank_labels = self._encode_bank(trainer, pl_module)
        keep = bank_labels >= 0
        bank, bank_labels = bank[keep], bank_labels[keep]
        keep = query_labels >= 0
        query, query_labels = query[keep], query_labels[keep]
        if len(bank) == 0 or len(query) == 0:
            rank_zero_warn("KNNMonitor: no labelled training or validation images; skipping")
            return
        num_classes = self.num_classes or int(bank_labels.max()) + 1
        scores = knn_predict(
            query, bank, bank_labels, num_classes, self.k, self.temperature, self.chunk_size
        )
        # Every rank holds the same global result; sync_dist averages equal values (exact) and
        # keeps Lightning from warning about unsynced epoch-level metrics.
        pl_module.log("knn/val_top1", top_k_accuracy(scores, query_labels, 1), sync_dist=True)
        pl_module.log("knn/val_top5", top_k_accuracy(scores, query_labels, 5), sync_dist=True)

    @torch.no_grad()
    def _encode_bank(self, trainer: L.Trainer, pl_module: L.LightningModule):
        if self._bank_loader is None:
            datamodule = trainer.datamodule
            if datamodule is None or not hasattr(datamodule, "eval_train_dataloader"):
                raise RuntimeError(
                    "KNNMonitor needs a datamodule with eval_train_dataloader() (every "
                    "SimCLRDataModule has one): the training images without augmentation"
                )
            self._bank_loader = shard_loader(datamodule.eval_train_dataloader(), trainer)
        rows = RowCollector()
        was_training = pl_module.training
        pl_module.eval()
        with trainer.precision_plugin.val_step_context():
            for batch_idx, (x, labels) in enumerate(self._bank_loader):
                features = pl_module(x.to(pl_module.device, non_blocking=True))
                rows.add(self._bank_loader, batch_idx, features, labels.to(pl_module.device))
        pl_module.train(was_training)
        return rows.gather(trainer, pl_module.device)
