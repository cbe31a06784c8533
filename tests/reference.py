"""Independent float64 references written from the papers, with explicit loops."""

from __future__ import annotations

import math

import torch


def nt_xent_reference(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR eq. (1) as printed: z_{2k-1}, z_{2k} are the two views of image k,
    l(i, j) = -log exp(sim(z_i, z_j)/t) / sum_{k != i} exp(sim(z_i, z_k)/t),
    L = 1/(2N) sum_k [l(2k-1, 2k) + l(2k, 2k-1)]. Differentiable (float64)."""
    n = z_a.shape[0]
    z = []
    for k in range(n):  # interleave: the paper's indexing, not the implementation's
        z += [z_a[k].double(), z_b[k].double()]

    def sim(u, v):
        return (u @ v) / (u.norm() * v.norm())

    def ell(i, j):
        denominator = sum(torch.exp(sim(z[i], z[k]) / temperature) for k in range(2 * n) if k != i)
        return -torch.log(torch.exp(sim(z[i], z[j]) / temperature) / denominator)

    total = sum(ell(2 * k, 2 * k + 1) + ell(2 * k + 1, 2 * k) for k in range(n))
    return total / (2 * n)


def cosine_knn_top1(train_x, train_y, test_x, test_y, k: int = 20) -> float:
    """Majority vote of the k most cosine-similar training features (brute force, float64)."""
    train_x = torch.nn.functional.normalize(train_x.double(), dim=1)
    test_x = torch.nn.functional.normalize(test_x.double(), dim=1)
    correct = 0
    for x, y in zip(test_x, test_y, strict=True):
        nearest = (train_x @ x).topk(k).indices
        votes = torch.bincount(train_y[nearest], minlength=int(train_y.max()) + 1)
        correct += int(votes.argmax() == y)
    return correct / len(test_y)


def lars_reference(w, grads, lr, momentum, weight_decay, eta, adapt):
    """SimCLR's LARS for a sequence of gradients, in float64, one parameter."""
    w = w.double().clone()
    v = torch.zeros_like(w)
    for g in grads:
        g = g.double() + weight_decay * w
        if adapt:
            wn, gn = float(w.norm()), float(g.norm())
            trust = eta * wn / gn if wn > 0 and gn > 0 else 1.0
        else:
            trust = 1.0
        v = momentum * v + lr * trust * g
        w = w - v
    return w


def cosine_schedule_reference(step, warmup, total, final):
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return final + (1 - final) * (1 + math.cos(math.pi * min(t, 1.0))) / 2


def weighted_knn_top1(train_x, train_y, test_x, test_y, k: int = 200, temperature: float = 0.1):
    """InstDisc's weighted kNN (Wu et al. 2018), float64: each of the k most cosine-similar
    training features votes for its class with weight exp(similarity / temperature)."""
    train_x = torch.nn.functional.normalize(train_x.double(), dim=1)
    test_x = torch.nn.functional.normalize(test_x.double(), dim=1)
    num_classes = int(train_y.max()) + 1
    correct = 0
    for x, y in zip(test_x, test_y, strict=True):
        sims = train_x @ x
        top = sims.topk(min(k, len(sims)))
        votes = torch.zeros(num_classes, dtype=torch.float64)
        votes.index_add_(0, train_y[top.indices], torch.exp(top.values / temperature))
        correct += int(votes.argmax() == y)
    return correct / len(test_y)
