"""Device-resident image datasets drawn by index.

CIFAR-size datasets (50k x 3 x 32 x 32 uint8 = 150 MiB) fit on every GPU, so per-image
CPU decoding and augmentation (the bottleneck of SimCLR on small images) can be
skipped: the DataLoader only yields index batches, without workers, and the training
step gathers the images on the device and augments them there with
:class:`~simclr_lightning.data.gpu.GPUAugment`.

Sharding is the training loader's: it draws :class:`IndexDataset`'s indices through the
library's :class:`~simclr_lightning.data.sampler.ResumableSampler`, a ``DistributedSampler``
that Lightning keeps instead of injecting its own, so each rank gets a disjoint shard of one
``seed + epoch`` shuffle. When the dataset size is not divisible by the world size, the
sampler always pads the shuffled list with its first indices (a few images are seen twice
per epoch); the data module's ``drop_last`` only drops each rank's incomplete last batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from simclr_lightning.errors import SettingError

__all__ = ["DeviceImageStore", "IndexDataset"]


class IndexDataset(Dataset[int]):
    """The integers ``0..n-1``: a DataLoader over it yields ``LongTensor`` index batches."""

    def __init__(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"IndexDataset size must be >= 0, got {n}")
        self.n = int(n)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for IndexDataset of size {self.n}")
        return index

    def __getitems__(self, indices: Sequence[int]) -> list[int]:
        # Batched fetch used by the DataLoader: one call per batch instead of one per sample.
        return [self[i] for i in indices]

    def __repr__(self) -> str:
        return f"IndexDataset({self.n})"


def check_fits(nbytes: int, device: torch.device) -> None:
    """A one-line error before a resident copy that the GPU cannot hold: the run stops at its
    first batch, not in an out-of-memory traceback."""
    free, total = torch.cuda.mem_get_info(device)
    if nbytes > free:
        raise SettingError(
            f"data.resident=true: the training images take {nbytes / 2**30:.2f} GiB and "
            f"{device} has {free / 2**30:.2f} GiB free of {total / 2**30:.2f} GiB; set "
            f"data.resident=false (views are then made from batches the loader reads)"
        )


class DeviceImageStore:
    """A whole image dataset (``[N, C, H, W]``, uint8 to save memory) and its labels.

    Deliberately not an ``nn.Module``: as a module buffer the dataset would land in
    checkpoints and DDP would broadcast it from rank 0 on every forward.
    """

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if images.ndim != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"labels must be [N] with N={images.shape[0]}, got shape {tuple(labels.shape)}"
            )
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: torch.device | str) -> DeviceImageStore:
        """Move the data to ``device`` in place and return ``self``.

        Idempotent: ``Tensor.to`` returns the same tensor when it is already there, so
        calling this at every ``on_fit_start``/``setup`` costs nothing after the first.
        """
        device = torch.device(device)
        if device.type == "cuda" and not self.images.is_cuda:  # from the host: does it fit?
            check_fits(self.images.nbytes + self.labels.nbytes, device)
        self.images = self.images.to(device)
        self.labels = self.labels.to(device)
        return self

    def gather(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Images and labels at ``indices``, returned on the indices' device.

        Indexing happens where the data lives; if that differs from the indices' device
        (store not moved yet) the rows are copied over, which is correct but slow.
        """
        idx = indices.to(device=self.images.device, dtype=torch.long)
        images = self.images.index_select(0, idx)
        labels = self.labels.index_select(0, idx)
        return images.to(indices.device), labels.to(indices.device)

    def __repr__(self) -> str:
        return (
            f"DeviceImageStore(images={tuple(self.images.shape)} {self.images.dtype}, "
            f"labels={tuple(self.labels.shape)}, device={self.device})"
        )
