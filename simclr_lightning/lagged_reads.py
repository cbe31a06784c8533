"""Reading small device values on the host a few steps late, so that checks of every step (a
NaN loss, a collapse) never make the host wait for the GPU.

A ``.item()``, ``bool(tensor)`` or ``.tolist()`` on a CUDA tensor blocks the host until the GPU
has finished everything queued before it. Once a step, that empties the queue: while the host
then runs Lightning's loop and launches the next step's first kernels, the GPU idles. Here each
value is instead copied into pinned host memory behind a CUDA event and read a fixed number of
steps later, by when the GPU has long produced it.

The lag is a count of steps, not "whenever the event has passed": under DDP every process
must reach the same verdict at the same step (a process that stops alone leaves the others
waiting in a collective), and a count is the same everywhere while timing is not.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Iterator
from typing import Protocol

import torch
from torch import Tensor


class Marker(Protocol):
    """A point in the device's work queue: ``synchronize`` returns once everything queued
    before it is done."""

    def synchronize(self) -> None: ...


class _Done:
    """Host tensors are ready at once."""

    def synchronize(self) -> None:
        return None


def device_marker(device: torch.device) -> Marker:
    if device.type == "cuda":
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        return event
    return _Done()


class LaggedReads:
    """A queue of ``(key, values)`` pairs read on the host ``depth`` pushes after their own
    (waiting for the device only if it is that far behind), in the order they were pushed;
    on the CPU, where a read costs no wait, at once.

    :meth:`drain` reads all of them, for the points where a check must be complete (before
    a checkpoint is written, at the end of an epoch).
    """

    def __init__(self, depth: int = 2, marker: Callable[[torch.device], Marker] = device_marker):
        if depth < 1:
            raise ValueError(f"depth={depth} is invalid: must be >= 1")
        self.depth = depth
        self._marker = marker
        self._pending: deque[tuple[Hashable, Tensor, Marker]] = deque()

    def __len__(self) -> int:
        return len(self._pending)

    def push(self, key: Hashable, *values: Tensor) -> None:
        """Queue scalar tensors (one device) for reading; nothing here waits for the device
        unless ``depth`` pairs are already waiting."""
        flat = torch.stack([v.detach().reshape(()).float() for v in values])
        if flat.is_cuda:
            host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            host.copy_(flat, non_blocking=True)
        else:
            host = flat.clone()
        self._pending.append((key, host, self._marker(flat.device)))

    def ready(self) -> Iterator[tuple[Hashable, list[float]]]:
        """The pairs now ``depth`` pushes old (every pair, on the CPU), oldest first."""
        while self._pending:
            key, host, marker = self._pending[0]
            if len(self._pending) <= self.depth and not isinstance(marker, _Done):
                return
            marker.synchronize()
            self._pending.popleft()
            yield key, host.tolist()

    def clear(self) -> None:
        """Forget every pair still waiting, unread (an earlier fit's)."""
        self._pending.clear()

    def drain(self) -> Iterator[tuple[Hashable, list[float]]]:
        """Every pair still waiting, oldest first, waiting for the device as needed."""
        while self._pending:
            key, host, marker = self._pending.popleft()
            marker.synchronize()
            yield key, host.tolist()
