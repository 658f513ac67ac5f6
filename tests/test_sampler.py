"""ml_worker.sampler: top-k with ties, k-center greedy on a tiny 2-D example, and select() for
every strategy."""

from __future__ import annotations

import numpy as np
import pytest

from ml_worker.sampler import STRATEGIES, k_center_greedy, select, top_k


def test_strategies_listed():
    assert set(STRATEGIES) == {"random", "least_confidence", "margin", "entropy",
                               "diverse_least_confidence", "diverse_margin", "diverse_entropy"}


def test_top_k_order_and_ties():
    s = [0.5, 0.9, 0.5, 0.9, 0.1]
    assert top_k(s, 3) == [1, 3, 0]  # largest first; ties: lower index first
    assert top_k(s, 5) == [1, 3, 0, 2, 4]
    assert top_k(s, 10) == [1, 3, 0, 2, 4]  # k larger than n
    assert top_k(s, 0) == []
    assert top_k([0.3] * 4, 2) == [0, 1]


# Two tight clusters far apart plus one outlier:
#   A: (0,0) (0.1,0) (0,0.1)   B: (10,0) (10.1,0)   C: (0,10)
EMB = np.array([[0, 0], [0.1, 0], [0, 0.1], [10, 0], [10.1, 0], [0, 10]], dtype=float)


def test_k_center_greedy_covers_the_clusters():
    # from (0,0): farthest is (10.1,0) (d^2 102.01 > 100), then (0,10) (min d^2 100 vs 0 > ...)
    assert k_center_greedy(EMB, 3, first=0) == [0, 4, 5]
    # starting inside cluster B: farthest from (10,0) is (0,10) (d^2 200); then cluster A, whose
    # farthest point from both picks is (0.1,0)? no: (0,0) has min(100, 100)=100, (0.1,0) has
    # min(98.01, 100.01)=98.01, (0,0.1) has min(100.01, 98.01)=98.01 -> (0,0)
    assert k_center_greedy(EMB, 3, first=3) == [3, 5, 0]


def test_k_center_greedy_edges():
    assert k_center_greedy(EMB, 0) == []
    picks = k_center_greedy(EMB, 10)
    assert sorted(picks) == list(range(6))  # k capped at n, all distinct


def test_k_center_greedy_with_labelled_set():
    # cluster A is already labelled: the first pick is the point farthest from it
    labelled = np.array([[0.0, 0.0]])
    assert k_center_greedy(EMB, 2, labelled=labelled) == [4, 5]


def test_k_center_greedy_duplicates_stay_distinct():
    x = np.zeros((4, 3))
    assert sorted(k_center_greedy(x, 4)) == [0, 1, 2, 3]


UNC = {
    "least_confidence": np.array([0.1, 0.9, 0.5, 0.85, 0.2, 0.7]),
    "margin": np.array([0.9, 0.1, 0.2, 0.3, 0.8, 0.4]),
    "entropy": np.array([0.3, 0.3, 0.9, 0.1, 0.2, 0.95]),
}


@pytest.mark.parametrize("measure,expected", [
    ("least_confidence", [1, 3, 5]),
    ("margin", [0, 4, 5]),
    ("entropy", [5, 2, 0]),  # .95, .9, then the .3 tie -> lower index
])
def test_select_by_measure(measure, expected):
    assert select(measure, UNC, 3) == expected


def test_select_random_is_reproducible_and_distinct():
    a = select("random", UNC, 4, rng=np.random.default_rng(123))
    b = select("random", UNC, 4, rng=np.random.default_rng(123))
    assert a == b
    assert len(set(a)) == 4 and all(0 <= i < 6 for i in a)
    assert select("random", UNC, 4) == select("random", UNC, 4)  # default seed
    assert sorted(select("random", UNC, 99, rng=np.random.default_rng(1))) == list(range(6))


def test_select_diverse_avoids_near_duplicates():
    # candidates * k = 4 most uncertain by least-confidence: 1 (.9), 3 (.85), 5 (.7), 2 (.5).
    # 1, 3 and 2 sit at nearly the same place, 5 away from them: plain top-2 gives the
    # near-duplicates [1, 3]; the diverse batch keeps 1 (most uncertain, picked first), then the
    # candidate farthest from it: 5 (d^2 9 against 1e-4 and 2.5e-5).
    emb = np.array([[5, 5], [0, 0], [0.005, 0], [0, 0.01], [7, 7], [3, 0]], dtype=float)
    assert select("least_confidence", UNC, 2) == [1, 3]
    assert select("diverse_least_confidence", UNC, 2, embeddings=emb, candidates=2) == [1, 5]
    # candidates=1 leaves no choice: the batch is the top-k
    assert select("diverse_least_confidence", UNC, 2, embeddings=emb, candidates=1) == [1, 3]


def test_select_diverse_with_labelled_embeddings():
    emb = np.array([[5, 5], [0, 0], [0.005, 0], [0, 0.01], [7, 7], [3, 0]], dtype=float)
    # candidates 1, 3, 5, 2; an image at (0,0) is already labelled, so 5 (d^2 9 from it) is picked
    # first, then the candidate farthest from both (0,0) and 5: 3 (d^2 1e-4; 2 has 2.5e-5, 1 has 0)
    out = select("diverse_least_confidence", UNC, 2, embeddings=emb, candidates=2,
                 labelled_embeddings=np.array([[0.0, 0.0]]))
    assert out == [5, 3]


@pytest.mark.parametrize("strategy", ["diverse_least_confidence", "diverse_margin", "diverse_entropy"])
def test_select_diverse_needs_embeddings(strategy):
    with pytest.raises(ValueError, match="needs image embeddings"):
        select(strategy, UNC, 2)


@pytest.mark.parametrize("strategy", ["bald", "diverse_bald", "diverse_"])
def test_select_unknown_strategy(strategy):
    with pytest.raises(ValueError, match="unknown strategy"):
        select(strategy, UNC, 2, embeddings=np.zeros((6, 2)))


def test_select_empty_pool():
    empty = {m: np.zeros(0) for m in UNC}
    for strategy in STRATEGIES:
        assert select(strategy, empty, 5, embeddings=np.zeros((0, 2))) == []
