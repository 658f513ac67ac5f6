"""The record station: what the backend does with each Label Studio webhook.

Every event is stored in the database first, trimmed to the fields the product uses
(:func:`backend.registry.trim_payload`) (nothing is lost even if Redis is down), then:

- ``START_TRAINING`` (the *Start Training* button): queue a retrain now (coalesced: see
  :func:`backend.registry.request_training`). See :func:`handle_event` for the one sent by Label
  Studio itself after an annotation is saved.
- ``ANNOTATION_CREATED`` / ``ANNOTATION_UPDATED`` / ``ANNOTATIONS_CREATED``: Label Studio's project
  switch "Start model training on annotation submission" decides. It is stored as the project's
  ``min_annotations_to_start_training`` (0 = off; the switch stores 1 when turned on, the API
  accepts any N). Off: annotations never queue a retrain. On: a retrain is queued once
  :func:`backend.registry.annotations_since_last_training` (tasks newly labelled since the last
  training: no edits, no skips) reaches the threshold: the project's value when it is above 1,
  else ``RETRAIN_MIN_ANNOTATIONS``.
- ``ANNOTATIONS_DELETED``: recorded; training always snapshots Label Studio's current
  annotations, so deleted ones are left out of the next run.
- ``PROJECT_UPDATED``: refresh the stored label config and training threshold.
- ``TASKS_CREATED``: queue a bulk pre-annotation of the new tasks on the worker.
- anything else: recorded and ignored (200).
"""

from __future__ import annotations

import logging

from backend import registry
from backend.config import Settings
from backend.db import session_scope

log = logging.getLogger("faceloop.events")


def enqueue(settings: Settings, name: str, args: list) -> str | None:
    """Send a Celery task by name; returns its id, or None (logged) when the broker is down.

    A job that could not be sent stays ``queued`` in the database; the worker re-sends such jobs
    when it starts and every ``RECOVERY_INTERVAL_S`` (``ml_worker.tasks.sweep``, also run by the backend).
    """
    try:
        from ml_worker.celery_app import make_celery

        app = make_celery(settings)
        # Fail fast when the broker is down: send_task alone first retries the Redis result
        # backend for ~20 s (its reconnect policy), inside a webhook whose budget is 1 s.
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=0, timeout=1)
        res = app.send_task(name, args=args, queue=_queue_for(name), ignore_result=True)  # state is in our DB
        return res.id
    except Exception as e:  # broker unreachable: keep the request alive, the DB row remembers
        log.error("could not enqueue %s%s: %s", name, args, e)
        return None


def _queue_for(name: str) -> str:
    return "train" if name == "faceloop.train" else "score"


def queue_training(settings: Settings, project_id: int, trigger: str) -> dict:
    """Create or join the project's queued training job and send it to the worker."""
    with session_scope(settings.database_url) as s:
        job, created = registry.request_training(s, project_id, trigger)
        job_id = job.id
        never_sent = not job.celery_id
    # A joined job that was never sent (the broker was down) is sent again now: otherwise, with a
    # worker that stays up, it would wait for a worker restart. A duplicate message is harmless
    # (the worker claims a job once).
    celery_id = enqueue(settings, "faceloop.train", [job_id]) if created or never_sent else None
    if celery_id:
        with session_scope(settings.database_url) as s:
            from backend.models import TrainingJob

            j = s.get(TrainingJob, job_id)
            if j is not None and not j.celery_id:
                j.celery_id = celery_id
    return {"job": str(job_id), "queued": created, "joined_existing": not created}


#: Seconds within which an annotation webhook following a START_TRAINING marks it as the one
#: Label Studio sends by itself on saving an annotation (see :func:`handle_event`).
AUTO_START_WINDOW_S = 8.0


def retrain_threshold(settings: Settings, min_annotations: int) -> int | None:
    """Newly labelled tasks that trigger a retrain; None when the project's switch is off (0).

    Label Studio's switch stores 1 when turned on: the threshold is then RETRAIN_MIN_ANNOTATIONS;
    a value above 1 (set through the API) is the project's own threshold."""
    m = int(min_annotations or 0)
    if m <= 0:
        return None
    return m if m > 1 else max(1, settings.retrain_min_annotations)


def _decide_start_training(settings: Settings, pid: int, event_id: int) -> dict | None:
    """A START_TRAINING received while the project's switch is on: when an annotation webhook of
    the project arrived after it, Label Studio sent it by itself on saving that annotation, and the
    threshold rule has already decided; otherwise it was the button: queue now."""
    from sqlmodel import select

    from backend.models import WebhookEvent

    with session_scope(settings.database_url) as s:
        later = s.exec(select(WebhookEvent.id).where(WebhookEvent.project_id == pid, WebhookEvent.id > event_id,
                                                     WebhookEvent.action.in_(registry.ANNOTATION_ACTIONS))).first()
    if later is not None:
        log.info("START_TRAINING of project %s came with an annotation save: threshold rule applies", pid)
        return None
    return queue_training(settings, pid, "start_training")


def handle_event(settings: Settings, action: str, payload: dict) -> dict:
    """Record one webhook and act on it (see module docstring). Returns the JSON answer.

    START_TRAINING while the project's "train on annotation submission" switch is on: Label
    Studio itself sends START_TRAINING on every annotation save then (``tasks/models.py::
    update_ml_backend``: every N-th annotation, N = the stored value, 1 for the switch), inside the
    save request and just before that annotation's webhook; the payloads are identical to the
    button's. So the decision waits :data:`AUTO_START_WINDOW_S` (in a thread; the answer goes out
    at once): an annotation webhook in between means it was the automatic one, and the threshold
    rule decides instead; none means the button, and a retrain is queued.
    """
    project = payload.get("project") if isinstance(payload.get("project"), dict) else {}
    pid = registry.valid_id(project.get("id"))  # None for bools, negative or > 2^63-1 ids
    with session_scope(settings.database_url) as s:
        ev = registry.record_event(s, action, payload)
        event_id = ev.id
        if isinstance(pid, int):
            registry.upsert_project(
                s, pid, label_config=project.get("label_config"), title=project.get("title"),
                min_annotations=project.get("min_annotations_to_start_training"),
            )
    if not isinstance(pid, int):
        return {"status": "ignored", "reason": "no project id in payload"}
    if action in registry.ANNOTATION_ACTIONS or action == "ANNOTATIONS_DELETED":
        from backend.acceptance import request_recount

        request_recount(settings, pid)  # pre-label acceptance counts; never blocks the webhook
    if action == "START_TRAINING":
        if retrain_threshold(settings, project.get("min_annotations_to_start_training") or 0) is not None:
            import threading

            t = threading.Timer(AUTO_START_WINDOW_S, _decide_start_training, (settings, pid, event_id))
            t.daemon = True
            t.start()
            return {"status": "ok", "decision_in_s": AUTO_START_WINDOW_S}
        return {"status": "ok", **queue_training(settings, pid, "start_training")}
    if action in registry.ANNOTATION_ACTIONS:
        with session_scope(settings.database_url) as s:
            from backend.models import Project

            need = retrain_threshold(settings, s.get(Project, pid).min_annotations_to_start_training)
            if need is None:
                return {"status": "recorded", "auto_retrain": "off (project switch)"}
            n = registry.annotations_since_last_training(s, pid)
        if n >= need:
            return {"status": "ok", "new_tasks": n, **queue_training(settings, pid, "annotations")}
        return {"status": "recorded", "new_tasks": n, "retrain_at": need}
    if action == "TASKS_CREATED":
        tasks = payload.get("tasks") or []
        ids = [t["id"] if isinstance(t, dict) else t for t in tasks]
        ids = [i for i in ids if registry.valid_id(i) is not None]
        if ids:
            enqueue(settings, "faceloop.preannotate", [pid, ids])
        return {"status": "ok", "tasks": len(ids)}
    if action in ("ANNOTATIONS_DELETED", "PROJECT_UPDATED"):
        return {"status": "recorded"}
    return {"status": "ignored", "action": action}
