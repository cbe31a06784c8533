"""Images that travel from the DataLoader to the device undecoded (or at their own sizes).

For ImageNet-size data the CPU cost is JPEG decoding plus per-image augmentation. With
``augment: gpu`` and ``decode: gpu`` the workers only read file bytes; the whole batch is
decoded on the device (nvJPEG through ``torchvision.io.decode_jpeg(device=...)``) and the
views are cropped from each full image, exactly as the CPU pipeline would crop them.
Formats torchvision does not decode (BMP, TIFF, PPM/PGM) are read by PIL in the workers.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import default_collate
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.v2.functional import pil_to_tensor, to_dtype

from simclr_lightning.data.corrupt import DeviceSkips, load_rgb
from simclr_lightning.errors import CorruptImageError

_JPEG_MAGIC = b"\xff\xd8"
_JPEG_END = b"\xff\xd9"
# the signatures torchvision's decode_image tells formats by (decode_image.cpp): it reads
# JPEG, PNG, GIF and WebP, and calls any other file unsupported, however valid
_TORCHVISION_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF87a", b"GIF89a")


@dataclass
class EncodedImage:
    """One image as its file's bytes (``decoded`` False) or as uint8 ``[C, H, W]``."""

    path: str
    data: Tensor
    decoded: bool


def read_encoded(path: str, decode: bool) -> EncodedImage:
    """The worker's side: read the bytes, and decode them here only when ``decode``.

    Bytes left for the device are first checked here, where a bad file can still be named
    and skipped (``data.skip_corrupt``): a file that does not end in JPEG's end marker (a
    truncated one does not) is decoded on the CPU to tell damage from harmless trailing
    bytes; an empty or non-JPEG file is decoded here anyway. A format torchvision does not
    read (BMP, TIFF, PPM, ...) is decoded by PIL's :func:`load_rgb`, as the CPU path reads it,
    rather than called corrupt. Any failure raises :class:`CorruptImageError` naming the file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if not raw:
            raise ValueError("empty file")
        # a plain tensor: torchvision's read_file maps the file, and such storage cannot be
        # sent from a DataLoader worker
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        intact = raw[:2] == _JPEG_MAGIC and raw.rstrip(b"\0")[-2:] == _JPEG_END
        if decode or not intact:  # PNG & co. and doubtful JPEGs are decoded here, on the CPU
            if not torchvision_decodes(raw):  # PIL's pixels, or its reason for a bad file
                return EncodedImage(path, pil_to_tensor(load_rgb(path)).contiguous(), True)
            return EncodedImage(path, decode_rgb8(data), True)
    except CorruptImageError:
        raise
    except Exception as err:
        raise CorruptImageError(path, _reason(err)) from err
    return EncodedImage(path, data, False)


def torchvision_decodes(raw: bytes) -> bool:
    """Whether ``raw`` starts with the signature of a format torchvision's decoders read."""
    return raw.startswith(_TORCHVISION_MAGIC) or (raw[:4] == b"RIFF" and raw[8:15] == b"WEBPVP8")


def decode_rgb8(data: Tensor) -> Tensor:
    """A file's bytes decoded on the CPU to uint8 RGB ``[3, H, W]``.

    torchvision decodes a 16-bit PNG to uint16; it is scaled to 8 bits (its high byte, as PIL
    reads it on the CPU path), since a batch packs, and the views read, uint8 pixels only."""
    return to_uint8(decode_image(data, mode=ImageReadMode.RGB))


def to_uint8(image: Tensor) -> Tensor:
    """``image`` as uint8, scaled from its dtype's range (the same tensor when uint8)."""
    return to_dtype(image, torch.uint8, scale=True)


def _reason(err: Exception) -> str:
    """The decoder's words without torchvision's source location (``decode_jpeg.cpp:171``)."""
    text = re.sub(r"^.*?\.cpp:\d+,\s*", "", str(err))
    return text if text == "empty file" else f"{type(err).__name__}: {text}"


class ImageBatch:
    """A batch of :class:`EncodedImage` of any sizes.

    The pixels or bytes of all images are packed into one flat tensor, so a worker hands a
    batch over in one shared-memory block rather than one per image. It has no ``to`` method
    on purpose: Lightning's batch transfer leaves it on the host, and :meth:`decode` moves or
    decodes the images onto the device in one batched call. It has a ``pin_memory`` method,
    which a DataLoader with ``pin_memory=True`` calls, so that copy does not block the host.
    """

    def __init__(self, images: Sequence[EncodedImage]) -> None:
        self.paths = [im.path for im in images]
        self.shapes = [tuple(im.data.shape) for im in images]
        self.decoded = [im.decoded for im in images]
        self.buffer = torch.cat([im.data.reshape(-1) for im in images]) if images else None

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def images(self) -> list[EncodedImage]:
        return self._unpack(self.buffer)

    def _unpack(self, buffer: Tensor) -> list[EncodedImage]:
        out, start = [], 0
        for path, shape, decoded in zip(self.paths, self.shapes, self.decoded, strict=True):
            size = math.prod(shape)
            data = buffer[start : start + size].view(shape)
            out.append(EncodedImage(path, data, decoded))
            start += size
        return out

    def pin_memory(self) -> ImageBatch:
        """This batch with its packed buffer in page-locked memory (what the DataLoader's
        ``pin_memory`` step calls on a batch type of its own), so :meth:`decode` copies
        decoded pixels to a GPU without making the host wait."""
        pinned = copy.copy(self)
        pinned.buffer = self.buffer.pin_memory() if self.buffer is not None else None
        return pinned

    def decode(self, device: torch.device | str, skips: DeviceSkips | None = None) -> list[Tensor]:
        """uint8 RGB ``[3, H, W]`` tensors on ``device``, in batch order.

        A file that neither nvJPEG nor the CPU decoder reads (one that passed the workers'
        JPEG marker check) raises :class:`CorruptImageError`, or, with ``skips``, is added to
        it and its slot gets the next image of the batch that decoded: the batch keeps its
        size, which DDP's gathers need equal on every rank. Files ``skips`` holds already get
        that slot without being decoded again."""
        return self.decode_with_sources(device, skips)[0]

    def decode_with_sources(
        self, device: torch.device | str, skips: DeviceSkips | None = None
    ) -> tuple[list[Tensor], list[int]]:
        """:meth:`decode`'s images, and for each slot the batch position whose image it holds
        (its own, or the substitute's for a skipped file), for the labels to follow the pixels."""
        decoded = self._decode(torch.device(device), skips)
        n = len(decoded)
        good = [not isinstance(image, CorruptImageError) for image in decoded]
        if n and not any(good):
            raise decoded[0]  # type: ignore[misc]
        sources = [
            next(k % n for k in range(i, i + n) if good[k % n]) for i in range(n)
        ]  # each slot's own image, else the next one of the batch that decoded
        return [decoded[j] for j in sources], sources  # type: ignore[misc]

    def _decode(
        self, device: torch.device, skips: DeviceSkips | None
    ) -> list[Tensor | CorruptImageError]:
        images = self.images
        out: list[Tensor | CorruptImageError | None] = [None] * len(images)
        for i, im in enumerate(images):
            if skips is not None and not im.decoded and im.path in skips:
                out[i] = CorruptImageError(im.path, skips.reasons[im.path])
        encoded = [i for i, im in enumerate(images) if not im.decoded and out[i] is None]
        if any(im.decoded for im in images):  # decoded pixels: one copy of the packed buffer
            pinned = device.type == "cuda" and self.buffer.is_pinned()
            for i, im in enumerate(self._unpack(self.buffer.to(device, non_blocking=pinned))):
                if im.decoded:
                    out[i] = im.data
        if encoded:
            try:
                decoded = decode_jpegs([images[i].data for i in encoded], device)
            except Exception:  # find the culprit; nvJPEG lacks some formats (e.g. CMYK)
                decoded = [self._decode_one(images[i], device, skips) for i in encoded]
            for i, image in zip(encoded, decoded, strict=True):
                out[i] = image
        return out  # type: ignore[return-value]

    @staticmethod
    def _decode_one(
        image: EncodedImage, device: torch.device, skips: DeviceSkips | None
    ) -> Tensor | CorruptImageError:
        try:
            return decode_jpegs([image.data], device)[0]
        except Exception:
            pass
        try:  # the CPU decoder reads what nvJPEG does not
            return decode_rgb8(image.data).to(device)
        except Exception as err:
            error = CorruptImageError(image.path, _reason(err))
            if skips is None:
                raise error from err
            skips.add(error)
            return error

    def __repr__(self) -> str:
        return f"ImageBatch({len(self.images)} images)"


_DECODE_STREAMS: dict[int, torch.cuda.Stream] = {}


def decode_jpegs(data: list[Tensor], device: torch.device) -> list[Tensor]:
    """JPEG bytes decoded to uint8 RGB on ``device``; on CUDA (nvJPEG) from a stream of its own.

    torchvision's CUDA decoder allocates its outputs on the current stream but writes them from
    a private stream that does not wait for the current one (pytorch/vision#9606). A block the
    caching allocator has just recycled may still be read by kernels queued on the current
    stream (the previous training step's, when the host runs ahead), and nvJPEG would overwrite
    it under them. Allocated while a side stream is current, the outputs come only from blocks
    of that stream: earlier outputs, marked as used by the consumer (``record_stream``), which
    the allocator does not reuse before the consumer's work on them is done."""
    if device.type != "cuda":
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    consumer = torch.cuda.current_stream(index)
    if index not in _DECODE_STREAMS:
        _DECODE_STREAMS[index] = torch.cuda.Stream(index)
    side = _DECODE_STREAMS[index]
    with torch.cuda.stream(side):
        decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    consumer.wait_stream(side)  # torchvision makes the current (side) stream wait for nvJPEG
    for image in decoded:
        image.record_stream(consumer)
    return decoded


def collate_encoded(samples: Sequence[tuple[EncodedImage, int]]) -> tuple[ImageBatch, Tensor]:
    """DataLoader ``collate_fn`` for ``(EncodedImage, label)`` samples."""
    images, labels = zip(*samples, strict=True)
    return ImageBatch(images), default_collate(list(labels))
