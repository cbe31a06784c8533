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
from lightning.pytorch.utilities import rank_zero_warn
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
    if isinstance(err, Image.DecompressionBombError):  # a large photo, not a damaged file
        return (
            f"larger than PIL's decompression-bomb limit, not damaged ({err}); shrink it, or "
            f"raise PIL.Image.MAX_IMAGE_PIXELS (data.augment=gpu decodes it without the limit)"
        )
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
    """A grayscale image deeper than 8 bits as 8-bit ``L``. 16-bit values (PIL modes ``I;16*``,
    and ``I`` from a PNG or PGM) keep their top 8 bits, as the device path's decoder scales
    them (``encoded.to_uint8``). 32-bit ones (``I`` from a TIFF, ``F``) are scaled by the
    image's own largest value, since the type's range says nothing of the values used (12-bit
    counts, 0..1 floats) and PIL's ``convert`` clips at 0 and 255 (a black or white image):
    integers keep the top 8 of the bits that value uses (a full-range int32 image bits 23-30,
    as torchvision scales int32), floats map 0..max(1, largest) onto 0..255. Negative values,
    NaN and infinities are black."""
    if image.mode.startswith("I;16") or (image.mode == "I" and image.format in ("PNG", "PPM")):
        pixels = np.asarray(image).astype(np.int64) >> 8
    elif image.mode == "I":
        pixels = np.asarray(image).astype(np.int64).clip(min=0)
        pixels >>= max(int(pixels.max()).bit_length() - 8, 0)
    elif image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), posinf=0.0, neginf=0.0)
        values = values.clip(min=0)
        pixels = np.rint(values * (255 / max(float(values.max()), 1.0)))
    else:
        return image
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


SUBSTITUTED = "another image is served in its place"
LEFT_OUT = "it is left out, with no image in its place"
IN_BATCH = "no decoder reads it on the device; the next image of its batch takes its slot"


class SkippedFiles:
    """Which of a dataset's files were skipped, and the one warning for each.

    The flags live in shared memory, so loader workers see each other's finds (a file is
    reported once, and not read again). A worker's own warnings go nowhere the user sees
    reliably, so the process that trains warns: at once without workers, else in
    :meth:`report`, which the data module calls on each batch it receives. A file is either
    replaced (training) or left out (``left_out`` says what then happens, e.g. no
    prediction); the flag a worker sets says which, for the warning."""

    FOUND, REPORTED, FOUND_LEFT_OUT = 1, 2, 3

    def __init__(self, files: Sequence[str], left_out: str = LEFT_OUT) -> None:
        self.files = list(files)
        self.left_out = left_out
        # Normal tensors even when made under predict's inference mode: the warnings of the
        # stage's end (teardown, outside it) update them, which an inference tensor refuses.
        with torch.inference_mode(False):
            self.flags = torch.zeros(len(self.files), dtype=torch.uint8).share_memory_()
            # set by a worker after it flags a file: report() runs on every batch, and a scan
            # of every file's flag is ~10 ms at ImageNet's 1.28M files, on the thread that trains
            self.unreported = torch.zeros(1, dtype=torch.uint8).share_memory_()

    def is_bad(self, index: int) -> bool:
        return bool(self.flags[index])

    def mark(self, index: int, err: CorruptImageError, left_out: bool = False) -> None:
        """Record that file ``index`` failed with ``err``, and was left out or replaced."""
        if self.flags[index]:
            return
        if get_worker_info() is not None:
            self.flags[index] = self.FOUND_LEFT_OUT if left_out else self.FOUND
            self.unreported[0] = 1  # after the flag: report() clears this, then scans
            return
        self.flags[index] = self.REPORTED
        _warn(err.path, err.reason, self.left_out if left_out else SUBSTITUTED)

    def known_bad(self, paths: Sequence[str]) -> None:
        """Flag ``paths`` (found bad and named already, by ``data.verify``): not read again."""
        bad = set(paths)
        for index, path in enumerate(self.files):
            if path in bad:
                self.flags[index] = self.REPORTED

    def read_or_leave_out(self, get: Callable[[int], T], index: int) -> T | None:
        """``get(index)``, or None for a file that cannot be read (named once): an evaluation
        row, a prediction, must be of the file it stands for, never of a substitute."""
        if self.is_bad(index):
            return None
        try:
            return get(index)
        except CorruptImageError as err:
            self.mark(index, err, left_out=True)
            return None

    def report(self, force: bool = False) -> None:
        """Warn, in this process, about the files workers found bad since the last call.
        ``force``: scan even if no worker said so (at the end of a stage: a CPU that orders
        memory weakly may show a worker's ``unreported`` before the flag it set first)."""
        if get_worker_info() is not None or not (force or self.unreported[0]):
            return
        self.unreported[0] = 0  # before the scan: a file flagged during it is seen next time
        found = (self.flags == self.FOUND) | (self.flags == self.FOUND_LEFT_OUT)
        for index in found.nonzero().flatten().tolist():
            left_out = int(self.flags[index]) == self.FOUND_LEFT_OUT
            self.flags[index] = self.REPORTED
            path = self.files[index]
            try:
                load_rgb(path)
                reason = "unreadable when served"
            except CorruptImageError as err:
                reason = err.reason
            _warn(path, reason, self.left_out if left_out else SUBSTITUTED)


def _warn(path: str, reason: str, what: str) -> None:
    warnings.warn(
        f"skipping image file {path!r} ({reason}): {what} (data.skip_corrupt=true)",
        CorruptImageWarning,
        stacklevel=3,
    )


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
                self.mark(i, err)
        n_bad = int((self.flags > 0).sum())
        raise CorruptImageError(
            last.path if last else self.files[index],
            f"{last.reason if last else 'known bad'}; it and the {self.max_tries - 1} images "
            f"drawn in its place were all unreadable ({n_bad} bad files found so far), so "
            f"data.skip_corrupt gave up: too much of the data is damaged",
        )


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


def found_bad(bad: Sequence[tuple[str, str]], total: int, listing: Path | None) -> str:
    """What ``data.verify`` found, in one line: the first :data:`LISTED` files and reasons."""
    shown = "; ".join(f"{path!r} ({reason})" for path, reason in bad[:LISTED])
    more = f"; and {len(bad) - LISTED} more" if len(bad) > LISTED else ""
    where = f" (all listed in {str(listing)!r})" if listing is not None else ""
    return (
        f"data.verify=true found {len(bad)} of {total} image files undecodable{where}: "
        f"{shown}{more}"
    )


class CorruptFilesError(CorruptImageError):
    """``data.verify`` found undecodable files: all of them in one message (the first
    :data:`LISTED`; with more, every one in a text file the message names)."""

    def __init__(self, bad: Sequence[tuple[str, str]], total: int, listing: Path | None) -> None:
        found = found_bad(bad, total, listing)
        fix = "Remove or replace them, or set data.skip_corrupt=true to skip them"
        ValueError.__init__(self, f"{found}. {fix}")
        self.path, self.reason = bad[0]
        self.bad, self.total, self.listing = list(bad), total, listing

    def __reduce__(self):
        return type(self), (self.bad, self.total, self.listing)


def verify_files(files: Sequence[str], workers: int, trainer=None, skip: bool = False) -> list[str]:
    """Decode every file once (``workers`` loader processes) and raise one
    :class:`CorruptFilesError` naming all that fail; when more than :data:`LISTED` do, the full
    list goes to ``corrupt_files.txt`` in the trainer's root folder (or the current one), if it
    can be written. With ``skip`` (``data.skip_corrupt`` is set) the list is a warning instead,
    and the bad files are returned, for the run to skip without reading them again.

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
        return []
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
    if not skip:
        raise CorruptFilesError(bad, len(files), listing)
    found_text = found_bad(bad, len(files), listing)
    rank_zero_warn(f"{found_text}: data.skip_corrupt=true skips them", category=CorruptImageWarning)
    return [path for path, _ in bad]


def _as_list(rows: list) -> list:
    return rows


def dataset_files(dataset: Dataset) -> list[str]:
    """The image files a folder dataset reads (ImageFolder's ``samples`` or ``files``)."""
    samples = getattr(dataset, "samples", None)
    if samples is not None:
        return [path for path, _ in samples]
    return list(dataset.files)  # type: ignore[attr-defined]
