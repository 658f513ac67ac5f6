"""Write-back outbox: what the queue station writes to Label Studio reaches it, once.

Issue 9 §6: with Label Studio down during write-back, 198 scores were in our DB, 0 predictions
in Label Studio, and nothing retried. Now scoring stores its writes as :class:`OutboxWrite`
rows in the same transaction as the scores (:func:`enqueue_write_back`); :func:`deliver` sends
them, in ``id`` order per project, and marks each ``done`` only when Label Studio acknowledged
it (a 2xx). A write that fails for a transient reason (connection refused, timeout, 5xx, 401,
403, 408, 429) is tried again after a backoff of 5, 10, 20, 40, then 60 s
(:data:`BACKOFF_BASE_S`, :data:`BACKOFF_MAX_S`) by the recovery pass (``ml_worker.tasks.sweep``,
every ``RECOVERY_INTERVAL_S``, run by the backend and each worker), so predictions arrive
within about ``RECOVERY_INTERVAL_S + 60`` s of Label Studio's return. Later writes of a project
wait for earlier ones: the project's ``model_version`` is set only after its predictions exist
(Label Studio answers 400 to a version with no predictions, label-studio-protocol.md §2).

Idempotent: before importing predictions, the project's tasks are read back and tasks that
already hold a prediction of that ``model_version`` are skipped (a write whose acknowledgement
was lost, a redelivered scoring, two deliverers). Tasks that no longer exist are skipped too.
Two deliverers never send one row at once: a row is claimed with a conditional UPDATE that sets
a lease (:data:`LEASE_S`).
"""

from __future__ import annotations

import json
import logging
import time

from sqlalchemy import update
from sqlmodel import Session, select

from backend.db import session_scope
from backend.lsapi import PREDICTION_CHUNK, api_error_text
from backend.models import OutboxWrite, Project, ScoringRun, utcnow

log = logging.getLogger("faceloop.outbox")

#: First retry delay (s); doubled per failed attempt up to :data:`BACKOFF_MAX_S`.
BACKOFF_BASE_S = 5.0
BACKOFF_MAX_S = 60.0
#: Seconds a deliverer holds a claimed row (a deliverer that died frees it after this).
LEASE_S = 300.0
#: Delivered (``done``/``superseded``) rows are deleted this long after they were finished (s).
KEEP_DONE_S = 7 * 24 * 3600.0
#: HTTP statuses that are retried; any other 4xx marks the write ``failed`` (refused for good).
RETRY_STATUSES = {401, 403, 408, 409, 425, 429}


def backoff_s(attempts: int) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt (1-based): 5, 10, 20, 40, 60, 60..."""
    return min(BACKOFF_BASE_S * 2 ** max(attempts - 1, 0), BACKOFF_MAX_S)


def enqueue_write_back(s: Session, project_id: int, model_version: str, predictions: list[dict],
                       review_title: str, run_id: int | None = None, set_version: bool = True) -> list[int]:
    """Queue a scoring's writes: prediction chunks, then the project's model version, then the view.

    Pending writes of the project for another model version are marked ``superseded`` (Label
    Studio shows only the project's current version's predictions).

    Args:
        predictions: ``{"task", "model_version", "score", "result"}`` dicts (Label Studio format).
        set_version: queue the ``model_version`` write (False when no task will hold a prediction
            of that version: Label Studio would refuse it with 400).
    Returns: ids of the rows added (the caller's transaction commits them with the scores).
    """
    for old in s.exec(select(OutboxWrite).where(OutboxWrite.project_id == project_id, OutboxWrite.state == "pending",
                                                OutboxWrite.model_version != model_version)).all():
        old.state, old.done_at = "superseded", utcnow()
    rows = [OutboxWrite(project_id=project_id, scoring_run_id=run_id, kind="predictions", model_version=model_version,
                        payload_json=json.dumps(predictions[i: i + PREDICTION_CHUNK]))
            for i in range(0, len(predictions), PREDICTION_CHUNK)]
    if set_version:
        rows.append(OutboxWrite(project_id=project_id, scoring_run_id=run_id, kind="model_version",
                                model_version=model_version, payload_json="{}"))
    rows.append(OutboxWrite(project_id=project_id, scoring_run_id=run_id, kind="review_view",
                            model_version=model_version, payload_json=json.dumps({"title": review_title})))
    s.add_all(rows)
    s.flush()
    return [r.id for r in rows]


def is_permanent(e: Exception) -> bool:
    """True when Label Studio refused the write for good (a 4xx not in :data:`RETRY_STATUSES`)."""
    status = getattr(e, "status_code", None)
    if status is None:
        status = getattr(getattr(e, "response", None), "status_code", None)
    return isinstance(status, int) and 400 <= status < 500 and status not in RETRY_STATUSES


def _claim(url: str, row_id: int, now: float) -> bool:
    with session_scope(url) as s:
        res = s.exec(update(OutboxWrite).where(OutboxWrite.id == row_id, OutboxWrite.state == "pending",
                                               OutboxWrite.lease_until_ts <= now)
                     .values(lease_until_ts=now + LEASE_S, attempts=OutboxWrite.attempts + 1))
        return res.rowcount == 1


def _finish(url: str, row_id: int, state: str, acknowledged: int = 0, error: str = "") -> None:
    with session_scope(url) as s:
        row = s.get(OutboxWrite, row_id)
        if row is None:
            return
        row.lease_until_ts = 0.0
        row.last_error = error
        row.acknowledged += acknowledged
        if state == "pending":
            row.next_attempt_ts = time.time() + backoff_s(row.attempts)
        elif row.state == "pending":  # not superseded meanwhile
            row.state, row.done_at = state, utcnow()
        if row.scoring_run_id is None:
            return
        run = s.get(ScoringRun, row.scoring_run_id)
        if run is None:
            return
        run.written += acknowledged
        s.flush()
        states = [r.state for r in s.exec(select(OutboxWrite).where(OutboxWrite.scoring_run_id == run.id)).all()]
        if "pending" in states:
            run.write_state = "pending"
        else:
            run.write_state = "failed" if "failed" in states else "done"


def _deliver_project(settings, project_id: int, stats: dict) -> None:
    from backend.images import ls_client
    from backend.lsapi import refresh_review_view, set_project_model_version, snapshot, write_predictions

    url = settings.database_url
    with session_scope(url) as s:
        rows = [(r.id, r.kind, r.model_version, r.payload_json, r.next_attempt_ts, r.lease_until_ts)
                for r in s.exec(select(OutboxWrite).where(OutboxWrite.project_id == project_id,
                                                          OutboxWrite.state == "pending").order_by(OutboxWrite.id))]
        proj = s.get(Project, project_id)
        ls_url = proj.ls_url if proj is not None else ""
    client = None
    versions: dict[int, set] | None = None  # task id -> model versions it holds predictions of
    for row_id, kind, version, payload_json, next_ts, lease_ts in rows:
        now = time.time()
        if next_ts > now or lease_ts > now or not _claim(url, row_id, now):
            stats["waiting"] += 1
            return  # keep the order: later writes of this project wait for this one
        ack = 0
        try:
            client = client or ls_client(settings, ls_url or None)
            payload = json.loads(payload_json or "null")
            if kind == "predictions":
                if versions is None:
                    versions = {t.id: set(t.prediction_versions) for t in snapshot(client, project_id)}
                todo = [p for p in payload if p.get("task") in versions
                        and str(p.get("model_version")) not in versions[p["task"]]]
                stats["skipped"] += len(payload) - len(todo)
                if todo:
                    write_predictions(client, project_id, todo)
                for p in todo:
                    versions[p["task"]].add(str(p["model_version"]))
                ack = len(todo)
            elif kind == "model_version":
                set_project_model_version(client, project_id, version)
            elif kind == "review_view":
                refresh_review_view(client, project_id, payload["title"])
            else:
                raise ValueError(f"unknown outbox write kind {kind!r}")
        except Exception as e:  # noqa: BLE001 - every failure is recorded on the row
            text = api_error_text(e)
            if is_permanent(e) or isinstance(e, ValueError):
                log.error("project %s: Label Studio refused %s write %s for good: %s", project_id, kind, row_id, text)
                _finish(url, row_id, "failed", error=text)
                stats["failed"] += 1
                continue
            log.warning("project %s: %s write %s not delivered (%s); retried later", project_id, kind, row_id, text)
            _finish(url, row_id, "pending", error=text)
            stats["retry"] += 1
            return
        _finish(url, row_id, "done", acknowledged=ack)
        stats["done"] += 1
        stats["acknowledged"] += ack


def deliver(settings, project_id: int | None = None) -> dict:
    """Send the pending outbox writes whose backoff has passed (one project or all).

    Returns: counts ``{"done", "acknowledged" (predictions Label Studio took), "skipped" (already
    there or task gone), "retry", "failed", "waiting" (backoff or another deliverer)}``. Never
    raises for Label Studio errors (they are stored on the rows); raises database errors.
    """
    stats = dict.fromkeys(("done", "acknowledged", "skipped", "retry", "failed", "waiting"), 0)
    with session_scope(settings.database_url) as s:
        q = select(OutboxWrite.project_id).where(OutboxWrite.state == "pending")
        if project_id is not None:
            q = q.where(OutboxWrite.project_id == project_id)
        pids = sorted(set(s.exec(q).all()))
    for pid in pids:
        _deliver_project(settings, pid, stats)
    prune(settings)
    return stats


def prune(settings, keep_s: float = KEEP_DONE_S) -> int:
    """Delete ``done`` and ``superseded`` rows finished more than ``keep_s`` seconds ago (their
    prediction payloads are large); ``pending`` and ``failed`` rows stay. Returns how many."""
    from datetime import datetime, timedelta, timezone

    from sqlalchemy import delete

    cutoff = datetime.now(timezone.utc) - timedelta(seconds=keep_s)
    with session_scope(settings.database_url) as s:
        res = s.exec(delete(OutboxWrite).where(OutboxWrite.state.in_(("done", "superseded")),
                                               OutboxWrite.done_at < cutoff))
        return res.rowcount or 0


def pending_writes(settings, project_id: int) -> list[OutboxWrite]:
    """The project's pending outbox rows (detached), oldest first: what has not reached Label Studio."""
    with session_scope(settings.database_url) as s:
        rows = s.exec(select(OutboxWrite).where(OutboxWrite.project_id == project_id,
                                                OutboxWrite.state == "pending").order_by(OutboxWrite.id)).all()
        for r in rows:
            s.expunge(r)
        return rows
