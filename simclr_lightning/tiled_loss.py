"""NT-Xent computed in row tiles by a custom autograd function, so the [2N, 2NW] similarity
matrix never exists: forward keeps the unit embeddings and one log-sum-exp per row; backward
recomputes each tile of similarities to form its gradient. Memory is O(N D + tile x 2NW)
instead of several copies of (2N x 2NW)."""

from __future__ import annotations

import torch
from torch import Tensor


class TiledNTXent(torch.autograd.Function):
    """Mean NT-Xent of the ``rows`` anchors against ``columns``, and its collapse statistics.

    ``rows`` [R, D] and ``columns`` [C, D] are unit vectors (``columns`` is ``rows`` itself in
    one process, the gathered global batch under DDP); anchor i must not be scored against
    column ``self_idx[i]`` and its positive is column ``pos_idx[i]``. Returns the loss and,
    not differentiable, ``[pos_sum, neg_sum, hits]`` over the anchors: the sum of positive
    cosines, of negative cosines, and how many positives are strictly the nearest column
    (zeros unless ``with_stats``). The gradient of ``columns`` is returned in full: under DDP
    the gather's backward sends the part that belongs to other ranks' embeddings home.
    """

    @staticmethod
    def forward(
        ctx,
        rows: Tensor,
        columns: Tensor,
        self_idx: Tensor,
        pos_idx: Tensor,
        temperature: float,
        tile: int,
        with_stats: bool,
    ) -> tuple[Tensor, Tensor]:
        lse = rows.new_empty(len(rows))
        stats = rows.new_zeros(3)  # pos_sum, neg_sum, hits, in logit units until the end
        pos_total = rows.new_zeros(())
        buffer = rows.new_empty(min(tile, len(rows)), len(columns))
        for start in range(0, len(rows), tile):
            stop = min(start + tile, len(rows))
            logits = _logits(rows[start:stop] / temperature, columns, buffer)
            self_col, pos_col = self_idx[start:stop, None], pos_idx[start:stop, None]
            pos = logits.gather(1, pos_col)
            pos_total += pos.sum()
            if with_stats:  # on the tile already in memory: no extra pass over N^2 values
                stats[0] += pos.sum()
                stats[1] += (logits.sum(dim=1, keepdim=True) - logits.gather(1, self_col)).sum()
                stats[1] -= pos.sum()
                logits.scatter_(1, pos_col, float("-inf"))
            logits.scatter_(1, self_col, float("-inf"))
            peak = logits.amax(dim=1, keepdim=True)  # with_stats: the nearest negative
            if with_stats:
                stats[2] += (pos > peak).sum()
                logits.scatter_(1, pos_col, pos)
                peak = torch.maximum(peak, pos)
            lse[start:stop] = logits.sub_(peak).exp_().sum(dim=1).log_() + peak.squeeze(1)
        loss = (lse.sum() - pos_total) / len(rows)
        ctx.save_for_backward(rows, columns, self_idx, pos_idx, lse)
        ctx.temperature, ctx.tile = temperature, tile
        stats[:2] *= temperature
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_stats: Tensor):
        rows, columns, self_idx, pos_idx, lse = ctx.saved_tensors
        t, tile = ctx.temperature, ctx.tile
        grad_rows = torch.empty_like(rows)
        grad_columns = torch.zeros_like(columns)
        buffer = rows.new_empty(min(tile, len(rows)), len(columns))
        with torch.autocast(device_type=rows.device.type, enabled=False):
            for start in range(0, len(rows), tile):
                stop = min(start + tile, len(rows))
                # d loss / d logit_ij = (softmax_ij - [j is the positive]) / R
                p = _logits(rows[start:stop] / t, columns, buffer)
                p.sub_(lse[start:stop, None]).exp_()
                p.scatter_(1, self_idx[start:stop, None], 0.0)
                p.scatter_add_(1, pos_idx[start:stop, None], p.new_full((stop - start, 1), -1.0))
                torch.mm(p, columns, out=grad_rows[start:stop])
                grad_columns.addmm_(p.T, rows[start:stop])
        # the chain rule through logit_ij = rows_i . columns_j / t, on the small results
        scale = grad_loss / (t * len(rows))
        return grad_rows.mul_(scale), grad_columns.mul_(scale), None, None, None, None, None


def _logits(scaled_rows: Tensor, columns: Tensor, buffer: Tensor) -> Tensor:
    """``scaled_rows @ columns.T`` written into ``buffer``, reused across tiles: no allocation
    per tile, and on CPU no fresh pages to fault in."""
    return torch.mm(scaled_rows, columns.T, out=buffer[: len(scaled_rows)])
