"""Query strategies: which unlabelled images people should label next.

A strategy is an uncertainty measure (:mod:`backend.uncertainty`) composed with a selection,
as in modAL/baal: ``random`` (the baseline every strategy is measured against),
``least_confidence``, ``margin``, ``entropy`` (top-k by the measure), and ``diverse_<measure>``:
k-center greedy (Sener & Savarese, *Active Learning for Convolutional Neural Networks: A Core-Set
Approach*, ICLR 2018) on image embeddings over the ``candidates x k`` most uncertain images, so
that a query batch is not made of near-duplicate video frames.

Two strategies built for the low-budget, near-duplicate pools that faceloop projects start with
(a few dozen labels, video frames of a few people):

- ``typiclust``: TypiClust (Hacohen, Dekel & Weinshall, *Active Learning on a Budget: Opposite
  Strategies Suit High and Low Budgets*, ICML 2022): k-means on the embeddings of the labelled and
  unlabelled images into ``len(labelled) + k`` clusters; each pick is the most *typical* image
  (highest inverse mean distance to its nearest neighbours) of the largest cluster that holds the
  fewest labelled images. It needs no uncertainty, so it also works at the cold start.
- ``cluster_<measure>``: diverse mini-batch active learning (Zhdanov, *Diverse mini-batch Active
  Learning*, arXiv:1901.05954, 2019): the ``prefilter x k`` most uncertain images are clustered
  into ``k`` clusters by k-means weighted by their uncertainty, and the image nearest each
  centre is picked: uncertain *and* representative, where k-center greedy picks outliers.

**Ties and day 0.** Before a project has its own model, its classes are unknown and every image
scores the same uncertainty (1). A ranking by uncertainty alone is then id order (on the default
folder, the first 12 tasks were all one person). :func:`queue_order` therefore breaks ties of
uncertainty by diversity: inside each group of equal uncertainty, images follow a farthest-point
(k-center greedy) traversal of the image embeddings that starts from the most typical image (the
one nearest the group's mean) and continues from the images already ranked above the group. The
query batch's uncertainty pre-selection (``top_k`` in ``diverse_*``/``cluster_*``/measure strategies)
uses the same order, so that the first batch of day 0 also spreads over people and scenes.
"""

from __future__ import annotations

import numpy as np

from backend.uncertainty import MEASURES

STRATEGIES = (("random",) + MEASURES + tuple(f"diverse_{m}" for m in MEASURES) + ("typiclust",)
              + tuple(f"cluster_{m}" for m in MEASURES))
#: The product's query strategy when ``QUERY_STRATEGY`` is not set (see docs/active_learning.md).
DEFAULT_QUERY_STRATEGY = "typiclust"
#: Strategies that use the embeddings of the images already labelled (when given).
USES_LABELLED = tuple(s for s in STRATEGIES if s.startswith("diverse_")) + ("typiclust",)
#: TypiClust's neighbourhood size and smallest cluster it draws from (Hacohen et al. 2022, sec. 4).
TYPICALITY_NEIGHBOURS = 20
MIN_CLUSTER_SIZE = 5


def top_k(scores: np.ndarray, k: int, embeddings: np.ndarray | None = None) -> list[int]:
    """Indices of the ``k`` largest scores, largest first; ties (to :data:`TIE_DECIMALS`
    decimals) by diversity over ``embeddings`` when given (:func:`queue_order`), else lower index
    first."""
    if embeddings is not None:
        return queue_order(scores, embeddings, head=max(k, 1))[:k]
    s = np.asarray(scores, dtype=np.float64)
    order = np.lexsort((np.arange(len(s)), -s))
    return [int(i) for i in order[:k]]


#: Uncertainties equal to this many decimals are a tie (scores are stored with 6 decimals).
TIE_DECIMALS = 6
#: Images of a tie group placed by the farthest-point traversal; the rest of the group follows in
#: index order (the head of the queue is what people see; this bounds the cost at
#: ``O(DIVERSE_HEAD * n * d)``).
DIVERSE_HEAD = 256


def queue_order(uncertainty: np.ndarray, embeddings: np.ndarray | None = None,
                head: int = DIVERSE_HEAD) -> list[int]:
    """The review queue's order: most uncertain first, ties broken by diversity, then by index.

    Args:
        uncertainty: ``(n,)`` scores 0-1, higher = more uncertain (NaN counts as 1).
        embeddings: ``(n, d)`` image embeddings (Euclidean distance after L2 normalisation of the
            rows), or None: ties then keep index order.
        head: at most this many images of each tie group are ordered by diversity.
    Returns: a permutation of ``range(n)``. Inside a group of uncertainties equal to
        :data:`TIE_DECIMALS` decimals, the first image is the one nearest the group's mean
        embedding when nothing is ranked above it, else the one farthest from the images ranked
        above; each next one is the farthest from all ranked so far (k-center greedy, Sener &
        Savarese, ICLR 2018; the same traversal as Gonzalez's 2-approximation of k-center).
    Raises: ValueError when ``embeddings`` does not have one row per score.
    """
    u = np.round(np.nan_to_num(np.asarray(uncertainty, dtype=np.float64), nan=1.0, posinf=1.0, neginf=0.0),
                 TIE_DECIMALS)
    n = len(u)
    base = [int(i) for i in np.lexsort((np.arange(n), -u))]
    if embeddings is None or n < 2:
        return base
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or len(x) != n:
        raise ValueError(f"embeddings must be (n, d) with n = {n}, got shape {x.shape}")
    x = _unit_rows(x)
    out: list[int] = []
    i = 0
    while i < n:
        j = i
        while j < n and u[base[j]] == u[base[i]]:
            j += 1
        group = base[i:j]
        if len(group) > 1:
            g = x[group]
            m = min(head, len(group))
            if out:
                picks = k_center_greedy(g, m, labelled=x[out])
            else:
                picks = k_center_greedy(g, m, first=int(np.argmin(((g - g.mean(0)) ** 2).sum(-1))))
            chosen = [group[p] for p in picks]
            taken = set(chosen)
            group = chosen + [t for t in group if t not in taken]
        out.extend(group)
        i = j
    return out


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
        from sklearn.metrics import pairwise_distances_argmin_min

        d = pairwise_distances_argmin_min(x, np.asarray(labelled, dtype=np.float64))[1] ** 2  # chunked: O(n) memory
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


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), so k-means works on cosine geometry."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def _kmeans(x: np.ndarray, n_clusters: int, seed: int, weights: np.ndarray | None = None):
    """scikit-learn k-means (k-means++ init, 3 restarts) -> ``(labels (n,), centres (c, d))``."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=n_clusters, n_init=3, random_state=seed).fit(x, sample_weight=weights)
    return km.labels_, km.cluster_centers_


def typicality(x: np.ndarray, neighbours: int = TYPICALITY_NEIGHBOURS) -> np.ndarray:
    """TypiClust's typicality of each row of ``x`` ``(n, d)``: the inverse of the mean Euclidean
    distance to its ``min(neighbours, n - 1)`` nearest other rows (Hacohen et al. 2022, eq. 4).
    Returns ``(n,)``, higher = in a denser region; a single row gets 0."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    kk = min(neighbours, n - 1)
    if kk < 1:
        return np.zeros(n)
    from sklearn.neighbors import NearestNeighbors

    dist, _ = NearestNeighbors(n_neighbors=kk + 1).fit(x).kneighbors(x)
    return 1.0 / (dist[:, 1:].mean(axis=1) + 1e-12)  # column 0 is the row itself


def typiclust(embeddings: np.ndarray, k: int, labelled: np.ndarray | None = None, seed: int = 0) -> list[int]:
    """TypiClust selection (Hacohen, Dekel & Weinshall, ICML 2022, Algorithm 1).

    Args:
        embeddings: ``(n, d)`` unlabelled images' embeddings (L2-normalised here).
        k: how many to pick (at most n).
        labelled: ``(m, d)`` embeddings of labelled images, or None (cold start).
        seed: k-means seed.
    Returns: ``k`` distinct indices into ``embeddings``: one per cluster, clusters taken by fewest
        labelled members (picks count as labelled), then largest size; clusters with fewer than
        :data:`MIN_CLUSTER_SIZE` members only once the others are used up.
    """
    x = _unit_rows(embeddings)
    n = len(x)
    k = min(k, n)
    if k <= 0:
        return []
    lab = _unit_rows(labelled) if labelled is not None and len(labelled) else np.zeros((0, x.shape[1]))
    both = np.vstack([lab, x])
    n_clusters = min(len(lab) + k, len(both))
    labels, _ = _kmeans(both, n_clusters, seed)
    lab_labels, pool_labels = labels[: len(lab)], labels[len(lab):]
    size = np.bincount(labels, minlength=n_clusters)
    covered = np.bincount(lab_labels, minlength=n_clusters)
    typ = np.zeros(n)
    for c in range(n_clusters):
        members = np.flatnonzero(labels == c)
        t = typicality(both[members])
        pool_members = members[members >= len(lab)] - len(lab)
        typ[pool_members] = t[members >= len(lab)]
    picks: list[int] = []
    taken = np.zeros(n, dtype=bool)
    left = np.bincount(pool_labels, minlength=n_clusters)  # unlabelled, not yet picked, per cluster
    while len(picks) < k:
        open_ = np.flatnonzero(left > 0).tolist()
        big = [c for c in open_ if size[c] >= MIN_CLUSTER_SIZE] or open_
        c = min(big, key=lambda c: (covered[c], -size[c], c))
        cand = np.flatnonzero((pool_labels == c) & ~taken)
        j = int(cand[np.argmax(typ[cand])])
        picks.append(j)
        taken[j] = True
        covered[c] += 1
        left[c] -= 1
    return picks


def cluster_uncertain(uncertainty: np.ndarray, embeddings: np.ndarray, k: int, prefilter: int = 10,
                      seed: int = 0) -> list[int]:
    """Diverse mini-batch selection (Zhdanov 2019, arXiv:1901.05954, Algorithm 1).

    Args:
        uncertainty: ``(n,)`` scores 0-1, higher = more uncertain.
        embeddings: ``(n, d)`` (L2-normalised here).
        k: batch size.
        prefilter: ``beta``: only the ``prefilter * k`` most uncertain images are clustered.
        seed: k-means seed.
    Returns: ``k`` distinct indices, most uncertain first: for each of ``k`` clusters (k-means
        weighted by uncertainty) the candidate nearest its centre.
    """
    u = np.asarray(uncertainty, dtype=np.float64)
    n = len(u)
    k = min(k, n)
    if k <= 0:
        return []
    pool = np.asarray(top_k(u, min(n, max(k, prefilter * k)), embeddings))
    x = _unit_rows(np.asarray(embeddings)[pool])
    labels, centres = _kmeans(x, k, seed, weights=u[pool] + 1e-6)
    picks = []
    for c in range(k):
        members = np.flatnonzero(labels == c)
        if len(members) == 0:
            continue
        d = ((x[members] - centres[c]) ** 2).sum(-1)
        picks.append(int(pool[members[np.lexsort((-u[pool[members]], d))[0]]]))
    if len(picks) < k:  # empty clusters (duplicates): fill with the most uncertain left
        picks += [int(i) for i in pool if int(i) not in set(picks)][: k - len(picks)]
    return sorted(picks, key=lambda i: (-u[i], i))


def strategy_measure(strategy: str) -> str | None:
    """The uncertainty measure a strategy ranks by (``cluster_margin`` -> ``margin``), or None for
    ``random`` and ``typiclust`` (and for a name that is not a strategy)."""
    if strategy in MEASURES:
        return strategy
    kind, _, measure = strategy.partition("_")
    return measure if kind in ("diverse", "cluster") and measure in MEASURES else None


def select(strategy: str, uncertainty: dict[str, np.ndarray], k: int, embeddings: np.ndarray | None = None,
           rng: np.random.Generator | None = None, candidates: int = 3,
           labelled_embeddings: np.ndarray | None = None, prefilter: int = 10) -> list[int]:
    """Choose a query batch of ``k`` pool indices.

    Args:
        strategy: one of :data:`STRATEGIES`.
        uncertainty: ``{measure: (n,) scores 0-1}`` for the pool.
        k: batch size.
        embeddings: ``(n, d)``, needed by ``diverse_*``, ``cluster_*`` and ``typiclust``.
        rng: random generator (``random``; seeds the k-means of ``typiclust`` and ``cluster_*``).
        candidates: ``diverse_*`` considers the ``candidates * k`` most uncertain images.
        labelled_embeddings: ``(m, d)`` embeddings of images already labelled (``diverse_*``,
            ``typiclust``).
        prefilter: ``cluster_*`` clusters the ``prefilter * k`` most uncertain images.
    Returns: indices into the pool, most informative first.
    Raises: ValueError for an unknown strategy, missing embeddings or uncertainty, or embeddings
        whose rows do not match the pool. A NaN uncertainty counts as 1 (unknown = uncertain).
    """
    # an unknown (NaN) uncertainty counts as maximally uncertain, like an image with no candidate
    uncertainty = {m: np.nan_to_num(np.asarray(v, dtype=np.float64), nan=1.0, posinf=1.0, neginf=0.0)
                   for m, v in uncertainty.items()}
    n = len(next(iter(uncertainty.values()))) if uncertainty else (len(embeddings) if embeddings is not None else 0)
    if embeddings is not None:
        emb = np.asarray(embeddings)
        if emb.ndim != 2 or (uncertainty and len(emb) != n):
            raise ValueError(f"embeddings must be (n, d) with n = {n} pool images, got shape {emb.shape}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; use one of {STRATEGIES}")
    measure = strategy_measure(strategy)
    if measure is not None and measure not in uncertainty:
        raise ValueError(f"strategy {strategy} needs the {measure!r} uncertainty of every pool image")
    k = min(k, n)
    if strategy == "random":
        rng = rng or np.random.default_rng(0)
        return [int(i) for i in rng.choice(n, size=k, replace=False)]
    if strategy == measure:  # ties by diversity when embeddings are given
        return top_k(uncertainty[measure], k, embeddings)
    # the rest place the batch in embedding space: typiclust, cluster_*, diverse_*
    if embeddings is None:
        raise ValueError(f"strategy {strategy} needs image embeddings")
    if k == 0:
        return []
    seed = int(rng.integers(2**31 - 1)) if rng is not None else 0
    if strategy == "typiclust":
        return typiclust(embeddings, k, labelled=labelled_embeddings, seed=seed)
    if strategy.startswith("cluster_"):
        return cluster_uncertain(uncertainty[measure], embeddings, k, prefilter=prefilter, seed=seed)
    pool = top_k(uncertainty[measure], min(n, max(k, candidates * k)), embeddings)  # diverse_*
    picks = k_center_greedy(np.asarray(embeddings)[pool], k, first=0, labelled=labelled_embeddings)
    return [pool[i] for i in picks]
