"""Counting, on a CPU, the reads that would make the host wait for a GPU.

On a CPU a read costs nothing, so it cannot be timed. :class:`DeviceReads` instead follows
which tensors hold values computed from what a GPU run keeps on the device (the model's
weights and buffers, each batch) and records every op that reads one of them back on the
host: a scalar read (``.item()``, ``float()``, ``bool()``, a Python ``if``) and the ops whose
output size depends on the values (``nonzero``, a boolean-mask index, ``masked_select``).
A tensor made on the host (``torch.tensor(lr)``, the lagged loss) stays free to read, as on a
GPU. Not seen: ``.tolist()`` (not a dispatched op on a CPU; ``HostReads`` in
test_lagged_reads.py catches it) and tensors made on the device from nothing."""

from __future__ import annotations

import traceback
from collections import Counter
from collections.abc import Callable

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakTensorKeyDictionary

aten = torch.ops.aten
# ops that hand a value to the host, or size their output by the values
READS = {
    aten._local_scalar_dense,
    aten.is_nonzero,
    aten.equal,
    aten.nonzero,
    aten.masked_select,
    aten._unique2,
    aten.unique_consecutive,
    aten.unique_dim,
}
INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


def _bool_index(func, args) -> bool:
    if func.overloadpacket not in INDEXING or len(args) < 2:
        return False
    return any(
        isinstance(i, Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] or ()
    )


def _caller() -> str:
    """The innermost three frames outside torch and this file: where the read happened."""
    frames = [
        f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} {frame.name}"
        for frame in reversed(traceback.extract_stack())
        if "/torch/" not in frame.filename and frame.filename != __file__
    ]
    return " < ".join(frames[:3])


class DeviceReads(TorchDispatchMode):
    """``counts``: where each read of a device value happened, and how often."""

    def __init__(self, *device_values: Tensor) -> None:
        super().__init__()
        self._on_device = WeakTensorKeyDictionary()
        self.counts: Counter[str] = Counter()
        self.mark(*device_values)

    def mark(self, *tensors: Tensor) -> None:
        """Values a GPU run would hold on the device."""
        for tensor in tensors:
            self._on_device[tensor] = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        from_device = any(t in self._on_device for t in inputs)
        if from_device and (func.overloadpacket in READS or _bool_index(func, args)):
            self.counts[f"{func.overloadpacket.__name__} at {_caller()}"] += 1
        out = func(*args, **kwargs)
        if from_device:
            self.mark(*(t for t in tree_leaves(out) if isinstance(t, Tensor)))
        return out


class MarkDeviceValues(L.Callback):
    """Marks what a GPU run keeps on the device: once training starts the weights and buffers
    of the module and of every module a callback holds (e.g. the probe's classifier), and
    each batch as the step gets it."""

    def __init__(self, reads: DeviceReads) -> None:
        self.reads = reads

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        modules = [pl_module] + [
            value
            for callback in trainer.callbacks
            for value in vars(callback).values()
            if isinstance(value, nn.Module)
        ]
        for module in modules:
            self.reads.mark(*module.parameters(), *module.buffers())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.reads.mark(*(t for t in tree_leaves(batch) if isinstance(t, Tensor)))


def device_reads_per_step(
    fit: Callable[[int, list[L.Callback]], object], steps: tuple[int, int] = (4, 8)
) -> dict[str, float]:
    """Reads of device values per training step, by place: ``fit(n, callbacks)`` trains ``n``
    steps with ``callbacks`` added, once per count in ``steps``; reads made once per run
    (setup, the epoch's end) cancel in the difference."""
    counts = []
    for n in steps:
        reads = DeviceReads()
        with reads:
            fit(n, [MarkDeviceValues(reads)])
        counts.append(reads.counts)
    extra = counts[1] - counts[0]  # Counter subtraction keeps the positive differences
    return {place: count / (steps[1] - steps[0]) for place, count in extra.items()}
