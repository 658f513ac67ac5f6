"""Celery tasks: thin wrappers that lock, report progress and call plain functions.

- ``faceloop.train(job_id)``: one training job; a per-project Redis lock means never two
  trainings of one project at once. The job moves ``queued -> running`` only once the lock is
  held, so requests that arrive while another run is in progress join the queued job (exactly
  one more run). Idempotent: a redelivered message for a job that is no longer queued is a no-op.
  After a promotion the pool is scored (:func:`ml_worker.scoring.score_pool`).
- ``faceloop.score(project_id)``: score the whole unlabelled pool.
- ``faceloop.preannotate(project_id, task_ids)``: pre-annotate new tasks in bulk.

Worker faults (issue 9 §6): the lock has a short TTL (``JOB_HEARTBEAT_TTL_S``, 45 s) and a
:class:`Heartbeat` thread renews it, with a ``faceloop:job:<id>:alive`` key, every quarter of
that while the worker lives. :func:`sweep` (run every ``RECOVERY_INTERVAL_S`` by the backend and
by each worker) fails a ``running`` job whose heartbeat is gone on two checks in a row, with the
reason, and queues one re-run (trigger ``recovery``); the dead worker's lock has expired by then.
It also sends queued jobs that were never sent (recorded while Redis was down).
"""

from __future__ import annotations

import logging
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
from backend.models import TrainingJob, utcnow
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


def claim_job(settings, job_id: int) -> bool:
    """Atomically move a job from ``queued`` to ``running``; False if it was not queued."""
    with session_scope(settings.database_url) as s:
        res = s.exec(update(TrainingJob).where(TrainingJob.id == job_id, TrainingJob.state == "queued")
                     .values(state="running", started_at=utcnow(), stage="starting"))
        return res.rowcount == 1


@app.task(bind=True, name="faceloop.train")
def train(self, job_id: int) -> dict:
    """Run training job ``job_id`` (see module docstring)."""
    from ml_worker.scoring import score_pool
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
            if self.request.id:
                self.update_state(state="PROGRESS", meta={k: v for k, v in fields.items() if k != "metrics"})

        try:
            outcome = run_training(settings, job_id, progress)
            scored = None
            if outcome.promoted:
                with session_scope(settings.database_url) as s:
                    s.get(TrainingJob, job_id).stage = "scoring"
                o = score_pool(settings, pid)
                scored = {"scored": o.scored, "written": o.written, "failed": o.failed, "seconds": o.seconds}
            with session_scope(settings.database_url) as s:
                j = s.get(TrainingJob, job_id)
                j.state, j.stage, j.finished_at = "succeeded", "done", utcnow()
                if scored:
                    j.message += f"; scored {scored['scored']} unlabelled tasks in {scored['seconds']} s"
            return {"job": job_id, "version": outcome.version, "promoted": outcome.promoted,
                    "reason": outcome.reason, "scored": scored}
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


@app.task(bind=True, name="faceloop.score")
def score(self, project_id: int) -> dict:
    """Score the project's unlabelled pool with its promoted version."""
    from ml_worker.scoring import score_pool

    def progress(done, total):
        if self.request.id:
            self.update_state(state="PROGRESS", meta={"done": done, "total": total})

    o = score_pool(get_settings(), project_id, progress=progress)
    return {"version": o.model_version, "scored": o.scored, "written": o.written, "failed": o.failed}


@app.task(bind=True, name="faceloop.preannotate")
def preannotate(self, project_id: int, task_ids: list[int]) -> dict:
    """Pre-annotate new tasks in bulk (predictions written to Label Studio)."""
    from ml_worker.scoring import score_pool

    o = score_pool(get_settings(), project_id, task_ids=task_ids)
    return {"version": o.model_version, "scored": o.scored, "written": o.written, "failed": o.failed}


def send_train(settings, job_id: int) -> str | None:
    """Send ``faceloop.train(job_id)``; its Celery id, or None (logged) when the broker is down.
    Fails fast (one connection attempt) instead of Celery's long reconnect loop."""
    from ml_worker.celery_app import make_celery

    try:
        capp = make_celery(settings)  # the settings' broker, not the environment's
        with capp.connection_for_write() as conn:
            conn.ensure_connection(max_retries=0, timeout=2)
        return capp.send_task("faceloop.train", args=[job_id], queue="train", ignore_result=True).id
    except Exception as e:
        log.warning("could not send training job %s: %s", job_id, e.__class__.__name__)
        return None


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


def sweep(settings=None, suspects: set | None = None) -> dict:
    """One recovery pass: :func:`recover_lost_jobs`, then send queued jobs never sent.
    Never raises (Redis or the database down: logged, tried again next time)."""
    settings = settings or get_settings()
    out = {"lost": [], "sent": []}
    try:
        out["lost"] = recover_lost_jobs(settings, suspects)
        out["sent"] = resend_queued_jobs(settings, only_unsent=True)
    except Exception as e:
        log.warning("recovery sweep skipped: %s: %s", e.__class__.__name__, e)
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
    try:
        ids = resend_queued_jobs()
        if ids:
            log.info("re-sent queued training jobs %s", ids)
    except Exception:
        log.exception("could not re-send queued jobs")
    start_recovery_thread()
