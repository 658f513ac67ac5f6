"""Celery tasks: thin wrappers that lock, report progress and call plain functions.

- ``faceloop.train(job_id)``: one training job; a per-project Redis lock means never two
  trainings of one project at once. The job moves ``queued -> running`` only once the lock is
  held, so requests that arrive while another run is in progress join the queued job (exactly
  one more run; skipped when the labels did not change, see below). Idempotent: a redelivered
  message for a job that is no longer queued is a no-op.
  After a promotion the job ends ``succeeded`` and queues a :class:`backend.models.ScoringRun`
  (trigger ``promotion``): scoring is its own step with its own status, so a scoring failure
  (e.g. Label Studio down) is visible on the run and never fails the training whose version is
  already promoted and served (issue 9 §6).
- ``faceloop.score(project_id, run_id=None)``: score the whole unlabelled pool (scoring run
  ``run_id``, or a new ``manual`` one) (:func:`run_scoring`). A pool of more than
  ``SCORE_CHUNK_SIZE`` tasks is split: a Celery chord of ``faceloop.score_chunk`` (one chunk each,
  plain results, retried; any worker of the ``score`` queue) whose callback ``faceloop.score_finish``
  stores the scores, ranks the queue and writes back once; ``faceloop.score_failed`` fails the run
  when a chunk fails for good and queues one ``recovery`` run (:func:`send_chunks`).
- ``faceloop.preannotate(project_id, task_ids)``: pre-annotate new tasks in bulk (a ``new_tasks`` run).

Worker faults (issue 9 §6): the lock has a short TTL (``JOB_HEARTBEAT_TTL_S``, 45 s) and a
:class:`Heartbeat` thread renews it, with a ``faceloop:job:<id>:alive`` key, every quarter of
that while the worker lives. :func:`sweep` (run every ``RECOVERY_INTERVAL_S`` by the backend and
by each worker) fails a ``running`` job whose heartbeat is gone on two checks in a row, with the
reason, and queues one re-run (trigger ``recovery``); the dead worker's lock has expired by then.
It also sends queued jobs and scoring runs that were never sent (recorded while Redis was down)
and delivers the Label Studio write-back outbox (:mod:`ml_worker.outbox`).

A worker that starts (``faceloop up`` starts its stack's worker) does not wait for that timeout
for its own stack's jobs: a ``running`` job claimed on this host for this stack by a process that
is gone is failed at once and re-run (:func:`recover_own_jobs`; the job's ``worker`` field).

A job queued while another run of the project was in progress (a second press of *Start
Training*) is skipped when the labels at its snapshot are the same as that run's: no annotation
created, updated or deleted since (:func:`take_snapshot`; state ``skipped``, the reason in its
message).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
import traceback
from datetime import datetime, timezone

import redis
from celery.signals import worker_ready
from redis.exceptions import LockError
from sqlalchemy import update
from sqlmodel import select

from backend.config import get_settings
from backend.db import session_scope
from backend.lsapi import api_error_text
from backend.models import ScoringRun, TrainingJob, utcnow
from ml_worker.celery_app import app

log = logging.getLogger("faceloop.worker")

#: Trigger of a job queued by :func:`recover_lost_jobs`; such a job is not re-run again.
RECOVERY_TRIGGER = "recovery"


def _redis(settings):
    return redis.Redis.from_url(settings.celery_broker_url, socket_timeout=5, socket_connect_timeout=2)


def lock_name(project_id: int) -> str:
    return f"faceloop:train:{project_id}"


def alive_key(job_id: int) -> str:
    return f"faceloop:job:{job_id}:alive"


class Heartbeat:
    """Renews a job's project lock and alive key from a daemon thread, every ``ttl / 4`` s.

    When the worker process dies, both expire within ``ttl`` seconds: the lock frees itself and
    :func:`recover_lost_jobs` sees the job is lost.
    """

    def __init__(self, r, lock, job_id: int, ttl: float):
        self.r, self.lock, self.job_id, self.ttl = r, lock, job_id, ttl
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-job-{job_id}", daemon=True)

    def beat(self) -> None:
        self.r.set(alive_key(self.job_id), str(time.time()), px=int(self.ttl * 1000))

    def start(self) -> "Heartbeat":
        self.beat()
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self.beat()  # first: the job is alive even if its lock expired during a Redis outage
                self.lock.reacquire()
            except LockError:
                # expired while Redis was unreachable: take it again unless another run holds it
                held = self.lock.acquire(blocking=False)
                log.error("job %s: its project lock had expired; %s", self.job_id,
                          "taken again" if held else "another run holds it now")
            except Exception as e:  # Redis blip: try again next beat (the thread must not die)
                log.warning("job %s: heartbeat failed: %s: %s", self.job_id, e.__class__.__name__, e)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.r.delete(alive_key(self.job_id))
        except redis.RedisError:
            pass


def worker_identity(settings) -> str:
    """This process as a job's ``worker``: ``host=<hostname> pid=<pid> stack=<instance>`` (the
    stack's ``LABEL_STUDIO_INSTANCE``, ``-`` when unset)."""
    return f"host={socket.gethostname()} pid={os.getpid()} stack={settings.label_studio_instance or '-'}"


def parse_worker(text: str) -> dict:
    """``{"host", "pid", "stack"}`` from a job's ``worker`` field (missing keys absent)."""
    return dict(part.split("=", 1) for part in (text or "").split() if "=" in part)


def claim_job(settings, job_id: int) -> bool:
    """Atomically move a job from ``queued`` to ``running`` and record this process as its
    worker (:func:`worker_identity`); False if it was not queued."""
    with session_scope(settings.database_url) as s:
        res = s.exec(update(TrainingJob).where(TrainingJob.id == job_id, TrainingJob.state == "queued")
                     .values(state="running", started_at=utcnow(), stage="starting",
                             worker=worker_identity(settings)))
        return res.rowcount == 1


class JobSkipped(Exception):
    """Raised by :func:`take_snapshot` when a job need not train; ``str()`` is the reason."""


def labels_fingerprint(label_config: str, tasks) -> str:
    """SHA-256 (hex) of the label config and of every labelled task's id and latest non-cancelled
    result (``backend.lsapi.snapshot``'s ``SnapshotTask``; tasks whose ``result`` is None, i.e.
    unlabelled, are left out). Order of tasks and of keys does not matter."""
    rows = sorted(([int(t.id), t.result] for t in tasks if t.result is not None), key=lambda r: r[0])
    body = json.dumps([label_config or "", rows], sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def take_snapshot(settings, job_id: int, client, project_id: int, label_config: str) -> list:
    """Snapshot the project's labels for job ``job_id`` (``backend.lsapi.snapshot``), record their
    fingerprint (:func:`labels_fingerprint`) on the job, and decide whether it must train.

    Rule: the job is skipped when it was requested while the project's previous job was running
    (``created_at`` between that job's ``started_at`` and ``finished_at``), that job succeeded,
    and its snapshot had the same fingerprint: no annotation was created, updated or deleted (and
    the label config did not change) since it took its snapshot, so a second run would train on
    the same labels. A request after new labels, after a failed run, or when nothing was running
    always trains.

    Returns: the labelled tasks (``result`` not None). Raises: :class:`JobSkipped` with the reason.
    """
    from backend.lsapi import snapshot

    tasks = [t for t in snapshot(client, project_id) if t.result is not None]
    sha = labels_fingerprint(label_config, tasks)
    reason = None
    with session_scope(settings.database_url) as s:
        job = s.get(TrainingJob, job_id)
        job.labels_sha = sha
        asked = _naive_utc(job.created_at)
        prev = s.exec(select(TrainingJob).where(TrainingJob.project_id == project_id, TrainingJob.id != job_id,
                                                TrainingJob.started_at.is_not(None))
                      .order_by(TrainingJob.started_at.desc())).first()
        if (prev is not None and prev.state == "succeeded" and prev.labels_sha == sha
                and _naive_utc(prev.started_at) <= asked <= _naive_utc(prev.finished_at or utcnow())):
            reason = (f"no annotation created, updated or deleted since job {prev.id}'s snapshot "
                      f"({len(tasks)} labelled tasks, the same labels; it was asked for while job "
                      f"{prev.id} was running); not trained")
    if reason:
        raise JobSkipped(reason)
    return tasks


@app.task(bind=True, name="faceloop.train")
def train(self, job_id: int) -> dict:
    """Run training job ``job_id`` (see module docstring)."""
    from ml_worker.training import run_training

    settings = get_settings()
    with session_scope(settings.database_url) as s:
        job = s.get(TrainingJob, job_id)
        if job is None:
            return {"job": job_id, "state": "unknown job"}
        pid = job.project_id
    r = _redis(settings)
    # thread_local=False: the Heartbeat thread renews the lock this thread acquired
    lock = r.lock(lock_name(pid), timeout=settings.job_heartbeat_ttl_s, thread_local=False)
    lock.acquire(blocking=True)  # waits while another worker trains this project
    heartbeat = Heartbeat(r, lock, job_id, settings.job_heartbeat_ttl_s).start()  # alive before running
    try:
        if not claim_job(settings, job_id):
            return {"job": job_id, "state": "not queued (already run)"}
        if self.request.id:
            with session_scope(settings.database_url) as s:
                s.get(TrainingJob, job_id).celery_id = self.request.id

        def progress(fields):
            # Celery's PROGRESS state is a courtesy (the job row holds the progress): a broker
            # that is gone for a moment (stopping, restarting) must not fail the training
            if self.request.id:
                try:
                    self.update_state(state="PROGRESS", meta={k: v for k, v in fields.items() if k != "metrics"})
                except (redis.RedisError, OSError) as e:
                    log.warning("job %s: progress not sent to the result backend: %s", job_id, e)

        try:
            try:
                outcome = run_training(settings, job_id, progress)
            except JobSkipped as e:
                with session_scope(settings.database_url) as s:
                    j = s.get(TrainingJob, job_id)
                    j.state, j.stage, j.finished_at, j.message = "skipped", "skipped", utcnow(), str(e)
                log.info("training job %s %s", job_id, e)
                return {"job": job_id, "state": "skipped", "reason": str(e)}
            run_id = None
            with session_scope(settings.database_url) as s:
                j = s.get(TrainingJob, job_id)
                j.state, j.stage, j.finished_at = "succeeded", "done", utcnow()
                if outcome.promoted:
                    # scoring is its own step with its own status: a scoring failure never fails
                    # the training whose version is promoted and served (issue 9 §6)
                    run = ScoringRun(project_id=pid, trigger="promotion", training_job_id=job_id,
                                     model_version=outcome.version or "")
                    s.add(run)
                    s.flush()
                    run_id = run.id
                    j.message += f"; scoring of the unlabelled pool queued (scoring run {run_id})"
            if run_id is not None:
                send_scoring(settings, run_id)
            return {"job": job_id, "version": outcome.version, "promoted": outcome.promoted,
                    "reason": outcome.reason, "scoring_run": run_id}
        except Exception as e:
            log.exception("training job %s failed", job_id)
            with session_scope(settings.database_url) as s:
                j = s.get(TrainingJob, job_id)
                j.state, j.finished_at = "failed", utcnow()
                # the message only (an SDK ApiError's str() holds response headers and cookies)
                j.error = api_error_text(e) + "\n" + "".join(traceback.format_tb(e.__traceback__, limit=5))
            return {"job": job_id, "state": "failed", "error": api_error_text(e)}
    finally:
        heartbeat.stop()
        try:
            lock.release()
        except LockError:
            pass


def claim_scoring(settings, run_id: int) -> bool:
    """Move a scoring run to ``running``; False if it already finished. A ``running`` run is
    claimed again: its message was redelivered because its worker died, and scoring is idempotent."""
    with session_scope(settings.database_url) as s:
        res = s.exec(update(ScoringRun).where(ScoringRun.id == run_id, ScoringRun.state.in_(("queued", "running")))
                     .values(state="running", started_at=utcnow(), stage="scoring"))
        return res.rowcount == 1


def _fail_run(settings, run_id: int, e: Exception, what: str = "") -> None:
    with session_scope(settings.database_url) as s:
        r = s.get(ScoringRun, run_id)
        r.state, r.stage, r.finished_at = "failed", "failed", utcnow()
        # the message only (an SDK ApiError's str() holds response headers and cookies)
        r.error = what + api_error_text(e) + "\n" + "".join(traceback.format_tb(e.__traceback__, limit=5))


def _succeed_run(settings, run_id: int, o) -> dict:
    with session_scope(settings.database_url) as s:
        r = s.get(ScoringRun, run_id)
        r.state, r.stage, r.finished_at = "succeeded", "done", utcnow()
        r.model_version, r.scored, r.failed = o.model_version, o.scored, o.failed
    return {"run": run_id, "state": "succeeded", "version": o.model_version, "scored": o.scored,
            "written": o.written, "pending_writes": o.pending_writes, "failed": o.failed}


def run_scoring(settings, run_id: int, task_ids: list[int] | None = None, progress=None,
                chunked: bool = False) -> dict:
    """Score the pool for scoring run ``run_id`` and record the outcome on the run.

    Args:
        chunked: split a pool of more than ``settings.score_chunk_size`` tasks into chunks that
            any worker of the ``score`` queue scores (a Celery chord of ``faceloop.score_chunk``
            with ``faceloop.score_finish`` as its callback: :func:`send_chunks`); the run stays
            ``running`` until the callback records it. Only inside a worker (it sends messages).
    Returns: ``{"run", "state", ...}``; a failure is stored as ``state = failed`` with the error
        (one line, no response headers) and returned, never raised. A chunked run returns
        ``state = running`` with ``chunks`` (how many were sent).
    """
    from ml_worker.scoring import chunks_of, read_pool, score_plan

    with session_scope(settings.database_url) as s:
        run = s.get(ScoringRun, run_id)
        if run is None:
            return {"run": run_id, "state": "unknown scoring run"}
        pid = run.project_id
    if not claim_scoring(settings, run_id):
        return {"run": run_id, "state": "not queued (already run)"}
    t0 = time.time()
    try:
        plan = read_pool(settings, pid, task_ids)
        parts = chunks_of(plan, settings.score_chunk_size) if chunked else [plan["todo"]]
        if len(parts) > 1:
            send_chunks(settings, run_id, plan, parts, t0)
            return {"run": run_id, "state": "running", "version": plan["version"], "tasks": len(plan["todo"]),
                    "chunks": len(parts)}
        o = score_plan(settings, plan, progress=progress, run_id=run_id, t0=t0)
    except Exception as e:
        log.exception("scoring run %s of project %s failed", run_id, pid)
        _fail_run(settings, run_id, e)
        return {"run": run_id, "state": "failed", "error": api_error_text(e)}
    return _succeed_run(settings, run_id, o)


def send_chunks(settings, run_id: int, plan: dict, parts: list[list[dict]], t0: float) -> list[str]:
    """Send a scoring run's chunks as a Celery chord on the ``score`` queue.

    Header: one ``faceloop.score_chunk(run_id, plan, tasks)`` per part (pure, retried on error,
    redelivered when its worker dies: ``task_acks_late``); callback: ``faceloop.score_finish``
    (results through the Redis result backend, in header order); error callback of the chord:
    ``faceloop.score_failed`` (a chunk that failed for good fails the run). The plan travels
    without the tasks' data (each chunk carries its own). Records the stage on the run.

    Returns: the chunks' Celery ids. Raises: broker errors (the caller fails the run).
    """
    from celery import chord

    meta = {k: v for k, v in plan.items() if k != "todo"}
    meta["todo_ids"] = [t["id"] for t in plan["todo"]]
    chunk_meta = {k: meta[k] for k in ("project_id", "version", "ls_url", "label_config", "measure")}
    header = [score_chunk.s(run_id, chunk_meta, part).set(queue="score") for part in parts]
    ids = [str(sig.freeze().id) for sig in header]
    body = score_finish.s(run_id, meta, t0, ids).set(queue="score")
    body.link_error(score_failed.s(run_id))
    with session_scope(settings.database_url) as s:
        r = s.get(ScoringRun, run_id)
        r.model_version = plan["version"]
        r.stage = f"scoring {len(plan['todo'])} tasks in {len(parts)} chunks"
    chord(header, app=app)(body)
    log.info("scoring run %s: %d tasks sent in %d chunks of at most %d", run_id, len(plan["todo"]), len(parts),
             max(len(p) for p in parts))
    return ids


_MODELS = None  # this worker process's loaded models (a chunk after another one of the same version loads nothing)


def _model_cache(settings):
    global _MODELS
    if _MODELS is None:
        from facemodels.detector import ModelCache

        _MODELS = ModelCache(settings.device)
    return _MODELS


#: Characters of a ``score_chunk`` result in the worker log's "Task ... succeeded in ...: <result>"
#: line (Celery's ``Task.resultrepr_maxsize``, 1024 by default): the result holds each task's
#: embedding, a long list of floats, for no one reading the log.
CHUNK_RESULT_REPR_CHARS = 120


@app.task(bind=True, name="faceloop.score_chunk", autoretry_for=(Exception,), max_retries=3, retry_backoff=2,
          retry_backoff_max=30, retry_jitter=False, resultrepr_maxsize=CHUNK_RESULT_REPR_CHARS)
def score_chunk(self, run_id: int, plan: dict, tasks: list[dict]) -> list[dict]:
    """Score one chunk of scoring run ``run_id`` (:func:`ml_worker.scoring.score_chunk`): plain
    results, nothing written. Retried 3 times (2, 4, 8 s apart) on any error; a bad image is a
    result (its error), not an error."""
    from ml_worker.scoring import score_chunk as score_tasks

    settings = get_settings()
    log.info("scoring run %s: chunk of %d tasks (%s..%s), attempt %d", run_id, len(tasks),
             tasks[0]["id"] if tasks else "-", tasks[-1]["id"] if tasks else "-", self.request.retries + 1)
    return score_tasks(settings, plan, tasks, _model_cache(settings))


@app.task(bind=True, name="faceloop.score_finish")
def score_finish(self, results: list[list[dict]], run_id: int, plan: dict, t0: float,
                 chunk_ids: list[str]) -> dict:
    """The chord's callback: store the scores of every chunk, rank the queue and write back once
    (:func:`ml_worker.scoring.finish_scoring`), then record the run and forget the chunks' results."""
    from ml_worker.scoring import finish_scoring

    settings = get_settings()
    with session_scope(settings.database_url) as s:
        r = s.get(ScoringRun, run_id)
        if r is None or r.state != "running":
            return {"run": run_id, "state": f"not running ({r.state if r else 'unknown scoring run'})"}
        pid = r.project_id
    try:
        by_id = {x["task_id"]: x for part in results for x in part}
        missing = [t for t in plan["todo_ids"] if t not in by_id]
        if missing:
            raise ValueError(f"chunks returned no result for {len(missing)} tasks (first {missing[:5]})")
        o = finish_scoring(settings, plan, [by_id[t] for t in plan["todo_ids"]], run_id=run_id, t0=t0)
    except Exception as e:
        log.exception("scoring run %s of project %s failed while finishing", run_id, pid)
        _fail_run(settings, run_id, e)
        return {"run": run_id, "state": "failed", "error": api_error_text(e)}
    out = _succeed_run(settings, run_id, o)
    for cid in chunk_ids:  # the chunks' results (embeddings) need not stay in Redis for result_expires
        try:
            app.AsyncResult(cid).forget()
        except Exception as e:
            log.warning("could not forget chunk result %s: %s", cid, e.__class__.__name__)
    return {**out, "chunks": len(chunk_ids)}


@app.task(name="faceloop.score_failed")
def score_failed(request, exc, tb, run_id: int) -> None:
    """Error callback of a chunked run's chord: a chunk failed for good (after its retries) or the
    callback could not run. Fails the run with the reason and records a ``recovery`` scoring run of
    the project (unless this one was a recovery run), which the recovery pass (:func:`sweep`) sends."""
    settings = get_settings()
    with session_scope(settings.database_url) as s:
        r = s.get(ScoringRun, run_id)
        if r is None or r.state != "running":
            return
        pid, again = r.project_id, r.trigger != RECOVERY_TRIGGER
    _fail_run(settings, run_id, exc if isinstance(exc, BaseException) else RuntimeError(str(exc)),
              what="a scoring chunk failed for good: ")
    if again:
        new = new_scoring_run(settings, pid, RECOVERY_TRIGGER)
        log.error("scoring run %s failed (%s); recovery scoring run %s queued", run_id, exc, new)


def new_scoring_run(settings, project_id: int, trigger: str) -> int:
    """Record a queued :class:`ScoringRun` of the project; its id."""
    with session_scope(settings.database_url) as s:
        run = ScoringRun(project_id=project_id, trigger=trigger)
        s.add(run)
        s.flush()
        return run.id


@app.task(bind=True, name="faceloop.score")
def score(self, project_id: int, run_id: int | None = None) -> dict:
    """Score the project's unlabelled pool with its promoted version (scoring run ``run_id``,
    or a new ``manual`` one)."""
    settings = get_settings()

    def progress(done, total):
        if self.request.id:
            self.update_state(state="PROGRESS", meta={"done": done, "total": total})

    if run_id is None:
        run_id = new_scoring_run(settings, project_id, "manual")
    if self.request.id:
        with session_scope(settings.database_url) as s:
            r = s.get(ScoringRun, run_id)
            if r is not None and not r.celery_id:
                r.celery_id = self.request.id
    # a pool larger than SCORE_CHUNK_SIZE is split over the score queue's workers
    return run_scoring(settings, run_id, progress=progress, chunked=bool(self.request.id))


@app.task(bind=True, name="faceloop.preannotate")
def preannotate(self, project_id: int, task_ids: list[int]) -> dict:
    """Pre-annotate new tasks in bulk (predictions written to Label Studio through the outbox)."""
    settings = get_settings()
    return run_scoring(settings, new_scoring_run(settings, project_id, "new_tasks"), task_ids=task_ids)


def _send(settings, name: str, args: list, queue: str) -> str | None:
    from ml_worker.celery_app import make_celery

    try:
        capp = make_celery(settings)  # the settings' broker, not the environment's
        with capp.connection_for_write() as conn:
            conn.ensure_connection(max_retries=0, timeout=2)
        return capp.send_task(name, args=args, queue=queue, ignore_result=True).id
    except Exception as e:
        log.warning("could not send %s%s: %s", name, args, e.__class__.__name__)
        return None


def send_scoring(settings, run_id: int) -> str | None:
    """Send ``faceloop.score(project, run_id)`` on the ``score`` queue and record its Celery id;
    None when the broker is down (the recovery pass sends it later)."""
    with session_scope(settings.database_url) as s:
        r = s.get(ScoringRun, run_id)
        pid = r.project_id
    cid = _send(settings, "faceloop.score", [pid, run_id], "score")
    if cid:
        with session_scope(settings.database_url) as s:
            r = s.get(ScoringRun, run_id)
            if not r.celery_id:
                r.celery_id = cid
    return cid


def resend_queued_scoring(settings) -> list[int]:
    """Send ``queued`` scoring runs never sent (empty ``celery_id``); ids sent."""
    with session_scope(settings.database_url) as s:
        ids = [r.id for r in s.exec(select(ScoringRun).where(ScoringRun.state == "queued",
                                                             ScoringRun.celery_id == "")).all()]
    sent = []
    for i in ids:
        if send_scoring(settings, i) is None:
            break
        sent.append(i)
    return sent


def send_train(settings, job_id: int) -> str | None:
    """Send ``faceloop.train(job_id)``; its Celery id, or None (logged) when the broker is down.
    Fails fast (one connection attempt) instead of Celery's long reconnect loop."""
    return _send(settings, "faceloop.train", [job_id], "train")


def resend_queued_jobs(settings=None, only_unsent: bool = False) -> list[int]:
    """Send ``queued`` training jobs again (e.g. ones recorded while Redis was down).

    Args:
        only_unsent: only jobs never sent (empty ``celery_id``), as the periodic :func:`sweep`
            does; the worker sends all queued jobs once when it starts.
    Returns: ids of the jobs sent. Safe to repeat: a job is claimed once (:func:`claim_job`).
    """
    settings = settings or get_settings()
    with session_scope(settings.database_url) as s:
        q = select(TrainingJob).where(TrainingJob.state == "queued")
        if only_unsent:
            q = q.where(TrainingJob.celery_id == "")
        ids = [j.id for j in s.exec(q).all()]
    sent = []
    for i in ids:
        cid = send_train(settings, i)
        if cid is None:
            break  # broker down: the next sweep tries again
        sent.append(i)
        with session_scope(settings.database_url) as s:
            j = s.get(TrainingJob, i)
            if j is not None and not j.celery_id:
                j.celery_id = cid
    return sent


def _naive_utc(t: datetime | None) -> datetime | None:
    return t.astimezone(timezone.utc).replace(tzinfo=None) if t is not None and t.tzinfo else t


def recover_lost_jobs(settings=None, suspects: set | None = None) -> list[int]:
    """Fail ``running`` jobs whose worker is gone and queue one re-run for each.

    A job is lost when its alive key (:class:`Heartbeat`) is missing on two calls in a row
    (``suspects`` carries the first sighting between calls; without it one call is enough) and
    it started more than ``JOB_HEARTBEAT_TTL_S`` ago. It gets ``state = failed`` and an ``error``
    naming the reason; a new job with trigger ``recovery`` is queued unless the lost job was
    itself a recovery run (a job that kills its worker every time is not retried forever).

    Returns: ids of the jobs declared lost. Raises redis errors when Redis is unreachable.
    """
    from backend.events import queue_training

    settings = settings or get_settings()
    r = _redis(settings)
    now = _naive_utc(utcnow())
    lost, rerun = [], []
    with session_scope(settings.database_url) as s:
        for j in s.exec(select(TrainingJob).where(TrainingJob.state == "running")).all():
            started = _naive_utc(j.started_at)
            if r.exists(alive_key(j.id)) or (started and (now - started).total_seconds() < settings.job_heartbeat_ttl_s):
                if suspects is not None:
                    suspects.discard(j.id)
                continue
            if suspects is not None and j.id not in suspects:
                suspects.add(j.id)  # first sighting: confirm on the next call (a Redis blip is not a death)
                continue
            j.state, j.finished_at = "failed", utcnow()
            again = j.trigger != RECOVERY_TRIGGER
            j.error = (f"worker lost: no heartbeat for {settings.job_heartbeat_ttl_s:g} s (killed, out of memory, "
                       f"or its machine stopped) at stage {j.stage or 'unknown'!r}; "
                       + ("a new job was queued" if again else "not re-run: it was already a recovery run"))
            lost.append(j.id)
            if again:
                rerun.append(j.project_id)
            if suspects is not None:
                suspects.discard(j.id)
    for pid in rerun:
        queue_training(settings, pid, RECOVERY_TRIGGER)
    if lost:
        log.error("training jobs %s lost their worker: failed, re-run queued for projects %s", lost, rerun)
    return lost


def own_job_gone(settings, job: TrainingJob, r=None) -> str | None:
    """Why ``running`` job ``job`` has no live worker, as seen by a worker starting now, or None.

    - ``job.worker`` names this host and this stack (``LABEL_STUDIO_INSTANCE``): gone when its pid
      is not running or is this process's own (a restarted container reuses pids; this process
      has claimed nothing yet). A job of another host or another stack is never touched here:
      with PostgreSQL, workers elsewhere share the database (the heartbeat sweep covers them).
    - ``job.worker`` is empty (claimed before it was recorded): gone when its heartbeat
      (``faceloop:job:<id>:alive``, renewed every ``JOB_HEARTBEAT_TTL_S / 4``) is missing or older
      than ``JOB_HEARTBEAT_TTL_S / 2`` and the job started longer ago than that (needs ``r``).
    """
    from backend.stack import pid_alive

    w = parse_worker(job.worker)
    if w:
        me = parse_worker(worker_identity(settings))
        if w.get("host") != me["host"] or w.get("stack") != me["stack"] or not str(w.get("pid", "")).isdigit():
            return None
        pid = int(w["pid"])
        if pid == os.getpid() or not pid_alive(pid):
            return f"its worker process (pid {pid} on {me['host']}) is gone"
        return None
    if r is None:
        return None
    bound = settings.job_heartbeat_ttl_s / 2
    started = _naive_utc(job.started_at)
    if started and (_naive_utc(utcnow()) - started).total_seconds() < bound:
        return None
    beat = r.get(alive_key(job.id))
    try:
        age = time.time() - float(beat) if beat is not None else None
    except ValueError:
        age = None
    if age is None or age > bound:
        return f"no heartbeat for over {bound:g} s and no worker recorded on the job"
    return None


def recover_own_jobs(settings=None) -> dict[int, int | None]:
    """At a worker's start: fail at once the ``running`` jobs of this stack whose worker is gone
    (:func:`own_job_gone`; e.g. ``faceloop up`` stopped with Ctrl-C during a training) and queue
    one re-run for each (trigger ``recovery``; none for a job that was itself a recovery run),
    instead of waiting for the heartbeat timeout of :func:`recover_lost_jobs`.

    The job's ``error`` says so: ``stopped with its worker (Ctrl-C of faceloop up, or killed) at
    stage 'train classifier', classifier epoch 3 of 40 (``backend.jobprogress.epoch_text``, as the
    status page and ``faceloop jobs`` count): its worker process (pid ...) is gone; re-run as job 12``.

    Returns: ``{lost job id: re-run job id or None}``. Redis unreachable: the jobs without a
    recorded worker are left to the sweep; the others are still decided (pids need no Redis).
    """
    from backend.events import queue_training

    settings = settings or get_settings()
    try:
        r = _redis(settings)
        r.ping()
    except redis.RedisError:
        r = None
    gone: dict[int, tuple[int, str, str]] = {}
    with session_scope(settings.database_url) as s:
        for j in s.exec(select(TrainingJob).where(TrainingJob.state == "running")).all():
            why = own_job_gone(settings, j, r)
            if why is None:
                continue
            # the epoch count a person reads on the status page and in `faceloop jobs` (one scale)
            from backend.jobprogress import epoch_text

            ep = epoch_text(j)
            at = f"stage {j.stage or 'unknown'!r}" + (f", {ep}" if ep else "")
            j.state, j.finished_at = "failed", utcnow()
            j.error = f"stopped with its worker (Ctrl-C of faceloop up, or killed) at {at}: {why}"
            gone[j.id] = (j.project_id, j.trigger, j.error)
    out: dict[int, int | None] = {}
    for job_id, (pid, trigger, error) in gone.items():
        rerun = None
        if trigger != RECOVERY_TRIGGER:
            try:
                rerun = int(queue_training(settings, pid, RECOVERY_TRIGGER)["job"])
            except Exception as e:  # the job is failed; the sweep's resend sends what was recorded
                log.warning("job %s: re-run not queued: %s: %s", job_id, e.__class__.__name__, e)
        with session_scope(settings.database_url) as s:
            s.get(TrainingJob, job_id).error = error + (f"; re-run as job {rerun}" if rerun is not None else
                                                        "; not re-run: it was already a recovery run"
                                                        if trigger == RECOVERY_TRIGGER else "; re-run not queued")
        out[job_id] = rerun
    if out:
        log.error("training jobs of a stopped worker failed at start, re-run as: %s", out)
    return out


def sweep(settings=None, suspects: set | None = None) -> dict:
    """One recovery pass: :func:`recover_lost_jobs`, send queued training jobs and scoring runs
    never sent, and deliver pending Label Studio writes (:func:`ml_worker.outbox.deliver`).

    Returns: ``{"lost": job ids, "sent": job ids, "scoring_sent": run ids, "outbox": counts}``.
    Never raises (Redis, Label Studio or the database down: logged, tried again next time); the
    outbox is delivered even while Redis is down.
    """
    from ml_worker.outbox import deliver

    settings = settings or get_settings()
    out = {"lost": [], "sent": [], "scoring_sent": [], "outbox": {}}
    try:
        out["lost"] = recover_lost_jobs(settings, suspects)
        out["sent"] = resend_queued_jobs(settings, only_unsent=True)
        out["scoring_sent"] = resend_queued_scoring(settings)
    except Exception as e:
        log.warning("recovery sweep skipped: %s: %s", e.__class__.__name__, e)
    try:
        out["outbox"] = deliver(settings)
    except Exception as e:
        log.warning("outbox delivery skipped: %s: %s", e.__class__.__name__, e)
    return out


def start_recovery_thread(settings=None) -> threading.Event | None:
    """Run :func:`sweep` every ``RECOVERY_INTERVAL_S`` in a daemon thread.

    Returns: an Event that stops the thread when set, or None when ``RECOVERY_INTERVAL_S`` is 0.
    """
    settings = settings or get_settings()
    if settings.recovery_interval_s <= 0:
        return None
    stop = threading.Event()

    def loop():
        suspects: set = set()
        while not stop.wait(settings.recovery_interval_s):
            sweep(settings, suspects)

    threading.Thread(target=loop, name="faceloop-recovery", daemon=True).start()
    return stop


@worker_ready.connect
def _on_worker_ready(sender=None, **_):  # pragma: no cover - exercised by the e2e worker
    from backend.db import upgrade_schema

    upgrade_schema(get_settings().database_url)  # migrations to the newest revision now, not at the first task
    try:  # this stack's jobs whose worker is gone (Ctrl-C during a training): failed and re-run now
        recover_own_jobs()
    except Exception:
        log.exception("could not check for training jobs of a stopped worker")
    try:
        ids = resend_queued_jobs()
        if ids:
            log.info("re-sent queued training jobs %s", ids)
    except Exception:
        log.exception("could not re-send queued jobs")
    try:  # versions trained on this machine before they were stored in the database
        import modelstore

        if names := modelstore.adopt_local_versions(get_settings()):
            log.info("model versions stored in the database: %s", ", ".join(names))
    except Exception:
        log.exception("could not store this machine's older model versions in the database")
    start_recovery_thread()
