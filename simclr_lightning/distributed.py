"""Collectives of this library: the differentiable gather the loss needs, and the row
bookkeeping that lets evaluation callbacks see every validation image exactly once under DDP."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler


def rank_and_world_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class HostGroup:
    """A gloo process group for agreements between hosts (a flag per step): gloo all-reduces
    host tensors, so no process waits for its GPU. The run's own group when it is gloo and no
    ``timeout`` of its own is asked for; else one made on first use, which every process must
    reach at the same point (it waits up to ``timeout`` there too). Made again for a new
    process group (a later fit in the same process)."""

    def __init__(self, timeout: timedelta | None = None) -> None:
        self._group: Any = None
        self._world: Any = None
        self.timeout = timeout

    def get(self) -> Any:
        world = dist.group.WORLD
        if self._group is None or self._world is not world:
            if dist.get_backend() == "gloo" and self.timeout is None:
                self._group = world
            else:
                self._group = dist.new_group(backend="gloo", timeout=self.timeout)
            self._world = world
        return self._group


def mean_over_processes(value: Tensor) -> Tensor:
    """``value`` (detached) averaged over every process, the same on all of them: one
    all-reduce, queued on the device. Lightning's ``sync_dist`` on a per-step value does the
    same after a barrier, and under NCCL a barrier makes the host wait for the GPU at every
    step. Log the result without ``sync_dist`` (see :func:`already_synced`)."""
    world = rank_and_world_size()[1]
    total = sum_over_processes(value)
    return total if world == 1 else total / world


def sum_over_processes(value: Tensor) -> Tensor:
    """``value`` (detached) summed over every process, the same on all of them: one
    all-reduce queued on the device, no barrier (see :func:`mean_over_processes`)."""
    value = value.detach()
    if rank_and_world_size()[1] == 1:
        return value
    total = value.clone()
    dist.all_reduce(total)
    return total


def already_synced(*names: str) -> None:
    """Silence Lightning's advice to log ``names`` with ``sync_dist=True``: their values come
    from :func:`mean_over_processes`, so every process already logs the same number."""
    for name in names:
        warnings.filterwarnings(
            "ignore",
            message=rf"It is recommended to use `self\.log\({re.escape(repr(name))}, \.\.\., "
            r"sync_dist=True\)`",
            category=PossibleUserWarning,
        )


def gather_with_grad(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, differentiably.

    The backward pass sums, on each rank, the gradients every rank computed for that
    rank's slice (a reduce-scatter): the negatives that live on other ranks send their
    gradient home. A plain ``dist.all_gather`` would drop it.
    """
    return _GatherWithGrad.apply(tensor)


# torch >= 2.13 renames the tensor collectives (the old names warn deprecated at every call).
_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _GatherWithGrad(torch.autograd.Function):
    """All-gather forward, reduce-scatter (sum) backward: one collective each way, on gloo
    and NCCL alike, without ``torch.distributed.nn`` (deprecated in torch 2.14)."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        world = dist.get_world_size()
        out = tensor.new_empty((world * tensor.shape[0], *tensor.shape[1:]))
        _all_gather_tensor(out, tensor.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        world = dist.get_world_size()
        out = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
        _reduce_scatter_tensor(out, grad.contiguous(), op=dist.ReduceOp.SUM)
        return out


def sample_positions(dataloader: DataLoader, batch_idx: int, batch_len: int) -> Tensor | None:
    """Dataset positions of the rows of batch ``batch_idx``, or None when the loader's order
    cannot be known (shuffled, custom batch sampler).

    Under DDP, Lightning gives rank r of W the samples r, r+W, r+2W, ... of an unshuffled
    loader and pads with repeats up to a multiple of W; padded rows get positions >= the
    dataset size, so callers can drop them and score every sample exactly once. A batch
    shorter than its sampler's share lost the files ``skip_corrupt`` left out: the positions
    of those files are taken out, so that the rows after them (a padding repeat too) keep
    their own.
    """
    batch_size = dataloader.batch_size
    sampler = dataloader.sampler
    if batch_size is None:
        return None
    if isinstance(sampler, DistributedSampler) and not sampler.shuffle:
        rank, step = sampler.rank, sampler.num_replicas
    elif isinstance(sampler, SequentialSampler):
        rank, step = 0, 1
    else:
        return None
    start = batch_idx * batch_size
    share = max(0, min(batch_size, len(sampler) - start))
    positions = rank + torch.arange(start, start + share) * step
    if share != batch_len:
        size = dataset_size(dataloader)
        from simclr_lightning.data.subsets import left_out  # the data package imports this one

        positions = positions[~left_out(dataloader.dataset, positions % size)]
        if len(positions) != batch_len:  # rows missing for another reason: order unknown
            return None
    return positions


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
    """Accumulates ``(features, labels, positions)`` of one pass over a loader: :meth:`gather`
    gives every rank's rows once each, in dataset order when it is known; :meth:`shard` this
    rank's rows and their dataset positions, for data that stays split over ranks. Features
    are kept in ``dtype``."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        self.dtype = dtype
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
        self.features.append(features.detach().to(self.dtype))
        self.labels.append(labels.detach().long())
        self.positions.append(positions)  # on the host until the pass ends: no wait a batch

    def __len__(self) -> int:
        return sum(len(f) for f in self.features)

    def _local(self, trainer: L.Trainer, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        dim = self.features[0].shape[1] if self.features else 0
        if trainer.world_size > 1:  # a rank with no rows still joins the collectives
            dim = int(trainer.strategy.all_gather(torch.tensor(dim, device=device)).max())
        if self.features:
            feats = torch.cat(self.features).to(device)
            labels = torch.cat(self.labels).to(device)
            pos = torch.cat(self.positions).to(device)
        else:
            feats = torch.zeros(0, dim, device=device, dtype=self.dtype)
            labels = torch.zeros(0, dtype=torch.long, device=device)
            pos = torch.zeros(0, dtype=torch.long, device=device)
        return feats, labels, pos

    def _ordered(self, trainer: L.Trainer) -> bool:
        if trainer.world_size > 1:
            return trainer.strategy.reduce_boolean_decision(self.ordered, all=True)
        return self.ordered

    def shard(self, trainer: L.Trainer, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """This rank's features and labels without padding repeats, and their positions in the
        dataset, increasing (rank-major running numbers when the loader's order is unknown).
        Ranks must hold disjoint samples, as :func:`shard_loader` gives them."""
        feats, labels, pos = self._local(trainer, device)
        if self._ordered(trainer) and self.size is not None:
            keep = pos < self.size  # DistributedSampler's padding
            return feats[keep], labels[keep], pos[keep]
        sizes = [len(feats)]
        if trainer.world_size > 1:
            n = torch.tensor([len(feats)], device=device)
            sizes = trainer.strategy.all_gather(n).flatten().tolist()
        offset = sum(sizes[: trainer.global_rank])
        return feats, labels, torch.arange(offset, offset + len(feats), device=device)

    def gather(self, trainer: L.Trainer, device: torch.device) -> tuple[Tensor, Tensor]:
        """All ranks' features and labels; padding duplicates dropped when positions are known."""
        feats, labels, pos = self._local(trainer, device)
        ordered = self._ordered(trainer)
        if trainer.world_size > 1:
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


def loader_count(loaders) -> int:
    """How many loaders ``trainer.val_dataloaders`` (or ``test_dataloaders``) holds."""
    return len(loaders) if isinstance(loaders, (list, tuple, dict)) else int(loaders is not None)


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
        worker_init_fn=loader.worker_init_fn,
    )


def real_rows(
    dataloader: DataLoader | None, batch_idx: int, n: int, device: torch.device
) -> Tensor:
    """``[n]`` mask of the rows of batch ``batch_idx`` that are not DistributedSampler's padding
    repeats (all True when the loader's order is unknown), so each image counts once."""
    keep = torch.ones(n, dtype=torch.bool, device=device)
    positions = None if dataloader is None else sample_positions(dataloader, batch_idx, n)
    if positions is not None:
        keep &= positions.to(device) < dataset_size(dataloader)
    return keep


class PassCutShort(Exception):
    """:func:`encode_rows` stopped before the end of its loader: the run is being stopped."""


@torch.no_grad()
def encode_rows(
    trainer: L.Trainer,
    pl_module: L.LightningModule,
    loader: DataLoader,
    rows: RowCollector,
    normalize: bool = False,
    stop: Callable[[], bool] | None = None,
) -> RowCollector:
    """Add ``pl_module(x)`` (unit vectors if ``normalize``) and the labels of every batch of
    ``loader`` (this rank's shard, see :func:`shard_loader`) to ``rows``: in eval mode and the
    run's precision (images converted as Lightning's loops convert batches: to bf16 under
    bf16-true), the module's mode restored afterwards. Each batch first passes the data
    module's ``check_batch``, if it has one: under DDP a file one rank cannot read then stops
    every rank, as in Lightning's own loops. Then ``stop()``, if given (the same answer in
    every process): when true, :class:`PassCutShort` is raised, so that a pass over a whole
    training set does not outlast a scheduler's grace period after its signal."""
    was_training = pl_module.training
    pl_module.eval()
    check = getattr(trainer.datamodule, "check_batch", None)
    try:
        with trainer.precision_plugin.val_step_context():
            for batch_idx, batch in enumerate(loader):
                if check is not None:
                    check(batch)
                if stop is not None and stop():
                    raise PassCutShort(f"stopped at batch {batch_idx} of {len(loader)}")
                x, labels = batch
                # as Lightning's loops: a *-true precision runs on inputs of the weights' dtype
                x = trainer.precision_plugin.convert_input(x)
                features = pl_module(x.to(pl_module.device, non_blocking=True))
                if normalize:
                    features = torch.nn.functional.normalize(features.float(), dim=1)
                rows.add(loader, batch_idx, features, labels)  # moved once, at the end
    finally:
        pl_module.train(was_training)
    return rows
