"""ml_worker.sampler: top-k with ties, k-center greedy on a tiny 2-D example, and select() for
every strategy."""

from __future__ import annotations

import numpy as np
import pytest

from ml_worker.sampler import STRATEGIES, cluster_uncertain, k_center_greedy, select, top_k, typicality, typiclust


def test_strategies_listed():
    assert set(STRATEGIES) == {"random", "least_confidence", "margin", "entropy",
                               "diverse_least_confidence", "diverse_margin", "diverse_entropy", "typiclust",
                               "cluster_least_confidence", "cluster_margin", "cluster_entropy"}


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


@pytest.mark.parametrize("strategy", ["diverse_least_confidence", "diverse_margin", "diverse_entropy",
                                      "typiclust", "cluster_entropy"])
def test_select_diverse_needs_embeddings(strategy):
    with pytest.raises(ValueError, match="needs image embeddings"):
        select(strategy, UNC, 2)


@pytest.mark.parametrize("strategy", ["bald", "diverse_bald", "diverse_", "cluster_", "cluster_bald"])
def test_select_unknown_strategy(strategy):
    with pytest.raises(ValueError, match="unknown strategy"):
        select(strategy, UNC, 2, embeddings=np.zeros((6, 2)))


def test_select_empty_pool():
    empty = {m: np.zeros(0) for m in UNC}
    for strategy in STRATEGIES:
        assert select(strategy, empty, 5, embeddings=np.zeros((0, 2))) == []


# --- TypiClust and cluster_<measure> --------------------------------------------------------------
def _blobs(sizes, seed=0, spread=0.05):
    """Gaussian blobs around well-separated unit directions: blob j has sizes[j] points."""
    rng = np.random.default_rng(seed)
    dim = len(sizes) + 1
    pts, blob = [], []
    for j, n in enumerate(sizes):
        centre = np.eye(dim)[j]
        pts.append(centre + spread * rng.normal(size=(n, dim)))
        blob += [j] * n
    return np.vstack(pts), np.array(blob)


def test_typicality_prefers_the_dense_point():
    # four points at 0, 0.1, 0.2 and one far at 5: the far one is the least typical
    x = np.array([[0.0], [0.1], [0.2], [5.0]])
    t = typicality(x, neighbours=2)
    # mean distance to 2 nearest: 0 -> (.1+.2)/2=.15; .1 -> .1; .2 -> .15; 5 -> (4.8+4.9)/2=4.85
    assert t == pytest.approx([1 / 0.15, 1 / 0.1, 1 / 0.15, 1 / 4.85], rel=1e-6)
    assert typicality(np.zeros((1, 3))).tolist() == [0.0]


def test_typiclust_cold_start_covers_the_big_clusters_with_typical_points():
    x, blob = _blobs([40, 30, 20, 3])
    picks = typiclust(x, 3, seed=0)
    # one pick per cluster, the three big clusters first (the 3-point cluster is below MIN_CLUSTER_SIZE)
    assert sorted(blob[picks].tolist()) == [0, 1, 2]
    # each pick is the most typical point of its blob (closest to the blob's dense centre)
    for i in picks:
        members = np.flatnonzero(blob == blob[i])
        t = typicality(x[members] / np.linalg.norm(x[members], axis=1, keepdims=True))
        assert i == members[np.argmax(t)]


def test_typiclust_avoids_clusters_already_labelled():
    x, blob = _blobs([40, 30, 20, 10])
    labelled = x[blob == 0][:5]  # blob 0 is already covered
    picks = typiclust(x, 2, labelled=labelled, seed=0)
    assert 0 not in blob[picks].tolist()
    assert len(set(picks)) == 2


def test_cluster_uncertain_is_uncertain_and_spread():
    x, blob = _blobs([30, 30, 30])
    u = np.full(90, 0.1)
    u[blob == 0] = 0.9  # blob 0 is the uncertain one...
    u[blob == 1] = 0.8  # ...blob 1 nearly as much; blob 2 is certain
    picks = cluster_uncertain(u, x, 2, prefilter=30, seed=0)
    # the 60 most uncertain are blobs 0 and 1: one pick in each, most uncertain first
    assert blob[picks].tolist() == [0, 1]
    # top-k by uncertainty alone would take both from blob 0
    assert blob[top_k(u, 2)].tolist() == [0, 0]


def test_new_strategies_are_reproducible_and_differ_from_random():
    x, _ = _blobs([25, 25, 25, 25], seed=1, spread=0.2)
    rng0 = np.random.default_rng(0)
    u = {m: rng0.random(100) for m in ("least_confidence", "margin", "entropy")}
    for strategy in ("typiclust", "cluster_entropy"):
        a = select(strategy, u, 8, embeddings=x, rng=np.random.default_rng(3))
        b = select(strategy, u, 8, embeddings=x, rng=np.random.default_rng(3))
        r = select("random", u, 8, rng=np.random.default_rng(3))
        assert a == b and len(set(a)) == 8 and set(a) != set(r)


def test_k_center_greedy_labelled_set_large_pool_is_chunked():
    # 3000 x 1000 x 64 would be 1.5 GB as one broadcast; the chunked distance is fine
    rng = np.random.default_rng(0)
    x, lab = rng.normal(size=(3000, 64)), rng.normal(size=(1000, 64))
    picks = k_center_greedy(x, 5, labelled=lab)
    assert len(set(picks)) == 5


def test_select_nan_uncertainty_counts_as_most_uncertain():
    u = {m: np.array([0.1, np.nan, 0.5, 0.7, 0.2]) for m in ("least_confidence", "margin", "entropy")}
    emb = np.random.default_rng(0).normal(size=(5, 4))
    assert select("margin", u, 2) == [1, 3]
    assert 1 in select("cluster_margin", u, 2, embeddings=emb)  # no error from k-means weights


def test_select_checks_shapes_and_measures():
    emb = np.zeros((6, 2))
    with pytest.raises(ValueError, match="embeddings must be"):
        select("cluster_margin", UNC, 2, embeddings=emb[:3])
    with pytest.raises(ValueError, match="embeddings must be"):
        select("typiclust", UNC, 2, embeddings=np.zeros(6))
    with pytest.raises(ValueError, match="needs the 'margin' uncertainty"):
        select("cluster_margin", {"entropy": UNC["entropy"]}, 2, embeddings=emb)


# --- day 0: ties of uncertainty are broken by diversity, not by index (issue 11 item 3) ----------

def test_queue_order_breaks_ties_by_diversity():
    from ml_worker.sampler import queue_order

    # three "people", each a tight cluster, in index order A A A B B C (as Label Studio's ids are)
    emb = np.array([[1, 0, 0], [0.99, 0.05, 0], [0.98, 0, 0.05], [0, 1, 0], [0.05, 0.99, 0], [0, 0, 1]], float)
    order = queue_order(np.ones(6), emb)  # day 0: every task equally uncertain
    assert sorted(order) == list(range(6))

    people = [0, 0, 0, 1, 1, 2]
    assert len({people[i] for i in order[:3]}) == 3  # the first three tasks are three different people
    assert queue_order(np.ones(6)) == list(range(6))  # no embeddings: index order


def test_queue_order_keeps_uncertainty_first_and_continues_from_higher_groups():
    from ml_worker.sampler import queue_order

    emb = np.array([[1, 0], [0.99, 0.1], [0, 1], [0.1, 0.99], [0.7, 0.7]], float)
    u = np.array([0.2, 0.5, 0.5, 0.9, 0.5])
    order = queue_order(u, emb)
    assert order[0] == 3  # the most uncertain alone at the top
    # the tie group {1, 2, 4} starts with the image farthest from task 3 (near (0, 1)): task 1
    assert order[1] == 1 and set(order[1:4]) == {1, 2, 4}
    assert order[4] == 0
    assert queue_order(u + 1e-9, emb) == order  # equal to 6 decimals is a tie
    assert queue_order(np.array([np.nan, 0.1]), None) == [0, 1]  # NaN counts as 1
    assert queue_order(np.array([]), np.zeros((0, 2))) == []
    with pytest.raises(ValueError, match="embeddings must be"):
        queue_order(np.ones(3), np.ones((2, 4)))


def test_queue_order_head_bounds_the_traversal():
    from ml_worker.sampler import queue_order

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(50, 8))
    order = queue_order(np.ones(50), emb, head=5)
    assert sorted(order) == list(range(50))
    rest = [i for i in range(50) if i not in set(order[:5])]
    assert order[5:] == rest  # after the head, index order


def test_day0_batch_spreads_over_clusters_beyond_the_first_ids():
    # 40 near-identical frames of one person first (ids 0-39), then 2 other people: with every
    # uncertainty equal, top-k by index alone would take only the first person
    rng = np.random.default_rng(1)
    a = np.array([1.0, 0, 0]) + 0.01 * rng.normal(size=(40, 3))
    b = np.array([0, 1.0, 0]) + 0.01 * rng.normal(size=(5, 3))
    c = np.array([0, 0, 1.0]) + 0.01 * rng.normal(size=(5, 3))
    emb = np.vstack([a, b, c])
    person = np.array([0] * 40 + [1] * 5 + [2] * 5)
    u = {m: np.ones(50) for m in ("least_confidence", "margin", "entropy")}
    for strategy in ("margin", "diverse_margin", "cluster_margin"):
        picks = select(strategy, u, 3, embeddings=emb, prefilter=1, candidates=1)
        assert len(set(person[picks])) == 3, (strategy, picks)
    assert top_k(np.ones(50), 3) == [0, 1, 2]  # without embeddings: index order as before


def test_tie_offsets_keep_the_order_in_label_studio_scores():
    from ml_worker.scoring import tie_offsets

    order = [5, 2, 9, 1, 7]  # queue order: 5 alone, then the tie group 2, 9, 1, then 7
    unc = {5: 0.9, 2: 0.5, 9: 0.5, 1: 0.5, 7: 0.1}
    off = tie_offsets(order, unc)
    scores = {t: round(1 - unc[t], 6) + off[t] for t in order}
    assert sorted(order, key=lambda t: scores[t]) == order  # Label Studio's ascending sort = the queue
    assert all(0 <= o < 1e-6 for o in off.values())
    assert off[2] == 0 and off[5] == 0 and off[7] == 0


def test_day0_queue_on_the_default_folder_spreads_over_people(tmp_path):
    """``faceloop up``'s default folder (awake_sleep val: 238 images of 3 people, one source
    each, file names ``<source>_<hash>.jpg``, Label Studio ids in name order). Through the
    prediction path scoring uses (shipped default version, classes unknown: every uncertainty 1),
    the first 12 tasks of the queue and the day-0 query batch hold every person; in id order the
    first 12 are one person."""
    from urllib.parse import quote

    from backend.labels import ProjectSchema
    from backend.predict import predict_tasks
    from backend.config import DEFAULT_MODEL_PATH
    from facemodels.detector import ModelCache
    from ml_worker.sampler import DEFAULT_QUERY_STRATEGY, queue_order
    from tests.conftest import REPO, require_data
    from tests.helpers_unit import make_settings

    data = require_data()
    files = sorted((data / "images" / "val").glob("*.jpg"))
    person = np.array([f.name.rsplit("_", 1)[0] for f in files])
    settings = make_settings(tmp_path, local_files_document_root=str(data.parent))
    schema = ProjectSchema.parse((REPO / "label_config" / "awake_sleep.xml").read_text())
    tasks = [{"id": i + 1, "data": {schema.value_key: "/data/local-files/?d=" + quote(str(f.relative_to(data.parent)))}}
             for i, f in enumerate(files)]
    preds = predict_tasks(tasks, schema, ModelCache().get(DEFAULT_MODEL_PATH), settings, embed=True)
    assert all(p.error is None for p in preds), [p.error for p in preds if p.error][:3]
    u = np.array([p.uncertainty.get("margin") for p in preds])
    assert (u == 1.0).all()  # day 0: the classes are unknown, every task ties
    emb = np.stack([p.embedding for p in preds])
    n_people = len(set(person))
    assert len(set(person[:12])) == 1  # id order: the first 12 are one person
    order = queue_order(u, emb)
    head = person[order[:12]]
    print(f"\nday-0 queue, first 12: {dict(zip(*np.unique(head, return_counts=True)))}; "
          f"every person by #{next(i + 1 for i in range(len(order)) if len(set(person[order[:i + 1]])) == n_people)}")
    assert len(set(head)) == n_people
    batch = select(DEFAULT_QUERY_STRATEGY, {m: u for m in ("least_confidence", "margin", "entropy")}, 12,
                   embeddings=emb, rng=np.random.default_rng(0))
    print(f"day-0 query batch of 12 ({DEFAULT_QUERY_STRATEGY}): {dict(zip(*np.unique(person[batch], return_counts=True)))}")
    assert len(set(person[batch])) == n_people
    # the Review queue shows the query batch first, in pick order, and its head still spreads
    from ml_worker.scoring import batch_ahead

    batch20 = select(DEFAULT_QUERY_STRATEGY, {m: u for m in ("least_confidence", "margin", "entropy")}, 20,
                     embeddings=emb, rng=np.random.default_rng(0))
    final = batch_ahead(list(order), list(batch20))
    assert final[:20] == list(batch20) and sorted(final) == sorted(order)
    assert len(set(person[final[:12]])) == n_people


def test_rerank_follows_the_queue_order_on_ties(tmp_path):
    """The ranks stored for ``faceloop queue`` and the status page follow queue_order's tie
    order (the real SQLite database, as score_pool leaves it)."""
    from sqlmodel import select as sql_select

    from backend.db import session_scope
    from backend.models import TaskScore
    from ml_worker.scoring import rerank
    from tests.helpers_unit import make_settings

    s = make_settings(tmp_path)
    with session_scope(s.database_url) as db:
        for t, u in ((1, 1.0), (2, 1.0), (3, 1.0), (4, 0.3)):
            db.add(TaskScore(project_id=1, task_id=t, model_version="v1", uncertainty=u, least_confidence=u,
                             margin=u, entropy=u))
        db.flush()
        rerank(db, 1, "v1", {1, 2, 3, 4}, 2, picks=[3, 1], order=[3, 1, 2, 4])
    with session_scope(s.database_url) as db:
        rows = sorted(db.exec(sql_select(TaskScore).where(TaskScore.project_id == 1)).all(), key=lambda r: r.rank)
        assert [r.task_id for r in rows] == [3, 1, 2, 4]
        # a later partial scoring of a new tie: the earlier ranks stay, the new task follows them
        db.add(TaskScore(project_id=1, task_id=5, model_version="v1", uncertainty=1.0, least_confidence=1.0,
                         margin=1.0, entropy=1.0))
        db.flush()
        rerank(db, 1, "v1", {1, 2, 3, 4, 5}, 2, order=[5])
    with session_scope(s.database_url) as db:
        rows = sorted(db.exec(sql_select(TaskScore).where(TaskScore.project_id == 1)).all(), key=lambda r: r.rank)
        assert [r.task_id for r in rows] == [3, 1, 2, 5, 4]


def test_the_query_batch_heads_the_queue_and_label_studio_scores_keep_that_order():
    """The review queue is the batch (pick order) then the rest by uncertainty, and the scores
    written to Label Studio sort into exactly that order (its Review queue and *Label All Tasks*
    serve the lowest first), whatever the batch's own uncertainty."""
    from ml_worker.scoring import BATCH_SCORE_SPAN, batch_ahead, ls_task_score, tie_offsets

    unc = {1: 0.9, 2: 0.9, 3: 0.9, 4: 0.5, 5: 0.5, 6: 0.1, 7: 1.0}
    order = [7, 1, 2, 3, 4, 5, 6]  # uncertainty order, ties already by diversity
    batch = [6, 3, 9]  # 6 is the most certain task; 9 is not in the pool (ignored)
    queue = batch_ahead(order, batch)
    assert queue == [6, 3, 7, 1, 2, 4, 5]
    assert batch_ahead(order, []) == order
    rest = [t for t in queue if t not in batch]
    off = tie_offsets(rest, unc)
    written = {t: ls_task_score(1 - unc[t], t, batch[:2], off.get(t, 0.0)) for t in order}
    assert sorted(order, key=lambda t: written[t]) == queue
    assert written[6] == 0.0 and 0 < written[3] < BATCH_SCORE_SPAN <= written[7]
    # Label Studio's Data Manager shows 3 decimals: every batch task reads 0.000, the next 0.001 or more
    assert f"{written[3]:.3f}" == "0.000" and f"{written[7]:.3f}" != "0.000"
    # every other task keeps its 1 - uncertainty to within 0.001
    assert all(abs(written[t] - (1 - unc[t])) <= BATCH_SCORE_SPAN for t in rest)


def test_the_query_batch_holds_rounds_each_picked_as_if_the_last_were_labelled():
    """``pick_rounds``: round 1 is exactly the strategy's k-pick (what bench-accept measured), the
    next rounds continue it without repeats and, for typiclust, move to clusters the earlier rounds
    left uncovered."""
    from ml_worker.sampler import select
    from ml_worker.scoring import pick_rounds

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 8)) * 5
    emb = np.vstack([c + rng.normal(size=(20, 8)) for c in centres])  # 6 clusters of 20
    unc = {m: rng.random(len(emb)) for m in ("least_confidence", "margin", "entropy")}
    for strategy in ("typiclust", "margin", "cluster_margin"):
        one = select(strategy, unc, 3, embeddings=emb, rng=np.random.default_rng(1))
        three = pick_rounds(strategy, unc, 3, 3, emb, np.random.default_rng(1))
        assert three[:3] == one and len(three) == 9 == len(set(three)), strategy
    picks = pick_rounds("typiclust", unc, 3, 2, emb, np.random.default_rng(1))
    assert len({p // 20 for p in picks}) == 6  # the second round covers the 3 clusters the first left
    small = {m: v[:4] for m, v in unc.items()}
    assert sorted(pick_rounds("typiclust", small, 3, 3, emb[:4], np.random.default_rng(1))) == [0, 1, 2, 3]  # pool ends
