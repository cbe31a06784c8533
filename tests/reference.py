"""Independent float64 references written from the papers, with explicit loops.

Cosine similarity is never computed here the way the library does (normalise, then a matrix
product): per pair with ``torch.nn.functional.cosine_similarity``, or from Python floats.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def nt_xent_reference(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR eq. (1) as printed: z_{2k-1}, z_{2k} are the two views of image k,
    l(i, j) = -log exp(sim(z_i, z_j)/t) / sum_{k != i} exp(sim(z_i, z_k)/t),
    L = 1/(2N) sum_k [l(2k-1, 2k) + l(2k, 2k-1)]. Differentiable (float64)."""
    n = z_a.shape[0]
    z = []
    for k in range(n):  # interleave: the paper's indexing, not the implementation's
        z += [z_a[k].double(), z_b[k].double()]

    def sim(u, v):
        return F.cosine_similarity(u, v, dim=0, eps=0.0)

    def ell(i, j):
        denominator = sum(torch.exp(sim(z[i], z[k]) / temperature) for k in range(2 * n) if k != i)
        return -torch.log(torch.exp(sim(z[i], z[j]) / temperature) / denominator)

    total = sum(ell(2 * k, 2 * k + 1) + ell(2 * k + 1, 2 * k) for k in range(n))
    return total / (2 * n)


def nt_xent_official_reference(
    z_a: torch.Tensor, z_b: torch.Tensor, temperature: float
) -> torch.Tensor:
    """google-research/simclr's ``add_contrastive_loss`` (objective.py) as it computes it: for
    view a, a softmax cross entropy of each image's row ``[logits_ab, logits_aa]`` (its own
    column masked out) with the label at its other view, averaged over the N images; the same
    for view b; ``loss = loss_a + loss_b``. Differentiable (float64), from Python loops."""
    n = z_a.shape[0]
    a = [v.double() / v.double().norm() for v in z_a]
    b = [v.double() / v.double().norm() for v in z_b]

    def view_loss(anchors, others):
        total = 0.0
        for i in range(n):
            logits_ab = [torch.dot(anchors[i], others[j]) / temperature for j in range(n)]
            logits_aa = [
                torch.dot(anchors[i], anchors[j]) / temperature for j in range(n) if j != i
            ]
            row = torch.stack(logits_ab + logits_aa)
            total = total - (logits_ab[i] - torch.logsumexp(row, dim=0))
        return total / n

    return view_loss(a, b) + view_loss(b, a)


def nt_xent_health_reference(
    z_a: torch.Tensor, z_b: torch.Tensor, anchors: list[int] | None = None
) -> dict[str, float]:
    """NT-Xent's collapse signals by brute force (float64 Python floats), over ``anchors``
    (indices into cat(z_a, z_b); all by default): mean positive cosine, mean negative cosine
    (every other embedding but the positive), the fraction of anchors whose positive is the
    most similar other embedding, and the mean per-dimension std of those anchors' unit
    embeddings."""
    n = len(z_a)
    z = F.normalize(torch.cat([z_a, z_b]).double(), dim=1)
    anchors = list(range(2 * n)) if anchors is None else anchors
    pos, neg, hits = [], [], 0
    for i in anchors:
        p = (i + n) % (2 * n)
        others = [j for j in range(2 * n) if j != i]
        pos.append(float(z[i] @ z[p]))
        neg += [float(z[i] @ z[j]) for j in others if j != p]
        hits += max(others, key=lambda j: float(z[i] @ z[j])) == p
    mine = z[anchors]
    return {
        "pos_cos": sum(pos) / len(pos),
        "neg_cos": sum(neg) / len(neg),
        "contrastive_acc": hits / len(pos),
        "z_std": float(mine.std(dim=0).mean()),
    }


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to length 1 in float64, so a dot product is their cosine similarity
    (``F.cosine_similarity`` per query re-normalised the whole bank each time: 12 ms a query)."""
    x = x.double()
    return x / x.norm(dim=1, keepdim=True)


def cosine_knn_top1(train_x, train_y, test_x, test_y, k: int = 20) -> float:
    """Majority vote of the k most cosine-similar training features (brute force, float64)."""
    train_x, test_x = _unit_rows(train_x), _unit_rows(test_x)
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
    train_x, test_x = _unit_rows(train_x), _unit_rows(test_x)
    num_classes = int(train_y.max()) + 1
    correct = 0
    for x, y in zip(test_x, test_y, strict=True):
        sims = train_x @ x
        top = sims.topk(min(k, len(sims)))
        votes = torch.zeros(num_classes, dtype=torch.float64)
        votes.index_add_(0, train_y[top.indices], torch.exp(top.values / temperature))
        correct += int(votes.argmax() == y)
    return correct / len(test_y)


def weighted_knn_scores(query, bank, labels, num_classes, k, temperature):
    """InstDisc's weighted vote, one query and one bank row at a time, in float64; among equal
    similarities the lower bank index counts as nearer. Each query's scores are divided by its
    nearest neighbour's weight exp(max sim / temperature)."""
    query, bank, labels = query.double().tolist(), bank.double().tolist(), labels.tolist()

    def unit(v):
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]

    bank = [unit(b) for b in bank]
    out = []
    for q in query:
        q = unit(q)
        sims = [sum(a * b for a, b in zip(q, row, strict=True)) for row in bank]
        nearest = sorted(range(len(bank)), key=lambda j: (-sims[j], j))[:k]
        scores = [0.0] * num_classes
        for j in nearest:
            scores[labels[j]] += math.exp(sims[j] / temperature - sims[nearest[0]] / temperature)
        out.append(scores)
    return torch.tensor(out, dtype=torch.float64)


def supcon_reference(
    z_a: torch.Tensor, z_b: torch.Tensor, labels: list[int], temperature: float
) -> torch.Tensor:
    """Khosla et al. 2020, eq. (2), L^sup_out, averaged over anchors (the paper sums): the
    multiviewed batch is z_{2k-1}, z_{2k} for image k with label y_k;
    L_i = -1/|P(i)| sum_{p in P(i)} log exp(sim(z_i, z_p)/t) / sum_{a != i} exp(sim(z_i, z_a)/t),
    P(i) = {p != i : y_p = y_i}; label -1 is a class of one image. Differentiable (float64)."""
    n = z_a.shape[0]
    z, y = [], []
    for k in range(n):
        z += [z_a[k].double(), z_b[k].double()]
        label = labels[k] if labels[k] >= 0 else ("unlabeled", k)
        y += [label, label]

    def sim(u, v):
        return F.cosine_similarity(u, v, dim=0, eps=0.0)

    total = 0.0
    for i in range(2 * n):
        denominator = sum(torch.exp(sim(z[i], z[a]) / temperature) for a in range(2 * n) if a != i)
        positives = [p for p in range(2 * n) if p != i and y[p] == y[i]]
        total = total - sum(
            torch.log(torch.exp(sim(z[i], z[p]) / temperature) / denominator) for p in positives
        ) / len(positives)
    return total / (2 * n)
