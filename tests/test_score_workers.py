"""Two workers score ONE project's pool in chunks (issue 12: "scoring chunks in parallel").

Real parts, as in ``tests/test_workers.py`` (whose ``Worker`` and stack this reuses): redis-server
(broker and Celery result backend), Label Studio, one database (a SQLite file, and PostgreSQL when
its binaries are here) shared by two ``faceloop worker``
processes with different ``VAR_DIR``s, the shipped default model, awake/sleep images uploaded to
Label Studio. ``SCORE_CHUNK_SIZE=16`` over a pool of 64 tasks: ``faceloop.score`` sends a chord
of 4 ``faceloop.score_chunk`` tasks and ``faceloop.score_finish``. Checked:

- both workers scored chunks (their logs), every task has one score, ranks are 0..63 and
  monotone in uncertainty, exactly ``QUERY_BATCH_SIZE`` tasks are flagged, the predictions
  reached Label Studio;
- a worker's pool process killed (SIGKILL) in the middle of a chunk loses nothing: the chunk is
  redelivered (``task_acks_late``, ``task_reject_on_worker_lost``) and the run succeeds;
- the stored scores, ranks and query batch equal those of a run by one worker alone;
- chunks that fail for good (retried 3 times) fail the run with the reason, through the chord's
  error callback, and one ``recovery`` run is queued and sent by the recovery pass.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import time

import pytest
from sqlmodel import select

from backend.config import Settings
from tests.conftest import require_data
from tests.test_workers import Worker, _restart_backend, _wait, ls_stack, shared_db  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

N_POOL, CHUNK, BATCH = 64, 16, 5
ENV = {"SCORE_CHUNK_SIZE": str(CHUNK), "QUERY_BATCH_SIZE": str(BATCH), "RECOVERY_INTERVAL_S": "5"}


def _scores(url, pid) -> dict:
    from backend.db import session_scope
    from backend.models import TaskScore

    with session_scope(url) as s:
        return {r.task_id: (r.model_version, r.uncertainty, r.least_confidence, r.margin, r.entropy, r.n_boxes,
                            r.rank, r.in_query_batch, r.error)
                for r in s.exec(select(TaskScore).where(TaskScore.project_id == pid)).all()}


def _run(url, run_id):
    from backend.db import session_scope
    from backend.models import ScoringRun

    with session_scope(url) as s:
        return s.get(ScoringRun, run_id)


def _score(settings, url, pid) -> object:
    """Queue a manual scoring run as ``faceloop score`` does; wait until it ends; the run."""
    from ml_worker.tasks import new_scoring_run, send_scoring

    run_id = new_scoring_run(settings, pid, "manual")
    assert send_scoring(settings, run_id)
    return _wait(lambda: (r := _run(url, run_id)).state in ("succeeded", "failed") and r, f"scoring run {run_id}",
                 timeout=600)


def _chunks(w: Worker) -> list[str]:
    """Celery ids of the ``faceloop.score_chunk`` tasks this worker finished."""
    return re.findall(r"Task faceloop\.score_chunk\[([0-9a-f-]+)\] succeeded", w.text())


def _kill_pool_process_mid_chunk(w: Worker, run_id: int, timeout: float = 300) -> None:
    """SIGKILL ``w``'s pool process once it has started a chunk of run ``run_id`` (its main
    process stays, as when the kernel kills a child out of memory)."""
    mark = f"scoring run {run_id}: chunk of"
    _wait(lambda: mark in w.text(), f"a chunk of run {run_id} on {w.name}", timeout=timeout, poll=0.05)
    children = subprocess.run(["pgrep", "-P", str(w.proc.pid)], check=False, capture_output=True,
                              text=True).stdout.split()
    assert children, "the worker has no pool process"
    for c in children:
        os.kill(int(c), signal.SIGKILL)


def test_two_workers_score_one_pool_in_chunks(ls_stack, shared_db, tmp_path):  # noqa: F811 (imported fixtures)
    data = require_data()
    from label_studio_sdk import LabelStudio

    from backend.lsapi import create_project, upload_images
    from tests.conftest import REPO
    from tests.helpers_unit import make_settings

    st = ls_stack
    url = shared_db
    if url.startswith("sqlite"):
        (tmp_path / "db").mkdir(exist_ok=True)
    _restart_backend(st, url)
    env = {"DATABASE_URL": url, "CELERY_BROKER_URL": st.redis_url, "LABEL_STUDIO_URL": st.ls_url,
           "LABEL_STUDIO_API_KEY": st.api_key, **ENV}
    settings = make_settings(tmp_path / "client", database_url=url, celery_broker_url=st.redis_url,
                             label_studio_url=st.ls_url, label_studio_api_key=st.api_key)
    a = Worker("score-a", tmp_path / "score-a", "score", env)
    b = Worker("score-b", tmp_path / "score-b", "score", env)
    try:
        client = LabelStudio(base_url=st.ls_url, api_key=st.api_key)
        pid = create_project(client, "one pool, two workers", (REPO / "label_config" / "awake_sleep.xml").read_text())
        imgs = sorted((data / "images" / "train").glob("*.jpg"))
        ids = upload_images(client, st.ls_url, pid, imgs[:: len(imgs) // N_POOL][:N_POOL])
        assert len(ids) == N_POOL
        a.wait_ready()
        b.wait_ready()

        # 1. both workers idle: the pool's 4 chunks are shared
        t = time.time()
        run = _score(settings, url, pid)
        two_s = time.time() - t
        assert run.state == "succeeded", run.error
        assert (run.scored, run.failed) == (N_POOL, 0)
        by = {w.name: _chunks(w) for w in (a, b)}
        assert all(by.values()) and sum(len(v) for v in by.values()) == N_POOL // CHUNK, by
        assert "Task faceloop.score_finish" in a.text() + b.text()
        two = _scores(url, pid)
        assert sorted(two) == sorted(ids)
        assert sorted(v[6] for v in two.values()) == list(range(N_POOL))
        queue = sorted(two.values(), key=lambda v: v[6])
        assert all(x[1] >= y[1] for x, y in itertools.pairwise(queue))
        rounds = Settings.model_fields["query_batch_rounds"].default  # QUERY_BATCH_ROUNDS of QUERY_BATCH_SIZE picks
        assert sum(v[7] for v in two.values()) == BATCH * rounds
        _wait(lambda: _run(url, run.id).write_state == "done", "the write-back to Label Studio", timeout=120)
        for tid in ids:
            assert run.model_version in [p.model_version for p in client.tasks.get(id=tid).predictions or []]

        # 2. a pool process killed in the middle of a chunk: the chunk is redelivered, nothing lost
        from ml_worker.tasks import new_scoring_run, send_scoring

        run_id = new_scoring_run(settings, pid, "manual")
        assert send_scoring(settings, run_id)
        _kill_pool_process_mid_chunk(b, run_id)
        run = _wait(lambda: (r := _run(url, run_id)).state in ("succeeded", "failed") and r, "the run with a kill")
        assert run.state == "succeeded" and (run.scored, run.failed) == (N_POOL, 0), run.error
        text = b.text()
        assert "signal 9 (SIGKILL)" in text, text[-2000:]
        killed = re.findall(r"Task faceloop\.score_chunk\[([0-9a-f-]+)\] received", text[: text.index("signal 9 (SIGKILL)")])[-1]
        assert killed in _chunks(a) + _chunks(b), f"the killed chunk {killed} was not scored again"
        assert _scores(url, pid) == two

        # 3. one worker alone: the same scores, ranks and query batch
        b.stop()
        before = len(_chunks(a))
        t = time.time()
        run = _score(settings, url, pid)
        one_s = time.time() - t
        assert run.state == "succeeded", run.error
        assert len(_chunks(a)) - before == N_POOL // CHUNK
        assert _scores(url, pid) == two
        # 4. chunks that fail for good (the promoted version's files are nowhere): each chunk is
        # retried, then the chord's error callback fails the run with the reason and queues one
        # recovery run, which the recovery pass sends and which is not re-run when it fails too
        from backend.db import session_scope
        from backend.models import ModelVersion, Project, ScoringRun

        with session_scope(url) as s:
            lost = ModelVersion(project_id=pid, version=f"p{pid}-lost", path="/nonexistent/lost/best.pt",
                                sha256="0" * 64, status="promoted")
            s.add(lost)
            s.flush()
            s.get(Project, pid).promoted_version_id = lost.id
        run = _score(settings, url, pid)
        assert run.state == "failed" and "a scoring chunk failed for good" in run.error, run.error
        assert "attempt 4" in a.text()  # three retries before giving up

        def later():
            with session_scope(url) as s:
                return s.exec(select(ScoringRun).where(ScoringRun.id > run.id)).all()

        rec = _wait(lambda: (r := later()) and r[0].state in ("succeeded", "failed") and r, "the recovery run")
        assert [(r.trigger, r.state) for r in rec] == [("recovery", "failed")], [(r.trigger, r.state) for r in rec]
        time.sleep(12)  # two more recovery passes: nothing else is queued
        assert len(later()) == 1
        print(f"\nSCORE CHUNKS ({url.split(':')[0]}): {N_POOL} tasks in chunks of {CHUNK}: two workers {two_s:.1f} s "
              f"(chunks {[len(v) for v in by.values()]}), one worker {one_s:.1f} s (not a benchmark: the "
              f"workers share 2 loaded cores), chunk {killed} killed mid-way and scored again")
    finally:
        a.stop()
        b.stop()
