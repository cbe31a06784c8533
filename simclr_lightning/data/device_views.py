"""Views made on the training device (``augment: gpu``): what a data module does with a batch
once Lightning has moved it there."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from simclr_lightning.data.corrupt import DeviceSkips
from simclr_lightning.data.encoded import ImageBatch
from simclr_lightning.data.failed_batches import FailedBatch
from simclr_lightning.data.gpu.augment import derived_seed
from simclr_lightning.errors import CorruptImageError
from simclr_lightning.resume import gather_per_rank, own_rank

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
    check_batch: Callable[..., None]  # the data module's per-step check of a batch

    def _seed_gpu_augment(self) -> None:
        # seed_everything gives every rank the same default generators, so without a stream
        # of its own per rank each rank would draw the same crops and jitter for batch
        # position i. (Not so in loader workers: there each sample's torch, NumPy and random
        # states are seeded from (seed, epoch, index) by SeededSamples, and each rank's workers
        # start from a base seed of their own, see TrainOrder.loader.)
        # The crop boxes of images of different sizes (decode: gpu) come from a CPU stream of
        # the rank's own, seeded apart from the device stream.
        device = self.trainer.strategy.root_device
        seed = torch.initial_seed() + self.trainer.global_rank
        self.gpu_augment.generator = torch.Generator(device=device).manual_seed(seed)
        self.gpu_augment.box_generator = torch.Generator().manual_seed(derived_seed(seed))

    def augment_states(self) -> dict[str, list[Tensor]]:
        """Every rank's state of each on-device augmentation stream, by checkpoint key."""
        return {
            key: gather_per_rank(self.trainer, generator.get_state())
            for key, generator in self._augment_generators().items()
        }

    def load_augment_states(self, state_dict: dict) -> None:
        for key, generator in self._augment_generators().items():
            state = own_rank(state_dict.get(key) or [], self.trainer)
            if state is None:  # not saved, or a rank the saving run had not: its fresh seed
                continue
            if state.numel() != generator.get_state().numel():
                rank_zero_warn(
                    f"the checkpoint's augment: gpu random state is of another device type "
                    f"than this run's {generator.device.type} (saved on CPU, resumed on GPU, "
                    f"or back): the views go on from this run's seed, not exactly as before"
                )
                continue
            generator.set_state(state)

    def _augment_generators(self) -> dict[str, torch.Generator]:
        """The on-device augmentation's streams by checkpoint key: its device generator and
        the host one that draws crop boxes for images of different sizes."""
        aug = self.gpu_augment
        if aug is None or self.trainer is None:
            return {}
        pairs = {"gpu_augment_generator": aug.generator}
        pairs["gpu_augment_box_generator"] = aug.box_generator
        return {key: gen for key, gen in pairs.items() if gen is not None}

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Make both SimCLR views of the whole batch on its device (``augment: gpu``).

        Here, not before the transfer, each training batch gets the data module's per-step
        check (:meth:`check_batch`: under DDP every process learns whether one of them could
        not read its batch): with ``decode: gpu`` a file may turn out bad only now, when it is
        decoded, and a process raising alone would leave the others waiting."""
        if not self.on_device or self.trainer is None or not self.trainer.training:
            return batch
        try:
            images = batch if isinstance(batch, FailedBatch) else self.device_images(batch)
        except CorruptImageError as err:
            images = FailedBatch(err)
        self.check_batch(images, training=True)
        if isinstance(images, FailedBatch):  # no other process to tell: the file's own error
            raise images.error
        # Lightning casts a batch to the precision's dtype before the transfer (uint8 images
        # or indices then); the views made here are float32 and need the cast (``*-true``).
        return self.trainer.precision_plugin.convert_input(self.views_of(*images))

    def device_views(self, batch):
        """``((view_a, view_b), labels)`` from what the training loader yields when views are
        made on the device: indices into the resident store, an :class:`ImageBatch`, or a
        uint8 image tensor, all already on the training device."""
        return self.views_of(*self.device_images(batch))

    def device_images(self, batch) -> tuple[Tensor | list[Tensor], Tensor]:
        """``(uint8 images, labels)`` of a training batch on its device: gathered from the
        resident store, or decoded, where a file no decoder reads (skipped with
        ``skip_corrupt``) gets its substitute's image and label."""
        if self.device_store is not None:
            return self.device_store.to(batch.device).gather(batch)
        images, labels = batch
        if isinstance(images, ImageBatch):  # undecoded or of different sizes
            decoded, sources = images.decode_with_sources(labels.device, self.device_skips)
            return decoded, take_slots(labels, sources)
        return images, labels

    def views_of(self, images: Tensor | list[Tensor], labels: Tensor):
        """``((view_a, view_b), labels)``: both views of uint8 images on the labels' device."""
        self.gpu_augment.to(labels.device)
        if isinstance(images, list):  # decoded from an ImageBatch: maybe of different sizes
            return self.gpu_augment.two_views_of_list(images), labels
        return self.gpu_augment.two_views(images), labels


def take_slots(labels: Tensor, sources: Sequence[int]) -> Tensor:
    """``labels`` with slot ``i`` holding ``labels[sources[i]]``: one copy on their device per
    substituted slot (Python indices, so nothing crosses between host and device)."""
    moved = [(i, j) for i, j in enumerate(sources) if i != j]
    if not moved:
        return labels
    out = labels.clone()
    for i, j in moved:
        out[i] = labels[j]
    return out
