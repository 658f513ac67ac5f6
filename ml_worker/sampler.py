"""Query strategies: which unlabelled images people should label next.

A strategy is an uncertainty measure (:mod:`backend.uncertainty`) composed with a selection,
as in modAL/baal: ``random`` (the baseline every strategy is measured against),
``least_confidence``, ``margin``, ``entropy`` (top-k by the measure), and ``diverse_<measure>``:
k-center greedy (Sener & Savarese, *Active Learning for Convolutional Neural Networks: A Core-Set
Approach*, ICLR 2018) on image embeddings over the ``candidates x k`` most uncertain images, so
that a query batch is not made of near-duplicate video frames.
"""

from __future__ import annotations

import numpy as np

from backend.uncertainty import MEASURES

STRATEGIES = ("random",) + MEASURES + tuple(f"diverse_{m}" for m in MEASURES)


def top_k(scores: np.ndarray, k: int) -> list[int]:
    """Indices of the ``k`` largest scores, largest first (ties: lower index first)."""
    s = np.asarray(scores, dtype=np.float64)
    order = np.lexsort((np.arange(len(s)), -s))
    return [int(i) for i in order[:k]]


def k_center_greedy(embeddings: np.ndarray, k: int, first: int = 0, labelled: np.ndarray | None = None) -> list[int]:
    """Pick ``k`` rows that cover the embedding space (each next pick is the point farthest from
    all picks and from ``labelled``).

    Args:
        embeddings: ``(n, d)`` float array (Euclidean distance).
        k: how many to pick (at most n).
        first: index picked first when there is no ``labelled`` set (the most uncertain one).
        labelled: optional ``(m, d)`` embeddings already labelled.
    Returns: ``k`` distinct indices in pick order.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    n = len(x)
    k = min(k, n)
    if k <= 0:
        return []
    if labelled is not None and len(labelled):
        d = np.min(((x[:, None, :] - np.asarray(labelled)[None]) ** 2).sum(-1), axis=1)
        picks = []
    else:
        picks = [first]
        d = ((x - x[first]) ** 2).sum(-1)
    while len(picks) < k:
        d_masked = d.copy()
        d_masked[picks] = -1.0
        j = int(np.argmax(d_masked))
        picks.append(j)
        d = np.minimum(d, ((x - x[j]) ** 2).sum(-1))
    return picks


def select(strategy: str, uncertainty: dict[str, np.ndarray], k: int, embeddings: np.ndarray | None = None,
           rng: np.random.Generator | None = None, candidates: int = 3,
           labelled_embeddings: np.ndarray | None = None) -> list[int]:
    """Choose a query batch of ``k`` pool indices.

    Args:
        strategy: one of :data:`STRATEGIES`.
        uncertainty: ``{measure: (n,) scores 0-1}`` for the pool.
        k: batch size.
        embeddings: ``(n, d)``, needed by ``diverse_*`` strategies.
        rng: random generator (``random`` strategy).
        candidates: ``diverse_*`` considers the ``candidates * k`` most uncertain images.
        labelled_embeddings: embeddings of images already labelled (``diverse_*``).
    Returns: indices into the pool, most informative first.
    Raises: ValueError for an unknown strategy or missing embeddings.
    """
    n = len(next(iter(uncertainty.values()))) if uncertainty else (len(embeddings) if embeddings is not None else 0)
    k = min(k, n)
    if strategy == "random":
        rng = rng or np.random.default_rng(0)
        return [int(i) for i in rng.choice(n, size=k, replace=False)]
    if strategy in MEASURES:
        return top_k(uncertainty[strategy], k)
    if strategy.startswith("diverse_") and strategy[8:] in MEASURES:
        if embeddings is None:
            raise ValueError(f"strategy {strategy} needs image embeddings")
        pool = top_k(uncertainty[strategy[8:]], min(n, max(k, candidates * k)))
        picks = k_center_greedy(np.asarray(embeddings)[pool], k, first=0, labelled=labelled_embeddings)
        return [pool[i] for i in picks]
    raise ValueError(f"unknown strategy {strategy!r}; use one of {STRATEGIES}")
