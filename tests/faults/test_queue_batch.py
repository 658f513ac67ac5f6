"""Issue 9 §6: queue ranks are the query batch, then monotone in uncertainty, and exactly QUERY_BATCH_SIZE tasks are
flagged (60 tasks were flagged for a batch of 20: old rows of the same version kept the flag).
On the real SQLite database through :func:`ml_worker.scoring.rerank`, the step score_pool ends with."""

from __future__ import annotations

import random

from sqlmodel import select

from backend.db import session_scope
from backend.models import TaskScore
from ml_worker.scoring import rerank
from tests.helpers_unit import make_settings


def _rows(url, pid, version="v1"):
    with session_scope(url) as s:
        return sorted(s.exec(select(TaskScore).where(TaskScore.project_id == pid, TaskScore.model_version == version))
                      .all(), key=lambda r: r.rank)


def _check(rows, batch_size):
    good = [r for r in rows if not r.error]
    assert [r.rank for r in rows] == list(range(len(rows)))
    # the query batch first (what Label Studio serves first), then the rest: most uncertain first, ties
    # by task id; rows whose image failed come last
    n_batch = sum(r.in_query_batch for r in good)
    assert all(r.in_query_batch for r in good[:n_batch])
    rest = good[n_batch:]
    assert [(-r.uncertainty, r.task_id) for r in rest] == sorted((-r.uncertainty, r.task_id) for r in rest)
    assert all(not r.error for r in rows[: len(good)])
    assert sum(r.in_query_batch for r in rows) == min(batch_size, len(good))
    assert not any(r.in_query_batch for r in rows if r.error)


def test_ranks_monotone_and_batch_exact_across_scorings(tmp_path):
    s = make_settings(tmp_path)
    rng = random.Random(0)
    with session_scope(s.database_url) as db:
        for t in range(1, 101):
            u = round(rng.random(), 1)  # many ties
            db.add(TaskScore(project_id=1, task_id=t, model_version="v1", uncertainty=u, least_confidence=u,
                             margin=u, entropy=u, rank=rng.randrange(100), in_query_batch=t <= 60,  # stale flags
                             error="image failed" if t % 17 == 0 else ""))
        db.add(TaskScore(project_id=1, task_id=5, model_version="v0", uncertainty=0.1, least_confidence=0.1,
                         margin=0.1, entropy=0.1, in_query_batch=True))  # another version: untouched
    pool = set(range(1, 96))  # tasks 96-100 were labelled since
    with session_scope(s.database_url) as db:
        batch = rerank(db, 1, "v1", pool, 20, picks=[3, 7, 3, 99, 11])  # sampler's picks (99 is labelled now)
    rows = _rows(s.database_url, 1)
    assert {r.task_id for r in rows} == pool  # labelled tasks' rows are gone
    _check(rows, 20)
    assert batch[:3] == [3, 7, 11] and len(batch) == 20 == len(set(batch))
    assert [r.task_id for r in rows[:20]] == batch  # ranked in pick order, then topped up by uncertainty
    # a partial scoring (new tasks) keeps the batch, minus what got labelled, topped up by rank
    pool -= {3, 7}
    with session_scope(s.database_url) as db:
        db.add(TaskScore(project_id=1, task_id=200, model_version="v1", uncertainty=1.0, least_confidence=1.0,
                         margin=1.0, entropy=1.0))
        db.flush()
        batch2 = rerank(db, 1, "v1", pool | {200}, 20, picks=None)
    rows = _rows(s.database_url, 1)
    _check(rows, 20)
    assert set(batch) - {3, 7} <= set(batch2) and len(batch2) == 20
    assert [r.task_id for r in rows[:18]] == [t for t in batch if t not in (3, 7)]  # the kept batch, in its order
    r200 = next(r for r in rows if r.task_id == 200)  # the new task: uncertainty 1.0, the highest id of those
    tops = [r for r in rows[18:] if not r.error and r.uncertainty == 1.0]  # top-ups, then the rest's head
    assert r200 in tops and r200.rank == 18 + tops.index(r200) and tops[-1] is r200
    assert _rows(s.database_url, 1, "v0")[0].in_query_batch  # other versions untouched


def test_batch_is_the_pool_when_smaller(tmp_path):
    s = make_settings(tmp_path)
    with session_scope(s.database_url) as db:
        for t, u in ((4, 0.2), (2, 0.9), (9, 0.9)):
            db.add(TaskScore(project_id=2, task_id=t, model_version="v1", uncertainty=u, least_confidence=u,
                             margin=u, entropy=u, in_query_batch=True))
        db.flush()
        assert rerank(db, 2, "v1", {2, 4, 9}, 20, picks=[4]) == [4, 2, 9]
    rows = _rows(s.database_url, 2)
    assert [(r.task_id, r.rank, r.in_query_batch) for r in rows] == [(4, 0, True), (2, 1, True), (9, 2, True)]


def test_outbox_prunes_only_old_delivered_rows(tmp_path):
    from datetime import timedelta

    from backend.models import OutboxWrite, utcnow
    from ml_worker.outbox import prune

    s = make_settings(tmp_path)
    old, new = utcnow() - timedelta(days=8), utcnow() - timedelta(days=1)
    with session_scope(s.database_url) as db:
        for state, done_at in (("done", old), ("superseded", old), ("done", new), ("failed", old), ("pending", None)):
            db.add(OutboxWrite(project_id=1, kind="predictions", state=state, done_at=done_at))
    assert prune(s) == 2
    with session_scope(s.database_url) as db:
        assert sorted(w.state for w in db.exec(select(OutboxWrite))) == ["done", "failed", "pending"]
