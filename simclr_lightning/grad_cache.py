"""Gradient caching (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under
Memory Limited Setup"): a per-device batch larger than the encoder's activations allow, every
image still a negative of every other.

The batch is embedded chunk by chunk keeping no activations; the loss and its gradient with
respect to the embeddings are computed on the whole (global) batch; then each chunk is run
again with autograd and back-propagates its part of that gradient. This is what torch's
non-reentrant checkpoint does per chunk inside one ``backward``, so it stays within Lightning's
automatic optimisation: precision plugins, gradient clipping and DDP (one gradient all-reduce
per step, as usual) keep working unchanged. It is SimCLR's way to a larger batch in the same
memory: ``trainer.accumulate_grad_batches`` is refused (``run_checks.check_accumulation``),
since accumulating adds no negatives to any loss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def embed_in_chunks(
    encode: Callable[[Tensor], tuple[Tensor, Tensor]],
    x_a: Tensor,
    x_b: Tensor,
    chunks: int,
    module: nn.Module,
) -> tuple[Tensor, Tensor]:
    """``encode(torch.cat([x_a, x_b]))`` (features, embeddings), computed ``chunks`` image
    pairs at a time and recomputed chunk by chunk in the backward pass.

    Each chunk holds both views of its images, so BatchNorm sees a small SimCLR batch per
    chunk (its statistics are the chunk's, not the whole batch's). The running statistics of
    ``module``'s BatchNorm layers are updated once per chunk, in the first pass: the
    recomputation leaves them as it found them. Rows come back in the order of
    ``torch.cat([x_a, x_b])``.
    """
    firsts, seconds = [], []
    for a, b in zip(x_a.tensor_split(chunks), x_b.tensor_split(chunks), strict=True):
        if len(a) == 0:  # fewer image pairs than chunks (a short last batch)
            continue
        outputs = checkpoint(
            encode,
            torch.cat([a, b]),
            use_reentrant=False,
            context_fn=lambda: (nullcontext(), _batchnorm_buffers_kept(module)),
        )
        firsts.append([out[: len(a)] for out in outputs])
        seconds.append([out[len(a) :] for out in outputs])
    features, embeddings = (torch.cat(parts) for parts in zip(*firsts, *seconds, strict=True))
    return features, embeddings


@contextmanager
def _batchnorm_buffers_kept(module: nn.Module) -> Iterator[None]:
    """Restore BatchNorm running statistics (and their counters) on exit."""
    buffers = [
        buf
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        for buf in (m.running_mean, m.running_var, m.num_batches_tracked)
        if buf is not None
    ]
    saved = [buf.clone() for buf in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in zip(buffers, saved, strict=True):
                buf.copy_(value)
