"""knn_predict against a float64 brute force written with plain loops (tests/reference.py)."""

from __future__ import annotations

import itertools
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from simclr_lightning.evaluation.knn import knn_predict, sharded_knn_predict, top_k_accuracy
from tests.reference import weighted_knn_scores

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(("k", "chunk"), [(1, 1000), (7, 3), (60, 5), (500, 16)])
def test_knn_predict_matches_brute_force(k, chunk):
    gen = torch.Generator().manual_seed(k)
    query, bank = torch.randn(23, 8, generator=gen), torch.randn(60, 8, generator=gen)
    labels = torch.randint(0, 4, (60,), generator=gen)
    got = knn_predict(query, bank, labels, 4, k=k, temperature=0.1, chunk_size=chunk)
    want = weighted_knn_scores(query, bank, labels, 4, k, 0.1)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def tie_heavy_features(n: int, seed: int) -> torch.Tensor:
    """Rows from a small set whose normalised dot products are exact in float32 (0, +-0.5,
    +-1), so many similarities tie exactly however the matmul sums."""
    basis = [list(v) for v in torch.eye(4).tolist()]
    basis += [list(s) for s in itertools.product([1.0, -1.0], repeat=4)]
    gen = torch.Generator().manual_seed(seed)
    return torch.tensor(basis)[torch.randint(0, len(basis), (n,), generator=gen)]


@pytest.mark.parametrize("k", [3, 10, 41])
def test_knn_predict_breaks_ties_towards_lower_bank_index(k):
    query, bank = tie_heavy_features(30, seed=1), tie_heavy_features(40, seed=2)
    labels = torch.randint(0, 5, (40,), generator=torch.Generator().manual_seed(3))
    want = weighted_knn_scores(query, bank, labels, 5, k, 0.5)
    for chunk in (1, 7, 100):
        got = knn_predict(query, bank, labels, 5, k=k, temperature=0.5, chunk_size=chunk)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_tie_case_is_one_a_careless_top_k_gets_wrong():
    """The tie test must be able to fail: picking the tied rows in another order changes the
    votes for this data."""
    query, bank = tie_heavy_features(30, seed=1), tie_heavy_features(40, seed=2)
    labels = torch.randint(0, 5, (40,), generator=torch.Generator().manual_seed(3))
    want = weighted_knn_scores(query, bank, labels, 5, 10, 0.5)
    reversed_bank = weighted_knn_scores(query, bank.flip(0), labels.flip(0), 5, 10, 0.5)
    assert not torch.allclose(want, reversed_bank)


def test_knn_predict_chunked_equals_unchunked():
    gen = torch.Generator().manual_seed(0)
    query, bank = torch.randn(101, 32, generator=gen), torch.randn(300, 32, generator=gen)
    labels = torch.randint(0, 10, (300,), generator=gen)
    whole = knn_predict(query, bank, labels, 10, k=20, chunk_size=10_000)
    for chunk in (1, 13, 64):
        torch.testing.assert_close(
            knn_predict(query, bank, labels, 10, k=20, chunk_size=chunk),
            whole,
            rtol=1e-5,
            atol=1e-6,
        )


def test_knn_predict_bank_smaller_than_k_and_classes():
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    bank = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    scores = knn_predict(query, bank, torch.tensor([0, 6]), num_classes=8, k=200, temperature=1)
    e = math.e  # similarities 1 and 0: weights e and 1, divided by the nearest's e
    want = torch.tensor([[e, 0, 0, 0, 0, 0, 1, 0], [1, 0, 0, 0, 0, 0, e, 0]]) / e
    torch.testing.assert_close(scores, want)


@pytest.mark.parametrize("k", [1, 5, 30])
def test_bank_rows_labelled_minus_one_are_left_out(k):
    """KNNMonitor documents -1 (an unlabelled image) as ignored: knn_predict failed with
    "index -1 is out of bounds". The neighbours are the nearest labelled rows, counted here
    with a plain loop over the whole bank that skips the unlabelled ones."""
    gen = torch.Generator().manual_seed(k)
    query, bank = torch.randn(9, 6, generator=gen), torch.randn(40, 6, generator=gen)
    labels = torch.randint(0, 3, (40,), generator=gen)
    labels[::3] = -1
    unit_q = torch.nn.functional.normalize(query.double(), dim=1)
    unit_b = torch.nn.functional.normalize(bank.double(), dim=1)
    want = torch.zeros(9, 3, dtype=torch.float64)
    for i, q in enumerate(unit_q):
        sims = (unit_b @ q).tolist()
        labelled = [j for j in sorted(range(40), key=lambda j: (-sims[j], j)) if labels[j] >= 0]
        for j in labelled[:k]:
            want[i, labels[j]] += math.exp((sims[j] - sims[labelled[0]]) / 0.2)
    for chunk in (4, 100):
        got = knn_predict(query, bank, labels, 3, k=k, temperature=0.2, chunk_size=chunk)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    positions = torch.arange(40)
    shards = [positions[0::2], positions[1::2]]  # and split over two processes
    unit = torch.nn.functional.normalize(bank, dim=1)
    for got in sharded_scores(query, unit, labels, shards, num_classes=3, k=k, temperature=0.2):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_bank_labels_past_num_classes_are_named():
    """An index error from the vote's scatter named neither the labels nor num_classes."""
    bank, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 1, 0])
    with pytest.raises(ValueError, match=r"^bank_labels go up to 3: num_classes=3 is too few"):
        knn_predict(torch.randn(2, 4), bank, labels, num_classes=3)


@pytest.mark.parametrize("temperature", [0.01, 0.002])
def test_small_temperatures_vote_without_overflow(temperature):
    """exp(1 / 0.01) overflows float32: every class with a neighbour would score inf."""
    gen = torch.Generator().manual_seed(5)
    query, bank = torch.randn(20, 8, generator=gen), torch.randn(50, 8, generator=gen)
    labels = torch.randint(0, 4, (50,), generator=gen)
    got = knn_predict(query, bank, labels, 4, k=10, temperature=temperature)
    want = weighted_knn_scores(query, bank, labels, 4, 10, temperature)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def brute_force_top_k(query, bank, labels, query_labels, k, temperature, top):
    """Wu et al. 2018 in float64, one query at a time: the k most cosine-similar bank rows vote
    exp(sim / T) for their class; a query is a hit when its class got a vote and fewer than
    ``top`` classes outscore it."""
    query = torch.nn.functional.normalize(query.double(), dim=1)
    bank = torch.nn.functional.normalize(bank.double(), dim=1)
    hits = 0
    for q, y in zip(query, query_labels.tolist(), strict=True):
        sims = (bank @ q).tolist()
        nearest = sorted(range(len(bank)), key=lambda j: -sims[j])[:k]
        votes: dict[int, float] = {}
        for j in nearest:
            c = int(labels[j])
            votes[c] = votes.get(c, 0.0) + math.exp(sims[j] / temperature)
        if y in votes and sum(v > votes[y] for v in votes.values()) < top:
            hits += 1
    return hits / len(query)


def clustered(num_classes: int, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tight clusters around orthogonal directions, one per class: a query's k <= per_class
    nearest rows all come from its own cluster, so only one class gets votes."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    x = torch.eye(num_classes)[labels] + 0.05 * torch.randn(len(labels), num_classes, generator=gen)
    return x, labels


@pytest.mark.parametrize("num_classes", [6, 10])
def test_top_5_never_counts_a_class_without_votes(num_classes):
    """Every query's neighbours are of one class; queries labelled with another class are
    misses at top-5 too, not hits wherever topk fills places with zero-score classes."""
    bank, bank_labels = clustered(num_classes, 30, seed=0)
    query, cluster = clustered(num_classes, 8, seed=1)
    query_labels = (cluster + torch.arange(len(query)) % 3) % num_classes  # 2 of 3 mislabelled
    scores = knn_predict(query, bank, bank_labels, num_classes, k=20, temperature=0.1)
    assert ((scores > 0).sum(dim=1) == 1).all()  # the case in question: one voted class
    for top in (1, 5):
        want = brute_force_top_k(query, bank, bank_labels, query_labels, 20, 0.1, top)
        assert float(top_k_accuracy(scores, query_labels, top)) == pytest.approx(want)
    assert want < 1  # some queries' own class got no vote


def test_top_k_counts_a_voted_class_among_several():
    """Three voted classes: a label scored third is a top-5 hit, a label with no vote is not."""
    scores = torch.tensor([[0.0, 3.0, 0.0, 1.0, 0.0, 0.0, 2.0]] * 4)
    labels = torch.tensor([3, 6, 0, 5])  # hand count: 3 and 6 voted, 0 and 5 not
    assert float(top_k_accuracy(scores, labels, 5)) == 0.5
    assert float(top_k_accuracy(scores, labels, 1)) == 0.0


def sharded_scores(query, unit_bank, labels, shards: list[torch.Tensor], **kwargs) -> list:
    """sharded_knn_predict run by one thread per shard (bank positions ``shards[r]`` of the
    unit rows ``unit_bank``), with an all-gather between the threads: the collectives of W
    processes, in one."""
    world = len(shards)
    slots, barrier = [None] * world, threading.Barrier(world)

    def all_gather_of(rank):
        def all_gather(tensor):
            slots[rank] = tensor
            barrier.wait()
            stacked = torch.stack(slots)
            barrier.wait()  # nobody overwrites a slot before everyone has read it
            return stacked

        return all_gather

    def score(rank):
        rows = shards[rank]
        return sharded_knn_predict(
            query, unit_bank[rows], labels[rows], rows, all_gather=all_gather_of(rank), **kwargs
        )

    with ThreadPoolExecutor(world) as pool:
        return list(pool.map(score, range(world)))


@pytest.mark.parametrize("k", [3, 10, 41])
@pytest.mark.parametrize("split", ["strided", "contiguous", "one empty"])
def test_sharded_knn_equals_whole_bank_brute_force_with_ties(k, split):
    """Merging per-shard top-k keeps the tie rule (lower bank position first) across shards,
    shards smaller than k and an empty shard included."""
    query, bank = tie_heavy_features(30, seed=1), tie_heavy_features(40, seed=2)
    labels = torch.randint(0, 5, (40,), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(40)
    shards = {
        "strided": [positions[0::3], positions[1::3], positions[2::3]],
        "contiguous": [positions[:7], positions[7:33], positions[33:]],
        "one empty": [positions[:0], positions[:25], positions[25:]],
    }[split]
    want = weighted_knn_scores(query, bank, labels, 5, k, 0.5)
    unit = torch.nn.functional.normalize(bank, dim=1)
    for chunk in (4, 100):
        kwargs = dict(num_classes=5, k=k, temperature=0.5, chunk_size=chunk)
        for got in sharded_scores(query, unit, labels, shards, **kwargs):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_sharded_half_precision_bank_equals_whole_half_bank():
    """A float16 bank: the sharded result is that of one process with the whole float16 bank."""
    gen = torch.Generator().manual_seed(0)
    query, bank = torch.randn(50, 16, generator=gen), torch.randn(90, 16, generator=gen)
    labels = torch.randint(0, 6, (90,), generator=gen)
    unit = torch.nn.functional.normalize(bank, dim=1).half()
    whole = sharded_knn_predict(query, unit, labels, torch.arange(90), 6, k=15, chunk_size=16)
    positions = torch.arange(90)
    shards = [positions[0::2], positions[1::2]]
    for got in sharded_scores(query, unit, labels, shards, num_classes=6, k=15, chunk_size=16):
        torch.testing.assert_close(got, whole, rtol=1e-6, atol=1e-6)
    # and float16 storage is a rounding of the float32 result, not another answer
    exact = knn_predict(query, bank, labels, 6, k=15)
    torch.testing.assert_close(whole, exact, rtol=2e-2, atol=1e-3)
