"""Issue 9 §6: write-back to Label Studio through the outbox, and scoring as its own step.

Real Label Studio (``.venv-ls``, fixture ``label_studio``) behind a loopback TCP proxy that
the test cuts (``TcpProxy.down``: connection refused, as with Label Studio down) and restores;
the real shipped default model scores the tasks; SQLite in tmp_path; a real redis-server where
the case sends a Celery message.
"""

from __future__ import annotations

import time

import pytest
import redis
from label_studio_sdk import LabelStudio as SDK
from sqlmodel import select

from backend import registry
from backend.db import session_scope
from backend.lsapi import create_project, upload_images
from backend.models import OutboxWrite, ScoringRun, TaskScore, TrainingJob
from ml_worker import outbox
from ml_worker.tasks import new_scoring_run, run_scoring, sweep
from tests.faults.conftest import TcpProxy
from tests.helpers_unit import config_text, make_settings, write_jpeg

N_TASKS = 8


def _project(ls, tmp_path, title):
    client = SDK(base_url=ls.url, api_key=ls.api_key)
    pid = create_project(client, title, config_text("awake_sleep"))
    paths = [write_jpeg(tmp_path / "img" / f"{title}-{i}.jpg", width=96, height=72,
                        color=(30 * i % 255, 90, 200 - 20 * i)) for i in range(N_TASKS)]
    ids = upload_images(client, ls.url, pid, paths)
    assert len(ids) == N_TASKS
    return client, pid


def _predictions(client, pid) -> dict[int, list[str]]:
    out = {}
    for t in client.tasks.list(project=pid, page_size=100, fields="all"):
        out[int(t.id)] = [str(p.model_version) for p in (t.predictions or [])]
    return out


def _settings(tmp_path, ls_url, api_key, **kw):
    # one round of 3 picks (QUERY_BATCH_ROUNDS=1): this file counts the flagged tasks of a write-back
    return make_settings(tmp_path, label_studio_url=ls_url, label_studio_api_key=api_key, query_batch_size=3,
                         query_batch_rounds=1, review_view_title="Review queue", **kw)


@pytest.mark.e2e
@pytest.mark.parametrize("interval,outage", [(1.0, 3.0), (20.0, 60.0)], ids=["short", "defaults"])
def test_label_studio_down_during_write_back_loses_nothing(tmp_path, label_studio, interval, outage):
    proxy = TcpProxy(label_studio.port)
    s = _settings(tmp_path, proxy.url, label_studio.api_key)
    client, pid = _project(label_studio, tmp_path, "outbox")
    with session_scope(s.database_url) as db:
        registry.upsert_project(db, pid, label_config=config_text("awake_sleep"), ls_url=proxy.url)
    run_id = new_scoring_run(s, pid, "manual")

    def cut_at_the_end(done, total):
        if done == total:
            proxy.down()  # Label Studio goes away between scoring and write-back

    try:
        out = run_scoring(s, run_id, progress=cut_at_the_end)
        assert out["state"] == "succeeded" and out["scored"] == N_TASKS, out
        assert out["written"] == 0 and out["pending_writes"] >= 3, out
        with session_scope(s.database_url) as db:
            run = db.get(ScoringRun, run_id)
            version = run.model_version
            assert (run.state, run.write_state, run.written) == ("succeeded", "pending", 0)
            scores = sorted(db.exec(select(TaskScore).where(TaskScore.project_id == pid)).all(), key=lambda r: r.rank)
            assert len(scores) == N_TASKS and [r.rank for r in scores] == list(range(N_TASKS))
            # most uncertain first; ties are ordered by diversity (ml_worker.sampler.queue_order), not id
            assert [-r.uncertainty for r in scores] == sorted(-r.uncertainty for r in scores)
            assert sum(r.in_query_batch for r in scores) == s.query_batch_size == 3
            pend = db.exec(select(OutboxWrite).where(OutboxWrite.scoring_run_id == run_id)).all()
            assert [w.kind for w in pend] == ["predictions", "model_version", "review_view"]
            assert "ConnectError" in pend[0].last_error or "refused" in pend[0].last_error.lower(), pend[0].last_error
        assert all(v == [] for v in _predictions(client, pid).values())  # nothing reached Label Studio
        # the recovery loop as the backend and workers run it (a sweep every RECOVERY_INTERVAL_S);
        # while Label Studio is down: nothing delivered, nothing lost, no exception
        down = time.monotonic()
        while time.monotonic() - down < outage:
            time.sleep(interval)
            o = sweep(s)["outbox"]
            assert o["done"] == 0 and o["acknowledged"] == 0
        proxy.up()
        back = time.monotonic()
        delivered = None
        while delivered is None and time.monotonic() - back < interval + outbox.BACKOFF_MAX_S + 30:
            time.sleep(interval - (time.monotonic() - down) % interval)  # the loop's own rhythm
            sweep(s)
            with session_scope(s.database_url) as db:
                if db.get(ScoringRun, run_id).write_state == "done":
                    delivered = time.monotonic() - back
        assert delivered is not None, outbox.pending_writes(s, pid)
        with session_scope(s.database_url) as db:
            attempts = max(w.attempts for w in db.exec(select(OutboxWrite).where(OutboxWrite.scoring_run_id == run_id)))
        print(f"\nLabel Studio down {outage:g} s during write-back, sweep every {interval:g} s: {N_TASKS} predictions, "
              f"model version and view delivered {delivered:.1f} s after it came back ({attempts} attempts; "
              f"backoff {outbox.BACKOFF_BASE_S:g}-{outbox.BACKOFF_MAX_S:g} s)")
        assert delivered <= interval + outbox.BACKOFF_MAX_S + 5
        preds = _predictions(client, pid)
        assert len(preds) == N_TASKS and all(v == [version] for v in preds.values()), preds
        assert client.projects.get(id=pid).model_version == version
        views = [v for v in client.views.list(project=pid) if (v.data or {}).get("title") == "Review queue"]
        assert len(views) == 1
        with session_scope(s.database_url) as db:
            assert db.get(ScoringRun, run_id).written == N_TASKS
            ranked = [r.task_id for r in sorted(db.exec(select(TaskScore).where(TaskScore.project_id == pid)).all(),
                                                key=lambda r: r.rank)]
        # every task ties (day 0: classes unknown); Label Studio's Review queue shows faceloop's
        # diversity order, not id order (the scores' tie offsets, ml_worker.scoring.tie_offsets)
        from backend.lsapi import review_queue

        assert [t["id"] for t in review_queue(client, pid, "Review queue", limit=N_TASKS)] == ranked

        # idempotent: a write whose acknowledgement was lost is sent again, and adds nothing
        with session_scope(s.database_url) as db:
            for w in db.exec(select(OutboxWrite).where(OutboxWrite.scoring_run_id == run_id)).all():
                w.state, w.next_attempt_ts = "pending", 0.0
        o = outbox.deliver(s, pid)
        assert o["acknowledged"] == 0 and o["skipped"] == N_TASKS and o["done"] == 3, o
        # ... and so does scoring again with the same version
        again = run_scoring(s, new_scoring_run(s, pid, "manual"))
        assert again["state"] == "succeeded" and again["written"] == 0 and again["pending_writes"] == 0, again
        assert all(v == [version] for v in _predictions(client, pid).values())
        with session_scope(s.database_url) as db:  # the second scoring flagged the same number, not 3 more
            assert sum(r.in_query_batch for r in db.exec(select(TaskScore).where(TaskScore.project_id == pid))) == 3
    finally:
        proxy.down()


@pytest.mark.e2e
def test_scoring_failure_never_fails_the_promoting_training(tmp_path, label_studio, redis_server, monkeypatch):
    """The training job ends ``succeeded`` with its version promoted; the scoring after it is a
    ScoringRun queued on the ``score`` queue, whose failure (Label Studio down) is its own."""
    import ml_worker.training as training
    from ml_worker.tasks import train

    proxy = TcpProxy(label_studio.port)
    proxy.down()
    s = _settings(tmp_path, proxy.url, label_studio.api_key, celery_broker_url=redis_server.url,
                  celery_result_backend=redis_server.url)
    monkeypatch.setattr("ml_worker.tasks.get_settings", lambda: s)
    pid = 4321
    with session_scope(s.database_url) as db:
        registry.upsert_project(db, pid, label_config=config_text("awake_sleep"), ls_url=proxy.url)
        base = registry.promoted_version(db, pid, s)
        job, _ = registry.request_training(db, pid, "start_training")
        job_id, base_path = job.id, base.path

    def promote_a_version(settings, jid, progress=None):
        # what run_training does once its candidate won the gate: register it and promote it
        from pathlib import Path

        from backend.hashing import file_sha256
        from backend.models import ModelVersion

        with session_scope(settings.database_url) as db:
            v = ModelVersion(project_id=pid, version=registry.next_version_name(db, pid), path=base_path,
                             sha256=file_sha256(Path(base_path)), status="candidate", training_job_id=jid)
            db.add(v)
            db.flush()
            registry.promote(db, v, "test: promoted")
            return training.TrainOutcome(v.version, True, "test: promoted", {})

    monkeypatch.setattr(training, "run_training", promote_a_version)
    try:
        res = train(job_id)
        assert res["promoted"] and res["scoring_run"], res
        run_id = res["scoring_run"]
        with session_scope(s.database_url) as db:
            j = db.get(TrainingJob, job_id)
            assert (j.state, j.stage, j.error) == ("succeeded", "done", "")
            assert f"scoring run {run_id}" in j.message
            run = db.get(ScoringRun, run_id)
            assert (run.trigger, run.training_job_id, run.state) == ("promotion", job_id, "queued")
            assert run.celery_id  # sent to the score queue on the (live) broker
            assert registry.promoted_version(db, pid, s).version == res["version"]
        assert redis.Redis.from_url(redis_server.url).llen("score") == 1
        out = run_scoring(s, run_id)  # what the worker runs for that message; Label Studio is down
        assert out["state"] == "failed", out
        with session_scope(s.database_url) as db:
            run = db.get(ScoringRun, run_id)
            assert run.state == "failed" and run.error and run.finished_at
            assert "Authorization" not in run.error and "Token" not in run.error
            assert db.get(TrainingJob, job_id).state == "succeeded"  # still: its version is served
        print(f"\nscoring after promotion failed on its own: {run.error.splitlines()[0]}")
    finally:
        proxy.down()


@pytest.mark.parametrize("kind", ["permanent", "transient"])
def test_outbox_error_kinds(kind):
    class E(Exception):
        status_code = 400 if kind == "permanent" else 503

    assert outbox.is_permanent(E()) is (kind == "permanent")
    assert [outbox.backoff_s(n) for n in range(1, 7)] == [5, 10, 20, 40, 60, 60]


@pytest.mark.e2e
def test_scoring_a_fully_annotated_project_succeeds(tmp_path, label_studio):
    """Issue 9 §6: with every task annotated, setting the project's model_version to a version
    with no predictions got 400 from Label Studio and failed the job; now nothing to predict
    means no model_version write, and the scoring run succeeds."""
    s = _settings(tmp_path, label_studio.url, label_studio.api_key)
    client, pid = _project(label_studio, tmp_path, "all-annotated")
    for t in client.tasks.list(project=pid, page_size=100):
        client.annotations.create(id=t.id, result=[])  # "no face" is an annotation too
    with session_scope(s.database_url) as db:
        registry.upsert_project(db, pid, label_config=config_text("awake_sleep"), ls_url=label_studio.url)
    run_id = new_scoring_run(s, pid, "manual")
    out = run_scoring(s, run_id)
    assert out["state"] == "succeeded" and out["scored"] == 0 and out["pending_writes"] == 0, out
    with session_scope(s.database_url) as db:
        run = db.get(ScoringRun, run_id)
        assert (run.state, run.write_state) == ("succeeded", "done")
        kinds = [w.kind for w in db.exec(select(OutboxWrite).where(OutboxWrite.scoring_run_id == run_id))]
    assert kinds == ["review_view"]
    assert (client.projects.get(id=pid).model_version or "") == ""
