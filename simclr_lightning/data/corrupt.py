"""Image files that cannot be decoded: reading with an error that names the file, skipping
such files (``data.skip_corrupt``) and finding them all before training (``data.verify``).

One bad JPEG among a million should neither cost days of training nor surface as a traceback
from a loader worker: it is named, and either skipped with a warning or listed up front.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, get_worker_info

from simclr_lightning.distributed import rank_and_world_size
from simclr_lightning.errors import CorruptImageError

T = TypeVar("T")

# Images tried for one sample (the drawn one, then seeded substitutes) before skip_corrupt
# gives up: with a tenth of the files bad, 20 misses in a row happen once in 1e20 draws.
MAX_TRIES = 20
LISTED = 20  # bad files named in the verify message; with more, all go to a text file


class CorruptImageWarning(UserWarning):
    """A data file was skipped (``data.skip_corrupt``); given once per file and training
    process."""


def reason_of(err: BaseException) -> str:
    """Why decoding failed, in words a user can act on (PIL's own names a BytesIO)."""
    if isinstance(err, UnidentifiedImageError):
        return "not an image format PIL can read"
    return f"{type(err).__name__}: {err}"


def load_rgb(path: str) -> Image.Image:
    """The file decoded to RGB by PIL, or :class:`CorruptImageError` naming it."""
    return load_image(path, "RGB")


def load_image(path: str, mode: str) -> Image.Image:
    """The file decoded by PIL and converted to ``mode`` (``RGB``, or ``L`` for a grayscale
    model), or :class:`CorruptImageError` naming it."""
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            return to_8_bit(image).convert(mode)
    except Exception as err:
        reason = "empty file" if _is_empty(path) else reason_of(err)
        raise CorruptImageError(path, reason) from err


def to_8_bit(image: Image.Image) -> Image.Image:
    """A 16- or 32-bit integer grayscale image (PIL modes ``I;16*``, ``I``) as 8-bit ``L``,
    scaled to its top 8 bits as the device path's decoder scales it (``encoded.to_uint8``);
    PIL's own ``convert`` clips such values at 255 (a near-white image). Mode ``I`` from a
    PNG holds 16-bit values, from other formats signed 32-bit ones."""
    if image.mode.startswith("I;16"):
        shift = 8
    elif image.mode == "I":
        shift = 8 if image.format == "PNG" else 23  # int32 has 31 value bits, as torch counts
    else:
        return image
    pixels = np.asarray(image).astype(np.int64) >> shift
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))  # 2-D uint8: mode L


def _is_empty(path: str) -> bool:
    try:
        return Path(path).stat().st_size == 0
    except OSError:
        return False


def substitute(index: int, attempt: int, size: int) -> int:
    """The ``attempt``-th image served in place of a bad ``index``, as a position in the
    ``size`` images substitutes are drawn from: a function of the three alone (not of any RNG
    state), so a resumed run, every worker and every rank draw the same."""
    return random.Random(index * 1_000_003 + attempt).randrange(size)


class SkippedFiles:
    """Which of a dataset's files were skipped, and the one warning for each.

    The flags live in shared memory, so loader workers see each other's finds (a file is
    reported once, and not read again). A worker's own warnings go nowhere the user sees
    reliably, so the process that trains warns: at once without workers, else in
    :meth:`report`, which the data module calls on each batch it receives."""

    FOUND, REPORTED = 1, 2

    def __init__(self, files: Sequence[str]) -> None:
        self.files = list(files)
        self.flags = torch.zeros(len(self.files), dtype=torch.uint8).share_memory_()

    def is_bad(self, index: int) -> bool:
        return bool(self.flags[index])

    def mark(self, index: int, err: CorruptImageError, what: str) -> None:
        """Record that file ``index`` failed with ``err``; ``what`` says what happens instead."""
        if self.flags[index]:
            return
        if get_worker_info() is not None:
            self.flags[index] = self.FOUND
            return
        self.flags[index] = self.REPORTED
        _warn(err.path, err.reason, what)

    def report(self, what: str) -> None:
        """Warn, in this process, about the files workers found bad since the last call."""
        if get_worker_info() is not None or not bool((self.flags == self.FOUND).any()):
            return
        for index in (self.flags == self.FOUND).nonzero().flatten().tolist():
            self.flags[index] = self.REPORTED
            path = self.files[index]
            try:
                load_rgb(path)
                reason = "unreadable when served"
            except CorruptImageError as err:
                reason = err.reason
            _warn(path, reason, what)


def _warn(path: str, reason: str, what: str) -> None:
    warnings.warn(
        f"skipping image file {path!r} ({reason}): {what} (data.skip_corrupt=true)",
        CorruptImageWarning,
        stacklevel=3,
    )


SUBSTITUTED = "another image is served in its place"
IN_BATCH = "no decoder reads it on the device; the next image of its batch takes its slot"


class DeviceSkips:
    """Files that passed the workers' JPEG check but that no decoder reads where the batch is
    decoded (``decode: gpu``), each named once per training process.

    They are not flagged for the workers' seeded substitutes: every time, the batch serves
    the same stand-in (its next image), so what a step sees does not depend on whether this
    process met the file before: a resumed run, or another DDP rank, serves the same."""

    def __init__(self) -> None:
        self.reasons: dict[str, str] = {}

    def __contains__(self, path: object) -> bool:
        return path in self.reasons

    def add(self, err: CorruptImageError) -> None:
        if err.path not in self.reasons:
            self.reasons[err.path] = err.reason
            _warn(err.path, err.reason, IN_BATCH)


class SkipCorrupt(SkippedFiles):
    """Serves a seeded substitute in place of an undecodable image, at most
    :data:`MAX_TRIES` images deep, so batches stay full and no loop is endless."""

    def __init__(self, files: Sequence[str], max_tries: int = MAX_TRIES) -> None:
        super().__init__(files)
        self.max_tries = max_tries

    def fetch(self, get: Callable[[int], T], index: int, pool: Sequence[int] | None = None) -> T:
        """``get(index)``, or a substitute's: drawn from ``pool`` (indices of ``files``, the
        view a loader indexes, such as a labelled subset), or from all files if None."""
        size = len(self.files) if pool is None else len(pool)
        last: CorruptImageError | None = None
        for attempt in range(self.max_tries):
            i = index
            if attempt > 0:
                i = substitute(index, attempt, size)
                i = i if pool is None else pool[i]
            if self.is_bad(i):
                continue
            try:
                return get(i)
            except CorruptImageError as err:
                last = err
                self.mark(i, err, SUBSTITUTED)
        n_bad = int((self.flags > 0).sum())
        raise CorruptImageError(
            last.path if last else self.files[index],
            f"{last.reason if last else 'known bad'}; it and the {self.max_tries - 1} images "
            f"drawn in its place were all unreadable ({n_bad} bad files found so far), so "
            f"data.skip_corrupt gave up: too much of the data is damaged",
        )


class SkipsCorruptFiles:
    """Mixin for a map-style dataset of image files whose ``read_item`` reads one sample: with
    ``skip`` set, an undecodable file's sample is replaced by :class:`SkipCorrupt`'s choice."""

    skip: SkipCorrupt | None = None
    # the indices substitutes come from (None: all); see :func:`substitutes_within`
    substitutes: Sequence[int] | None = None

    def read_item(self, index: int):
        raise NotImplementedError

    def __getitem__(self, index: int):
        if self.skip is None:
            return self.read_item(index)
        return self.skip.fetch(self.read_item, index, self.substitutes)


def substitutes_within(dataset: Dataset, indices: list[int]) -> list[int]:
    """``indices``, the only images of ``dataset`` a loader will index (a labelled subset),
    once a dataset that skips bad files draws their substitutes from them alone: an image
    outside the subset, and its label, must not be served in a bad one's place."""
    if isinstance(dataset, SkipsCorruptFiles):
        dataset.substitutes = tuple(indices)
    return indices


class _Decodes(Dataset):
    """``(path, reason or None)`` per file: the verify pass, run in loader workers."""

    def __init__(self, files: Sequence[str]) -> None:
        self.files = list(files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[str, str | None]:
        path = self.files[index]
        try:
            load_rgb(path)
        except CorruptImageError as err:
            return path, err.reason
        return path, None


class CorruptFilesError(CorruptImageError):
    """``data.verify`` found undecodable files: all of them in one message (the first
    :data:`LISTED`; with more, every one in a text file the message names)."""

    def __init__(self, bad: Sequence[tuple[str, str]], total: int, listing: Path | None) -> None:
        shown = "; ".join(f"{path!r} ({reason})" for path, reason in bad[:LISTED])
        more = f"; and {len(bad) - LISTED} more" if len(bad) > LISTED else ""
        where = f" (all listed in {str(listing)!r})" if listing is not None else ""
        ValueError.__init__(
            self,
            f"data.verify=true found {len(bad)} of {total} image files undecodable{where}: "
            f"{shown}{more}. Remove or replace them, or set data.skip_corrupt=true to skip them",
        )
        self.path, self.reason = bad[0]
        self.bad, self.total, self.listing = list(bad), total, listing

    def __reduce__(self):
        return type(self), (self.bad, self.total, self.listing)


def verify_files(files: Sequence[str], workers: int, trainer=None) -> None:
    """Decode every file once (``workers`` loader processes) and raise one
    :class:`CorruptFilesError` naming all that fail; when more than :data:`LISTED` do, the full
    list goes to ``corrupt_files.txt`` in the trainer's root folder (or the current one), if it
    can be written.

    Under DDP each process decodes its own share (every world-th file) and the finds are
    gathered, so W processes check the data W times faster instead of W times over, and
    every one raises the same error."""
    rank, world = rank_and_world_size()
    mine = range(rank, len(files), world)
    loader = DataLoader(
        _Decodes([files[i] for i in mine]), batch_size=64, num_workers=workers, collate_fn=_as_list
    )
    reasons = [reason for rows in loader for _, reason in rows]
    found = [(i, files[i], r) for i, r in zip(mine, reasons, strict=True) if r is not None]
    if world > 1:
        shares: list = [None] * world
        dist.all_gather_object(shares, found)
        found = sorted(row for share in shares for row in share)
    bad = [(path, reason) for _, path, reason in found]
    if not bad:
        return
    listing: Path | None = None
    if len(bad) > LISTED:
        root = Path(trainer.default_root_dir) if trainer is not None else Path.cwd()
        listing = root / "corrupt_files.txt"
        if rank == 0:
            try:
                listing.parent.mkdir(parents=True, exist_ok=True)  # a run's root not made yet
                listing.write_text("".join(f"{path}\t{reason}\n" for path, reason in bad))
            except OSError:
                listing = None
        if world > 1:  # every process names the list only if it was written
            written = [listing is not None]
            dist.broadcast_object_list(written, src=0)
            listing = listing if written[0] else None
    raise CorruptFilesError(bad, len(files), listing)


def _as_list(rows: list) -> list:
    return rows


def dataset_files(dataset: Dataset) -> list[str]:
    """The image files a folder dataset reads (ImageFolder's ``samples`` or ``files``)."""
    samples = getattr(dataset, "samples", None)
    if samples is not None:
        return [path for path, _ in samples]
    return list(dataset.files)  # type: ignore[attr-defined]
