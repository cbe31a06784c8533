"""What every SimCLR data module shares: loaders, the three kinds of view, and early checks."""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2

from simclr_lightning.data.class_names import dataset_class_names  # noqa: F401 (notebook)
from simclr_lightning.data.device_store import DeviceImageStore, IndexDataset
from simclr_lightning.data.device_views import DeviceViews
from simclr_lightning.data.failed_batches import (
    CatchFailedSamples,
    ChecksBatches,
    CollateOrFail,
    StopTogether,
)
from simclr_lightning.data.gpu import GPUAugment
from simclr_lightning.data.loaders import TrainOrder, check_batch_size, loader_workers
from simclr_lightning.data.subsets import (
    check_same_labels,
    class_balanced_subset,
    dataset_labels,
    labelled_record,
    leaves_out_corrupt,
    listed_subset,
    stratified_order,
    substitutes_within,
)
from simclr_lightning.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SimCLRAugmentation,
    TwoViews,
    classify_transform,
    eval_crop_ratio,
    eval_transform,
    view_transform,
)
from simclr_lightning.data.worker_signals import shield_from_stop_signals
from simclr_lightning.errors import require

Task = Literal["pretrain", "classify"]
Augment = Literal["cpu", "gpu"]


class SimCLRDataModule(ChecksBatches, DeviceViews, L.LightningDataModule):
    """Base class: subclasses say where images come from, this class how they are served.

    Subclasses whose batches read image files that may fail to decode set
    ``reads_image_files``: under DDP every process then checks each batch together, training
    and evaluation (validation, test, the kNN bank) alike
    (:mod:`~simclr_lightning.data.failed_batches`), so a bad file stops all at one batch.

    Args:
        batch_size: images per device and step; the global batch is
            batch_size x devices x nodes.
        augmentation: the SimCLR view settings (each subclass defaults to the paper's for its
            data); mean/std left None take the dataset's channel statistics.
        task: ``pretrain`` serves ``((view_a, view_b), label)``; ``classify`` serves one lightly
            augmented view (random crop + flip), for linear evaluation and fine-tuning.
        augment: where the pretraining views are made. ``cpu``: torchvision v2 in the
            DataLoader workers. ``gpu``: the workers only decode; both views are made for the
            whole batch on the device in ``on_after_batch_transfer`` (:class:`GPUAugment`,
            per-sample parameters, same settings). Datasets held in memory (CIFAR, MNIST)
            then live on the device and the loader yields only indices.
        num_workers: loader processes per device; None: Lightning's suggestion for the
            machine (cores / devices - 1, at most 16), so a 2-core laptop and a GPU server both
            get a fitting number.
        val_batch_size: None means ``batch_size``.
        drop_last: drop each epoch's incomplete last training batch. None: ``pretrain`` drops
            it (NT-Xent wants full batches); ``classify`` keeps it, training on every labelled
            image each epoch, but leaves out a last batch of one image per process (a training
            BatchNorm cannot use one).
        label_fraction: with ``task: classify``, train on this fraction of each class's images
            (0.01 and 0.1: SimCLR's semi-supervised protocol), the same ``label_seed``-ed
            choice on every rank.
        label_subset: with ``task: classify`` on an image folder, train only on the images this
            text file names (google-research/simclr's ``imagenet_subsets/1percent.txt``).
        val_subset: validate on this many images only (None: the whole split).
        val_seed: validation and test images are served in one seeded, class-stratified
            random order (:func:`stratified_order`), the same every epoch, so whatever part of
            the split is used (``val_subset``, ``trainer.limit_val_batches``,
            ``trainer.limit_test_batches``) is a class-balanced random sample of all of it;
            the monitors (probe, kNN, plot) see that sample. Predict keeps the files' order.
    """

    reads_image_files = False
    default_views = SimCLRAugmentation()  # the paper's CIFAR views; subclasses set their own

    def __init__(
        self,
        batch_size: int = 256,
        augmentation: SimCLRAugmentation | None = None,
        task: Task = "pretrain",
        augment: Augment = "cpu",
        num_workers: int | None = None,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        drop_last: bool | None = None,
        val_batch_size: int | None = None,
        label_fraction: float | None = None,
        label_seed: int = 0,
        label_subset: str | None = None,
        val_subset: int | None = None,
        val_seed: int = 0,
    ) -> None:
        super().__init__()
        require(
            isinstance(batch_size, int) and batch_size >= 2,
            "data.batch_size",
            batch_size,
            "an integer >= 2 (NT-Xent needs at least 2 images per device)",
        )
        require(task in ("pretrain", "classify"), "data.task", task, "pretrain or classify")
        require(augment in ("cpu", "gpu"), "data.augment", augment, "cpu or gpu")
        require(num_workers is None or num_workers >= 0, "data.num_workers", num_workers, ">= 0")
        require(
            val_subset is None or val_subset >= 1, "data.val_subset", val_subset, ">= 1 or null"
        )
        require(
            val_batch_size is None or val_batch_size >= 1,
            "data.val_batch_size",
            val_batch_size,
            ">= 1",
        )
        self.batch_size = batch_size
        aug = augmentation or self.default_views  # None (from Python): the data's own
        self.augmentation = aug.normalised_as(*self.channel_stats())
        self.task = task
        self.augment = augment
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.drop_last = task == "pretrain" if drop_last is None else drop_last
        self.val_batch_size = val_batch_size or batch_size
        for name, value in (("label_fraction", label_fraction), ("label_subset", label_subset)):
            require(
                value is None or task == "classify",
                f"data.{name}",
                value,
                "unset unless data.task=classify (it picks the labelled training images)",
            )
        require(
            label_fraction is None or 0 < label_fraction <= 1,
            "data.label_fraction",
            label_fraction,
            "in (0, 1]",
        )
        self.label_fraction = label_fraction
        self.label_seed = label_seed
        self.label_subset = label_subset
        self.val_subset = val_subset
        self.val_seed = val_seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.device_store: DeviceImageStore | None = None
        self.gpu_augment = GPUAugment(self.augmentation) if self.on_device else None
        self.train_order = TrainOrder()
        self._stop_together = StopTogether()

    # -- what subclasses provide -------------------------------------------------------------
    @property
    def num_classes(self) -> int | None:
        """Classes of the labels (None: unlabeled or unknown); monitors read it from here."""
        return None

    def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std used to normalise when the augmentation names none."""
        return IMAGENET_MEAN, IMAGENET_STD

    def make_dataset(self, split: Literal["train", "val"], transform) -> Dataset | None:
        """The split with ``transform`` applied to each image, or None if it does not exist.

        ``transform`` None (what :meth:`device_input_transform` may return) asks for images
        as the device path takes them: uint8 tensors or undecoded file bytes."""
        raise NotImplementedError

    def make_device_store(self, dataset: Dataset) -> DeviceImageStore | None:
        """The whole training split as one uint8 tensor, for datasets already in memory."""
        return None

    def device_input_transform(self):
        """What the workers do when views are made on the device: decode to a uint8 tensor
        (all images must then share one size)."""
        return v2.ToImage()

    @property
    def on_device(self) -> bool:
        return self.augment == "gpu" and self.task == "pretrain"

    # -- transforms -----------------------------------------------------------------------------
    def train_transform(self):
        aug = self.augmentation
        if self.on_device:
            return self.device_input_transform()
        if self.task == "pretrain":
            return TwoViews(view_transform(aug))
        return classify_transform(aug)

    @property
    def eval_resize_ratio(self) -> float | None:
        """Evaluation views are resized to size/ratio then centre-cropped (None: resized)."""
        return eval_crop_ratio(self.augmentation.image_size)

    def eval_transform(self):
        aug = self.augmentation
        return eval_transform(aug.image_size, aug.mean, aug.std, self.eval_resize_ratio)

    # -- Lightning hooks ------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        self.setup_predict_agreement(stage)
        if stage == "fit" and self.gpu_augment is not None and self.trainer is not None:
            self._seed_gpu_augment()
        if stage == "fit" and self.train_set is None:
            self.train_set = self._labelled(self.make_dataset("train", self.train_transform()))
            world = self.trainer.world_size if self.trainer is not None else 1
            check_batch_size(len(self.train_set), self.batch_size, world, self.drop_last, self.task)
            if self.on_device:
                self.device_store = self.make_device_store(self.train_set)
            if self.device_store is not None:  # without the files skip_corrupt left out
                n = len(self.device_store)
                check_batch_size(n, self.batch_size, world, self.drop_last, self.task)
        if self.val_set is None:
            self.val_set = self.make_dataset("val", self.eval_transform())

    def _labelled(self, dataset: Dataset) -> Dataset:
        """The training split, or its labelled subset for semi-supervised fine-tuning (whose
        bad files, with ``skip_corrupt``, get substitutes from the subset: no other labels)."""
        if self.label_subset is not None:
            indices = listed_subset(dataset, self.label_subset)
        elif self.label_fraction is not None:
            indices = class_balanced_subset(dataset, self.label_fraction, self.label_seed)
        else:
            return dataset
        return Subset(dataset, substitutes_within(dataset, indices))

    def device_collate_fn(self):
        """How workers' samples form a batch for views made on the device (None: stacking)."""
        return None

    @property
    def workers(self) -> int:
        """Loader processes per device: ``num_workers``, or what suits this machine."""
        return loader_workers(self.num_workers, self.trainer)

    def _loader(self, dataset: Dataset, batch_size: int) -> DataLoader:
        """An evaluation loader: in order, every image (with ``skip_corrupt``, but the bad
        ones). Under DDP, a batch with a file that cannot be read arrives as a
        :class:`FailedBatch` (see :meth:`check_batch`)."""
        workers = self.workers
        collate_fn = leaves_out_corrupt(dataset)
        if self.evaluation_stops_together:
            dataset, collate_fn = CatchFailedSamples(dataset), CollateOrFail(collate_fn)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            collate_fn=collate_fn,
            num_workers=workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and workers > 0,
            worker_init_fn=shield_from_stop_signals,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled by (seed, epoch) with per-sample view seeds: a checkpoint resumes it
        mid-epoch (:class:`TrainOrder`)."""
        if self.train_set is None:
            self.setup("fit")
        if self.device_store is not None:  # images live on the device: serve indices only
            indices = IndexDataset(len(self.device_store))
            return self.train_order.loader(
                indices, self.trainer, self.batch_size, seeded=False, drop_last=self.drop_last,
                # pinned, Lightning's copy of each index batch does not make the host wait
                pin_memory=self.pin_memory and torch.cuda.is_available(),
            )  # fmt: skip
        workers = self.workers
        return self.train_order.loader(
            self.train_set,
            self.trainer,
            self.batch_size,
            seeded=not self.on_device,
            catch_failed=self.stops_together,
            drop_last=self.drop_last,
            drop_single_last=self.task == "classify" and not self.drop_last,
            num_workers=workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and workers > 0,
            collate_fn=self.device_collate_fn() if self.on_device else None,
            # a scheduler's SIGTERM to every process must not kill them before the step is saved
            worker_init_fn=shield_from_stop_signals,
        )

    def state_dict(self) -> dict:
        """The training order's seed and position, every rank's on-device augmentation
        generator and the labelled images: what a checkpoint needs to continue the data."""
        return {"train_order": self.train_order.state_dict(), "labelled": labelled_record(self),
                **self.augment_states()}  # fmt: skip

    def load_state_dict(self, state_dict: dict) -> None:
        check_same_labels(state_dict, labelled_record(self), self.trainer)
        self.train_order.load_state_dict(state_dict.get("train_order", {}))
        self.load_augment_states(state_dict)

    def held_out_order(self) -> list[int]:
        """Every index of the validation split in one seeded (``val_seed``), class-stratified
        random order (:func:`stratified_order`; a seeded random order when the split keeps no
        labels): the order validation and test serve it in, the same every epoch and on every
        rank, so any prefix a run uses is a class-balanced random sample of the split."""
        labels = dataset_labels(self.val_set)
        if labels is None:  # no labels to stratify by: a seeded random order
            generator = torch.Generator().manual_seed(self.val_seed)
            return torch.randperm(len(self.val_set), generator=generator).tolist()
        return stratified_order(labels, self.val_seed).tolist()

    def val_sample(self) -> Dataset:
        """The validation images in :meth:`held_out_order` (the first ``val_subset``)."""
        return Subset(self.val_set, self.held_out_order()[: self.val_subset])

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return self._loader(self.val_sample(), self.val_batch_size)

    def test_dataloader(self) -> DataLoader | list:
        """The whole validation split (``val_subset`` does not cut it) in validation's
        :meth:`held_out_order`, so a test cut short (``trainer.limit_test_batches``) is a
        class-balanced sample too, not the first classes of a sorted folder. The loader serves
        a ``Subset`` in that order: under DDP, row positions
        (:func:`~simclr_lightning.distributed.sample_positions`) are positions in it, through
        which bad files left out are found, and each image still counts once."""
        if self.val_set is None:
            return []
        return self._loader(Subset(self.val_set, self.held_out_order()), self.val_batch_size)

    def predict_dataloader(self) -> DataLoader | list:
        """The whole validation split in its own (file) order: a prediction's row is named by
        its dataset index (:class:`~simclr_lightning.callbacks.PredictionWriter`)."""
        if self.val_set is None:
            return []
        self.refuse_empty_shards(len(self.val_set), f"{type(self).__name__}'s held-out split")
        return self._loader(self.val_set, self.val_batch_size)

    def eval_train_dataloader(self) -> DataLoader:
        """The labelled training split without augmentation: the memory bank of a kNN monitor."""
        dataset = self.make_dataset("train", self.eval_transform())
        return self._loader(dataset, self.val_batch_size)
