"""Weighted kNN classification of features (InstDisc, as solo-learn and lightly use it): judges
an encoder with no classifier to train."""

from __future__ import annotations

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
    vote for their label with weight ``exp(sim / temperature)``.

    ``query`` and ``bank`` need not be normalised. At most ``chunk_size`` query rows are scored
    at a time, so memory stays at ``chunk_size x len(bank)`` similarities. ``k`` larger than the
    bank uses the whole bank. Ties at the k-th similarity are broken towards the lower bank
    index, so the result does not depend on how ``topk`` orders equal values.
    """
    if k < 1 or temperature <= 0 or chunk_size < 1:
        raise ValueError(
            f"knn_predict needs k >= 1, temperature > 0, chunk_size >= 1, got "
            f"k={k}, temperature={temperature}, chunk_size={chunk_size}"
        )
    if len(bank) != len(bank_labels):
        raise ValueError(f"bank has {len(bank)} rows but bank_labels {len(bank_labels)}")
    query = F.normalize(query.float(), dim=1)
    bank = F.normalize(bank.float(), dim=1)
    bank_labels = bank_labels.to(query.device, torch.long)
    scores = query.new_zeros(len(query), num_classes)
    if len(bank) == 0:
        return scores
    k = min(k, len(bank))
    for start in range(0, len(query), chunk_size):
        sim = query[start : start + chunk_size] @ bank.T
        top_sim, top_idx = _topk_lowest_index_first(sim, k)
        weights = (top_sim / temperature).exp()
        scores[start : start + chunk_size].scatter_add_(1, bank_labels[top_idx], weights)
    return scores


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
    """Fraction of rows whose label is among the ``k`` highest scores."""
    k = min(k, scores.shape[1])
    hits = (scores.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    return hits.float().mean()
