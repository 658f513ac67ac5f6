"""Chunked pool scoring (issue 12: two workers share one project's pool), its plain steps.

:func:`ml_worker.scoring.score_chunk` and :func:`ml_worker.scoring.finish_scoring` on the real
shipped default model, real JPEG files read through ``/data/local-files/`` (awake/sleep images
when ``../shared/data`` is here, else generated ones), the real SQLite database; Label Studio is
an unreachable loopback port, so the write-back stays in the outbox (what is checked is what is
queued). The Celery chord itself runs in ``tests/test_score_workers.py``.
"""

from __future__ import annotations

import itertools
import json

import pytest
from sqlmodel import select

from backend import registry
from backend.db import session_scope
from backend.models import OutboxWrite, ScoringRun, TaskScore
from ml_worker.scoring import chunks_of, finish_scoring, score_chunk, score_plan
from tests.conftest import AWAKE_SLEEP
from tests.helpers_unit import config_text, make_settings, write_jpeg

N_TASKS, CHUNK, BATCH = 40, 16, 5
PID = 7
DEAD_LS = "http://127.0.0.1:9"  # nothing listens: deliveries fail fast and stay pending


def _images(tmp_path) -> tuple:
    """(document root, relative paths of N_TASKS images)."""
    data = AWAKE_SLEEP / "images" / "train"
    if data.is_dir():
        files = sorted(data.glob("*.jpg"))[:: 7][:N_TASKS]
        if len(files) == N_TASKS:
            return data, [f.name for f in files]
    root = tmp_path / "img"
    names = []
    for i in range(N_TASKS):
        write_jpeg(root / f"{i}.jpg", width=96 + 8 * (i % 3), height=72, color=(37 * i % 255, 90, 200 - 4 * i),
                   marker=(10 + i, 10, 40, 40))
        names.append(f"{i}.jpg")
    return root, names


@pytest.fixture
def setup(tmp_path):
    root, names = _images(tmp_path)
    s = make_settings(tmp_path, label_studio_url=DEAD_LS, local_files_document_root=str(root),
                      query_batch_size=BATCH, score_chunk_size=CHUNK)
    with session_scope(s.database_url) as db:
        registry.upsert_project(db, PID, label_config=config_text("awake_sleep"), ls_url=DEAD_LS)
        version = registry.promoted_version(db, PID, s).version
    todo = [{"id": 100 + i, "data": {"image": f"/data/local-files/?d={n}"}} for i, n in enumerate(names)]
    todo.append({"id": 100 + N_TASKS, "data": {"image": "/data/local-files/?d=missing.jpg"}})  # a bad image
    plan = {"project_id": PID, "version": version, "ls_url": DEAD_LS, "label_config": config_text("awake_sleep"),
            "measure": s.uncertainty_measure, "todo": todo, "n_unlabelled": len(todo),
            "pool": [t["id"] for t in todo] + [999],  # 999: unlabelled, never scored
            "existing": [], "has_version": False, "partial": False}
    return s, plan


def _rows(s):
    with session_scope(s.database_url) as db:
        rows = db.exec(select(TaskScore).where(TaskScore.project_id == PID)).all()
        return {r.task_id: (r.uncertainty, r.least_confidence, r.margin, r.entropy, r.n_boxes, r.rank,
                            r.in_query_batch, r.error) for r in rows}


def _predictions(s) -> dict:
    with session_scope(s.database_url) as db:
        rows = db.exec(select(OutboxWrite).where(OutboxWrite.project_id == PID, OutboxWrite.kind == "predictions",
                                                 OutboxWrite.state == "pending")).all()
        return {p["task"]: p["score"] for r in rows for p in json.loads(r.payload_json)}


def test_chunks_of_cuts_the_todo_list():
    plan = {"todo": [{"id": i} for i in range(40)]}
    assert [len(c) for c in chunks_of(plan, 16)] == [16, 16, 8]
    assert [t["id"] for c in chunks_of(plan, 16) for t in c] == list(range(40))
    assert chunks_of(plan, 40) == [plan["todo"]] and chunks_of(plan, 0) == [plan["todo"]]


def test_chunked_scoring_stores_what_one_pass_stores(setup, tmp_path):
    """Chunks of 16 scored separately (as two workers would), JSON round-tripped (as Celery's
    result backend does), then finished: the same scores, ranks, query batch and Label Studio
    scores as one in-process pass with the same chunks."""
    s, plan = setup
    from facemodels.detector import ModelCache

    cache = ModelCache(s.device)
    parts = chunks_of(plan, CHUNK)
    assert len(parts) == 3
    results = [json.loads(json.dumps(score_chunk(s, plan, p, cache))) for p in reversed(parts)][::-1]
    again = score_chunk(s, plan, parts[1], cache)  # a chunk redelivered after its worker died
    assert _without_region_ids(json.loads(json.dumps(again))) == _without_region_ids(results[1])
    flat = [r for part in results for r in part]
    assert [r["task_id"] for r in flat] == [t["id"] for t in plan["todo"]]
    bad = flat[-1]
    assert bad["error"] and bad["uncertainty"] is None and bad["prediction"] is None
    good = [r for r in flat if r["error"] is None]
    assert len(good) == N_TASKS and all(len(r["embedding"]) == len(good[0]["embedding"]) > 0 for r in good)
    assert all(0 <= r["uncertainty"]["margin"] <= 1 and r["prediction"]["model_version"] == plan["version"]
               for r in good)

    o = finish_scoring(s, {k: v for k, v in plan.items() if k != "todo"} | {"todo_ids": [t["id"] for t in plan["todo"]]},
                       flat, run_id=None)
    chunked, chunked_preds = _rows(s), _predictions(s)
    assert (o.scored, o.failed, o.written) == (N_TASKS, 1, 0) and o.pending_writes > 0
    flagged = BATCH * s.query_batch_rounds  # QUERY_BATCH_ROUNDS rounds of QUERY_BATCH_SIZE picks
    assert len(o.query_batch) == flagged
    ranks = sorted(v[5] for v in chunked.values())
    assert ranks == list(range(N_TASKS + 1))  # every scored task ranked once, the failed one last
    assert chunked[100 + N_TASKS][5] == N_TASKS and chunked[100 + N_TASKS][7]
    assert sorted(v[5] for v in chunked.values() if v[6]) == list(range(flagged))  # the query batch first
    good_rows = sorted((v for v in chunked.values() if not v[7] and not v[6]), key=lambda v: v[5])
    assert all(a[0] >= b[0] for a, b in itertools.pairwise(good_rows))  # then monotone: most uncertain first
    assert sum(v[6] for v in chunked.values()) == flagged
    assert set(chunked_preds) == {r["task_id"] for r in good}

    # finishing again (a callback redelivered after its worker died) leaves the same rows
    finish_scoring(s, plan, flat)
    assert _rows(s) == chunked

    # one in-process pass over the same chunks: identical rows and Label Studio scores
    with session_scope(s.database_url) as db:
        for r in db.exec(select(TaskScore)).all():
            db.delete(r)
        for r in db.exec(select(OutboxWrite)).all():
            db.delete(r)
    from ml_worker import scoring

    saved = scoring.SCORE_CHUNK
    scoring.SCORE_CHUNK = CHUNK  # the same forward batches as the chunks
    try:
        o2 = score_plan(s, plan, model_cache=cache)
    finally:
        scoring.SCORE_CHUNK = saved
    assert _rows(s) == chunked and o2.query_batch == o.query_batch
    assert _predictions(s) == chunked_preds


def _without_region_ids(results: list[dict]) -> list[dict]:
    """Results without the Label Studio region ids (random per prediction)."""
    out = json.loads(json.dumps(results))
    for r in out:
        for region in (r["prediction"] or {}).get("result", []):
            region.pop("id", None)
    return out


def test_finish_refuses_results_that_do_not_match_the_plan(setup):
    s, plan = setup
    fake = [{"task_id": t["id"], "error": "x", "uncertainty": None, "embedding": None, "prediction": None}
            for t in plan["todo"]]
    with pytest.raises(ValueError, match="do not match"):
        finish_scoring(s, plan, fake[:-1])
    with pytest.raises(ValueError, match="do not match"):
        finish_scoring(s, plan, fake[1:] + fake[:1])
    assert _rows(s) == {}


def test_a_chunk_that_fails_for_good_fails_the_run_and_queues_a_recovery(setup, monkeypatch):
    """The chord's error callback (``faceloop.score_failed``, called as Celery calls it: request,
    exception, traceback, then its own argument)."""
    s, _ = setup
    from ml_worker import tasks

    monkeypatch.setattr(tasks, "get_settings", lambda: s)
    run_id = tasks.new_scoring_run(s, PID, "manual")
    assert tasks.claim_scoring(s, run_id)
    tasks.score_failed(None, RuntimeError("Label Studio unreachable"), None, run_id)
    with session_scope(s.database_url) as db:
        runs = db.exec(select(ScoringRun).order_by(ScoringRun.id)).all()
        assert runs[0].state == "failed" and "a scoring chunk failed for good" in runs[0].error
        assert "Label Studio unreachable" in runs[0].error
        assert [(r.trigger, r.state, r.celery_id) for r in runs[1:]] == [("recovery", "queued", "")]
    # a recovery run that fails is not re-run again
    rec = runs[1].id
    assert tasks.claim_scoring(s, rec)
    tasks.score_failed(None, RuntimeError("again"), None, rec)
    with session_scope(s.database_url) as db:
        assert len(db.exec(select(ScoringRun)).all()) == 2


def test_finish_task_orders_chunk_results_by_the_plan(setup, monkeypatch):
    """``faceloop.score_finish`` (the chord's callback) matches results to tasks by id, records
    the run, and refuses a missing chunk without storing anything."""
    s, plan = setup
    from ml_worker import tasks

    monkeypatch.setattr(tasks, "get_settings", lambda: s)
    meta = {k: v for k, v in plan.items() if k != "todo"} | {"todo_ids": [t["id"] for t in plan["todo"]]}
    parts = chunks_of(plan, CHUNK)
    results = [score_chunk(s, plan, p) for p in parts]
    run_id = tasks.new_scoring_run(s, PID, "manual")
    assert tasks.claim_scoring(s, run_id)
    out = tasks.score_finish(results[:2], run_id, meta, 0.0, [])
    assert out["state"] == "failed" and "no result for" in out["error"] and _rows(s) == {}
    run_id = tasks.new_scoring_run(s, PID, "manual")
    assert tasks.claim_scoring(s, run_id)
    out = tasks.score_finish(results[::-1], run_id, meta, 0.0, [])
    assert out["state"] == "succeeded" and out["scored"] == N_TASKS and out["failed"] == 1, out
    with session_scope(s.database_url) as db:
        r = db.get(ScoringRun, run_id)
        assert (r.state, r.scored, r.failed, r.model_version) == ("succeeded", N_TASKS, 1, plan["version"])
    assert tasks.score_finish(results, run_id, meta, 0.0, [])["state"] == "not running (succeeded)"


def test_worker_log_line_of_a_chunk_is_short(caplog, monkeypatch):
    """Celery's trace logger writes "Task faceloop.score_chunk[...] succeeded in ...s: <result>" at
    INFO; a chunk's result holds every task's embedding, and worker.log grew by 36 KB in 25 minutes
    of scoring. The line stays, with the result cut to CHUNK_RESULT_REPR_CHARS. The scoring itself
    is stood in for by results of its shape (the real one is tested above): what is under test is
    Celery's logging of the real task."""
    import logging

    import ml_worker.scoring
    from ml_worker import tasks

    big = [{"task_id": t, "error": None, "uncertainty": 0.5, "n_boxes": 2, "embedding": [0.123456789] * 512,
            "prediction": {"result": []}} for t in range(16)]
    monkeypatch.setattr(ml_worker.scoring, "score_chunk", lambda settings, plan, chunk, cache: big)
    monkeypatch.setattr(tasks, "_model_cache", lambda settings: None)
    caplog.set_level(logging.INFO, logger="celery.app.trace")
    r = tasks.score_chunk.apply(args=(1, {}, [{"id": 1}]))
    assert r.successful() and r.result == big  # the result itself is whole
    (line,) = [m for m in caplog.messages if "succeeded in" in m]
    assert "faceloop.score_chunk" in line and "'task_id': 0" in line
    assert len(line) < 300, line
