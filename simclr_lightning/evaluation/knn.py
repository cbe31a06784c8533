"""Weighted kNN classification of features (InstDisc, as solo-learn and lightly use it): judges
an encoder with no classifier to train."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def knn_predict(
    query: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> Tensor:
    """Class scores ``[Q, num_classes]`` of weighted kNN: the ``k`` most cosine-similar bank rows
    vote for their label with weight ``exp(sim / temperature)``, each row of scores divided by
    its nearest neighbour's weight (which then weighs 1), so no temperature overflows.

    ``query`` and ``bank`` need not be normalised. At most ``chunk_size`` query rows are scored
    at a time, so memory stays at ``chunk_size x len(bank)`` similarities. ``k`` larger than the
    bank uses the whole bank. Ties at the k-th similarity are broken towards the lower bank
    index, so the result does not depend on how ``topk`` orders equal values. Bank rows
    labelled below 0 (unlabelled images, -1) are left out: the neighbours are the nearest
    labelled rows.
    """
    if len(bank) != len(bank_labels):
        raise ValueError(f"bank has {len(bank)} rows but bank_labels {len(bank_labels)}")
    top = int(bank_labels.max()) if len(bank_labels) else -1
    if top >= num_classes:  # else an index error from the vote's scatter, naming nothing
        raise ValueError(f"bank_labels go up to {top}: num_classes={num_classes} is too few")
    index = torch.arange(len(bank), device=bank.device)
    unit = F.normalize(bank.float(), dim=1)
    return sharded_knn_predict(
        query, unit, bank_labels, index, num_classes, k, temperature, chunk_size
    )


def sharded_knn_predict(
    query: Tensor,
    shard: Tensor,
    shard_labels: Tensor,
    shard_index: Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
    all_gather: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """:func:`knn_predict` against a bank split over processes, each holding one shard.

    ``shard`` holds this process's bank rows, already unit-normalised, in any float dtype
    (half precision halves the memory); ``shard_index`` their positions in the whole bank,
    increasing; ``all_gather`` stacks a tensor from every process along a new dim 0 (e.g.
    Lightning's ``strategy.all_gather``), None in one process. Every process passes the same
    ``query`` and gets the same scores: it scores the query against its shard, and the
    per-process top-k (values, bank positions, labels) are merged with one all-gather of k
    entries per query, keeping the tie rule with bank positions. Memory per process is
    O(shard + chunk_size x shard); the result is that of one process holding the whole bank.
    Rows labelled below 0 are left out (a copy of the shard only where it has some).
    """
    if k < 1 or temperature <= 0 or chunk_size < 1:
        raise ValueError(
            f"knn_predict needs k >= 1, temperature > 0, chunk_size >= 1, got "
            f"k={k}, temperature={temperature}, chunk_size={chunk_size}"
        )
    gather = all_gather or (lambda t: t[None])
    query = F.normalize(query.float(), dim=1).to(shard.dtype)
    shard_labels = shard_labels.to(query.device, torch.long)
    unlabelled = shard_labels < 0
    if unlabelled.any():  # -1 is no class: the vote would scatter to an index out of range
        keep = ~unlabelled
        shard, shard_labels, shard_index = shard[keep], shard_labels[keep], shard_index[keep]
    scores = query.new_zeros(len(query), num_classes, dtype=torch.float32)
    bank_size = int(gather(torch.tensor([len(shard)], device=query.device)).sum())
    if bank_size == 0:
        return scores
    k = min(k, bank_size)
    for start in range(0, len(query), chunk_size):
        sim = (query[start : start + chunk_size] @ shard.T).float()
        values, local = _topk_lowest_index_first(sim, min(k, len(shard)))
        # one tensor of k (value, bank position, label) per query: float64 holds float32
        # values and integer positions below 2^53 exactly
        mine = torch.full((len(sim), k, 3), float("inf"), dtype=torch.float64, device=sim.device)
        mine[..., 0] = float("-inf")  # padding of a shard with fewer than k rows: no vote
        mine[:, : local.shape[1], 0] = values
        mine[:, : local.shape[1], 1] = shard_index[local].double()
        mine[:, : local.shape[1], 2] = shard_labels[local].double()
        candidates = gather(mine).transpose(0, 1).flatten(1, 2)  # [q, W*k, 3]
        # nearest first, ties towards the lower bank position: sort by position, then
        # stably by value
        candidates = candidates.gather(1, _argsort(candidates[..., 1]).expand(-1, -1, 3))
        order = _argsort(candidates[..., 0], descending=True)[:, :k]
        top = candidates.gather(1, order.expand(-1, -1, 3))
        # exp((sim - nearest) / T): the ranking of exp(sim / T), which float32 overflows
        # from T < 1/88 (every class with a neighbour would score inf)
        weights = ((top[..., 0] - top[:, :1, 0]) / temperature).exp().float()
        scores[start : start + chunk_size].scatter_add_(1, top[..., 2].long(), weights)
    return scores


def _argsort(keys: Tensor, descending: bool = False) -> Tensor:
    """Stable argsort of ``keys`` [q, m] along dim 1, shaped [q, m, 1] for gathering triples."""
    return keys.argsort(dim=1, descending=descending, stable=True).unsqueeze(-1)


def _topk_lowest_index_first(sim: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``topk`` along dim 1 with a defined choice among values tied with the k-th largest."""
    values, indices = sim.topk(k, dim=1)
    ambiguous = (sim >= values[:, -1:]).sum(dim=1) > k
    if ambiguous.any():  # rare outside duplicated images: redo those rows with a stable sort
        rows = ambiguous.nonzero().squeeze(1)
        sorted_values, order = sim[rows].sort(dim=1, descending=True, stable=True)
        values[rows], indices[rows] = sorted_values[:, :k], order[:, :k]
    return values, indices


def top_k_accuracy(scores: Tensor, labels: Tensor, k: int) -> Tensor:
    """Fraction of rows whose label is among the ``k`` highest scores. A class scoring 0 got no
    neighbour's vote and is never a hit: with fewer than ``k`` voted classes, ``topk`` would
    fill the other places with arbitrary unvoted classes."""
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1)
    hits = ((top.indices == labels[:, None]) & (top.values > 0)).any(dim=1)
    return hits.float().mean()
