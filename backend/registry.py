"""Model versions, training jobs and events: plain functions over the SQLModel database.

Version names: ``base-<sha8>`` for the shipped default model (every project's first version),
``p<project>-v<n>`` for versions trained for a project. The same string is returned by
``/setup`` and written into every prediction (label-studio-protocol.md §2).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from backend.config import Settings
from backend.models import ModelVersion, Project, TrainingJob, WebhookEvent, utcnow
from facemodels.detector_meta import read_class_names
from backend.hashing import file_sha256


class ProjectOfAnotherLabelStudio(ValueError):
    """A project id whose row in faceloop's database belongs to another Label Studio instance."""


def check_instance(p: Project | None, ls_instance: str | None) -> None:
    """Raise :class:`ProjectOfAnotherLabelStudio` when row ``p`` belongs to a Label Studio
    instance other than ``ls_instance`` (both known, i.e. non-empty); else nothing."""
    if p is not None and ls_instance and p.ls_instance and p.ls_instance != ls_instance:
        raise ProjectOfAnotherLabelStudio(
            f"project {p.id} in this faceloop database belongs to another Label Studio: two Label Studios "
            f"must not share one database (project ids are theirs). Give each stack its own VAR_DIR "
            f"(faceloop up --root DIR keeps it in DIR/var) or DATABASE_URL")


def upsert_project(s: Session, project_id: int, label_config: str | None = None, title: str | None = None,
                   ls_url: str | None = None, min_annotations: int | None = None,
                   ls_instance: str | None = None) -> Project:
    """Create or update the row of a Label Studio project; label config is parsed by the caller.

    ``ls_instance``: identity of the Label Studio asking (``Settings.label_studio_instance``);
    recorded on a row that has none, and checked against one it has.
    Raises: ProjectOfAnotherLabelStudio (nothing written) when the row belongs to another instance.
    """
    p = s.get(Project, project_id)
    check_instance(p, ls_instance)
    changed = p is None
    if p is None:  # first requests of a project may come at once (webhooks, /predict): made once, none fails
        from backend.db import insert_missing

        insert_missing(s, Project(id=project_id, ls_instance=ls_instance or ""))
        p = s.get(Project, project_id)
        check_instance(p, ls_instance)  # another instance's request inserted it first
    if ls_instance and not p.ls_instance:
        p.ls_instance, changed = ls_instance, True
    if label_config is not None and label_config != p.label_config:
        from backend.labels import ProjectSchema

        p.label_config = label_config
        try:
            p.labels_json = json.dumps(ProjectSchema.parse(label_config).labels)
        except ValueError:
            p.labels_json = "[]"
        changed = True
    if title is not None and title != p.title:
        p.title, changed = title, True
    if ls_url and ls_url != p.ls_url:
        p.ls_url, changed = ls_url, True
    if min_annotations is not None and int(min_annotations or 0) != p.min_annotations_to_start_training:
        p.min_annotations_to_start_training, changed = int(min_annotations or 0), True
    if changed:  # /predict calls this on every request: no write when nothing changed
        p.updated_at = utcnow()
        s.flush()
    return p


#: The shipped default model's version name in a project: this prefix and its weights' sha256[:8].
BASE_VERSION_PREFIX = "base-"


def is_shipped_default(version: str) -> bool:
    """Whether ``version`` names the shipped default model (:func:`promoted_version` registers it)."""
    return version.startswith(BASE_VERSION_PREFIX)


def promoted_version(s: Session, project_id: int, settings: Settings) -> ModelVersion:
    """The version a project serves now; registers the shipped default model on first use.

    Raises: FileNotFoundError when the project has no version and the default model is missing.
    """
    p = s.get(Project, project_id) or upsert_project(s, project_id)
    if p.promoted_version_id:
        v = s.get(ModelVersion, p.promoted_version_id)
        if v is not None:
            return v
    path = Path(settings.default_model_path)
    if not path.exists():
        raise FileNotFoundError(f"default model {path} is missing (run `faceloop train-base`)")
    sha = file_sha256(path)
    name = f"{BASE_VERSION_PREFIX}{sha[:8]}"
    v = s.exec(select(ModelVersion).where(ModelVersion.project_id == project_id, ModelVersion.version == name)).first()
    if v is None:
        v = ModelVersion(project_id=project_id, version=name, path=str(path.resolve()), sha256=sha,
                         classes_json=json.dumps(read_class_names(path)), status="promoted",
                         gate_reason="shipped default model", promoted_at=utcnow())
        s.add(v)
        s.flush()
    p.promoted_version_id = v.id
    s.flush()
    return v


def next_version_name(s: Session, project_id: int) -> str:
    """``p<project>-v<n>`` with n one more than the project's trained versions so far."""
    n = len(s.exec(select(ModelVersion).where(ModelVersion.project_id == project_id,
                                             ModelVersion.version.startswith(f"p{project_id}-v"))).all())
    return f"p{project_id}-v{n + 1}"


def store_weights(src: Path, model_dir: Path, project_id: int, version: str) -> tuple[Path, str]:
    """Copy a single weights file into a local folder atomically (temp file + ``os.replace``).

    Trained versions are not stored this way any more: their files go to the database with the
    version row (:func:`modelstore.store_folder`) and every machine copies them from there.

    Returns: ``(path, sha256)``. A crash never leaves a half-written file under the final name.
    """
    dest_dir = Path(model_dir) / f"project_{project_id}"
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / f"{version}.pt"
    tmp = dest_dir / f".{version}.pt.tmp"
    shutil.copyfile(src, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dest)
    return dest, file_sha256(dest)


def promote(s: Session, version: ModelVersion, reason: str) -> None:
    """Make ``version`` the project's served version; the previous one becomes ``retired``."""
    p = s.get(Project, version.project_id)
    if p.promoted_version_id and p.promoted_version_id != version.id:
        old = s.get(ModelVersion, p.promoted_version_id)
        if old is not None:
            old.status = "retired"
    version.status = "promoted"
    version.gate_reason = reason
    version.promoted_at = utcnow()
    p.promoted_version_id = version.id
    s.flush()


def request_training(s: Session, project_id: int, trigger: str) -> tuple[TrainingJob, bool]:
    """Queue a retrain unless one is already queued for the project (coalescing).

    Returns: ``(job, created)``; ``created`` False means the request joined the queued job.
    A running job does not absorb requests: annotations made during a run get one more run (that
    run is skipped when no label changed since the running job's snapshot:
    ``ml_worker.tasks.take_snapshot``).
    """
    if s.get(Project, project_id) is None:
        upsert_project(s, project_id)
    existing = s.exec(select(TrainingJob).where(TrainingJob.project_id == project_id,
                                               TrainingJob.state == "queued")).first()
    if existing is not None:
        return existing, False
    job = TrainingJob(project_id=project_id, trigger=trigger, state="queued")
    s.add(job)
    try:
        s.flush()
    except IntegrityError:  # a concurrent request queued one first
        s.rollback()
        existing = s.exec(select(TrainingJob).where(TrainingJob.project_id == project_id,
                                                   TrainingJob.state == "queued")).first()
        return existing, False
    return job, True


#: Most ids kept from a list in a stored webhook (``tasks``, ``annotations``).
MAX_STORED_IDS = 10_000
_ANNOTATION_FIELDS = ("id", "task", "project", "was_cancelled", "ground_truth", "created_at", "updated_at",
                      "completed_by", "lead_time")
_PROJECT_FIELDS = ("id", "title", "min_annotations_to_start_training", "model_version", "updated_at")


def valid_id(v) -> int | None:
    """``v`` as a Label Studio id (int 1..2^63-1, not bool), else None."""
    return v if isinstance(v, int) and not isinstance(v, bool) and 1 <= v < 2**63 else None


def _scalar(v):
    """Keep short scalars only (ids, flags, timestamps); drop anything else."""
    if v is None or isinstance(v, (bool, float)) or (isinstance(v, int) and abs(v) < 2**63):
        return v
    if isinstance(v, str):
        return v[:100]
    if isinstance(v, dict) and valid_id(v.get("id")) is not None:  # e.g. completed_by as a user object
        return valid_id(v.get("id"))
    return None


def _pick(obj, fields) -> dict:
    return {k: _scalar(obj[k]) for k in fields if isinstance(obj, dict) and k in obj}


def trim_payload(action: str, payload: dict) -> dict:
    """The fields of a webhook the product uses, no more (issue 9: payloads were stored whole).

    Kept: ``action``; ``project`` {id, title, min_annotations_to_start_training, model_version,
    updated_at}; ``annotation`` {id, task, project, was_cancelled, ground_truth, created_at,
    updated_at, completed_by, lead_time}; ``task`` {id}; ``tasks`` as a list of ``{id}`` and
    ``annotations`` of ``{id, task, was_cancelled, created_at}`` (at most :data:`MAX_STORED_IDS`; the
    retrain trigger reads them). Strings are cut at 100 characters;
    label configs, results and task data are dropped (training reads them from Label Studio).
    """
    out: dict = {"action": str(action)[:100]}
    if isinstance(payload.get("project"), dict):
        out["project"] = _pick(payload["project"], _PROJECT_FIELDS)
    if isinstance(payload.get("annotation"), dict):
        out["annotation"] = _pick(payload["annotation"], _ANNOTATION_FIELDS)
    if isinstance(payload.get("task"), dict):
        out["task"] = _pick(payload["task"], ("id",))
    for key, fields in (("tasks", ("id",)), ("annotations", ("id", "task", "was_cancelled", "created_at"))):
        items = payload.get(key)
        if isinstance(items, list):
            out[key] = [(_pick(i, fields) if isinstance(i, dict) else _scalar(i)) for i in items[:MAX_STORED_IDS]]
    return out


def record_event(s: Session, action: str, payload: dict) -> WebhookEvent:
    """Store a webhook trimmed by :func:`trim_payload`, with the project, annotation and task ids
    it names (ids that are not ints 1..2^63-1, or are bools, are stored as None)."""
    proj = payload.get("project")
    pid = valid_id(proj.get("id")) if isinstance(proj, dict) else None
    ann = payload.get("annotation") if isinstance(payload.get("annotation"), dict) else {}
    task = payload.get("task") if isinstance(payload.get("task"), dict) else {}
    task_id = valid_id(task.get("id"))
    ev = WebhookEvent(project_id=pid, action=str(action)[:100], annotation_id=valid_id(ann.get("id")),
                      task_id=task_id if task_id is not None else valid_id(ann.get("task")),
                      payload_json=json.dumps(trim_payload(action, payload), default=str))
    s.add(ev)
    s.flush()
    return ev


ANNOTATION_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED")


def last_training_start(s: Session, project_id: int):
    """When the project's last training took its snapshot: the latest job's ``started_at`` (or,
    still queued, its ``created_at``: annotations made meanwhile are in that run). None: never."""
    last = s.exec(select(TrainingJob).where(TrainingJob.project_id == project_id)
                  .order_by(TrainingJob.created_at.desc())).first()
    if last is None:
        return None
    return _aware(last.started_at or last.created_at)


def _aware(t):
    from datetime import datetime, timezone

    if isinstance(t, str):
        try:
            t = datetime.fromisoformat(t.replace("Z", "+00:00"))
        except ValueError:
            return None
    if t is not None and t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t


def _event_annotations(ev: WebhookEvent) -> list[dict]:
    """The annotation dicts of an annotation webhook (``annotation``, or the ``annotations`` list of
    ANNOTATIONS_CREATED), each with its ``task`` id filled in from the event when missing."""
    try:
        payload = json.loads(ev.payload_json or "{}")
    except ValueError:
        return []
    anns = payload.get("annotations") if isinstance(payload.get("annotations"), list) else [payload.get("annotation")]
    out = []
    for a in anns:
        if isinstance(a, dict):
            task = a.get("task")
            task = task.get("id") if isinstance(task, dict) else task
            out.append({**a, "task": task if isinstance(task, int) else ev.task_id})
    return out


def annotations_since_last_training(s: Session, project_id: int) -> int:
    """Tasks newly labelled since the project's last training (the retrain trigger's count).

    A task counts once when an annotation webhook since the last training's snapshot
    (:func:`last_training_start`) carries a non-cancelled annotation of it (``was_cancelled``
    false: skips do not count) that was created after that moment, and no non-cancelled
    annotation of that task was received before it. So editing an annotation, or labelling a task
    that already was, adds nothing; several edits of one new task count once; a skipped task that
    is later labelled counts. Reads the stored payloads' ``annotation.{task, was_cancelled,
    created_at}`` (Label Studio's webhook payload, label-studio-protocol.md §1).
    """
    since = last_training_start(s, project_id)
    q = select(WebhookEvent).where(WebhookEvent.project_id == project_id, WebhookEvent.action.in_(ANNOTATION_ACTIONS))
    recent = s.exec(q.where(WebhookEvent.received_at > since) if since is not None else q).all()
    new_tasks: set[int] = set()
    for ev in recent:
        for a in _event_annotations(ev):
            created = _aware(a.get("created_at"))
            if a.get("was_cancelled") or not isinstance(a.get("task"), int):
                continue
            if since is not None and created is not None and created <= since:
                continue  # an edit of an annotation made before the last training
            new_tasks.add(a["task"])
    if since is not None and new_tasks:
        older = s.exec(q.where(WebhookEvent.received_at <= since, WebhookEvent.task_id.in_(new_tasks))).all()
        for ev in older:
            for a in _event_annotations(ev):
                if not a.get("was_cancelled"):
                    new_tasks.discard(a["task"])
    return len(new_tasks)
