"""Views made on the training device (``augment: gpu``): what a data module does with a batch
once Lightning has moved it there."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from simclr_lightning.data.corrupt import DeviceSkips
from simclr_lightning.data.encoded import ImageBatch

if TYPE_CHECKING:
    import lightning as L

    from simclr_lightning.data.device_store import DeviceImageStore
    from simclr_lightning.data.gpu import GPUAugment


class DeviceViews:
    """Mixin of :class:`~simclr_lightning.data.base.SimCLRDataModule`: both SimCLR views of
    the whole batch, made on its device in ``on_after_batch_transfer``."""

    trainer: L.Trainer | None
    on_device: bool
    device_store: DeviceImageStore | None
    gpu_augment: GPUAugment | None
    # files that only the device's decoder finds bad, skipped (with skip_corrupt) by serving
    # the next image of their batch; None: such a file stops the run
    device_skips: DeviceSkips | None = None

    def _seed_gpu_augment(self) -> None:
        # seed_everything gives every rank the same default generators, so without a stream
        # of its own per rank each rank would draw the same crops and jitter for batch
        # position i. (Loader workers get the rank mixed into their seeds by Lightning.)
        device = self.trainer.strategy.root_device
        generator = torch.Generator(device=device)
        generator.manual_seed(torch.initial_seed() + self.trainer.global_rank)
        self.gpu_augment.generator = generator

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Make both SimCLR views of the whole batch on its device (``augment: gpu``)."""
        if not self.on_device or self.trainer is None or not self.trainer.training:
            return batch
        return self.device_views(batch)

    def device_views(self, batch):
        """``((view_a, view_b), labels)`` from what the training loader yields when views are
        made on the device: indices into the resident store, an :class:`ImageBatch`, or a
        uint8 image tensor, all already on the training device."""
        if self.device_store is not None:
            images, labels = self.device_store.to(batch.device).gather(batch)
        else:
            images, labels = batch
        self.gpu_augment.to(labels.device)
        if isinstance(images, ImageBatch):  # undecoded or of different sizes
            decoded = images.decode(labels.device, self.device_skips)
            return self.gpu_augment.two_views_of_list(decoded), labels
        return self.gpu_augment.two_views(images), labels
