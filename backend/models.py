"""SQLModel tables: the state faceloop owns (Label Studio owns tasks, annotations, predictions)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, Optional

from sqlalchemy import Column, Index, LargeBinary, Text, UniqueConstraint, text
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    """Timezone-aware UTC now."""
    return datetime.now(timezone.utc)


class Project(SQLModel, table=True):
    """A Label Studio project that faceloop serves (primary key = Label Studio's project id)."""

    id: int = Field(primary_key=True)
    title: str = ""
    label_config: str = Field(default="", sa_column=Column(Text))
    labels_json: str = "[]"
    ls_url: str = ""
    #: Identity of the Label Studio instance the project belongs to (LABEL_STUDIO_INSTANCE of the
    #: backend that set it up: ``faceloop up`` gives each stack one, kept across restarts and port
    #: changes); "" = not known yet (claimed by the first one). See registry.upsert_project.
    ls_instance: str = Field(default="", sa_column_kwargs={"server_default": text("''")})
    promoted_version_id: Optional[int] = Field(default=None, foreign_key="modelversion.id")
    min_annotations_to_start_training: int = 0
    updated_at: datetime = Field(default_factory=utcnow)

    @property
    def labels(self) -> list[str]:
        return json.loads(self.labels_json)


class ModelVersion(SQLModel, table=True):
    """A registered model version of a project.

    ``status``: ``candidate`` (registered, not evaluated), ``promoted`` (served), ``rejected``
    (lost the gate), ``retired`` (was promoted, replaced). ``metrics_json`` holds mAP50,
    mAP50-95, precision/recall per class (0-1) on the project's validation split, and the
    current version's figures on the same split.
    """

    __table_args__ = (UniqueConstraint("project_id", "version"),)
    id: Optional[int] = Field(default=None, primary_key=True)
    project_id: int = Field(index=True, foreign_key="project.id")
    version: str
    path: str
    sha256: str
    classes_json: str = "[]"
    parent_id: Optional[int] = Field(default=None, foreign_key="modelversion.id")
    metrics_json: str = Field(default="{}", sa_column=Column(Text))
    status: str = "candidate"
    gate_reason: str = ""
    training_job_id: Optional[int] = None
    created_at: datetime = Field(default_factory=utcnow)
    promoted_at: Optional[datetime] = None

    @property
    def classes(self) -> list[str]:
        return json.loads(self.classes_json)

    @property
    def metrics(self) -> dict[str, Any]:
        return json.loads(self.metrics_json or "{}")


class TrainingJob(SQLModel, table=True):
    """One retrain of a project. ``state``: queued -> running -> succeeded | failed | skipped
    (``skipped``: queued during a run, and no label changed since that run's snapshot).

    ``epoch``/``epochs``: epochs done of all training stages together (detector and classifier);
    the per-stage counts and times are in ``stages_json``.

    At most one ``queued`` job per project (partial unique index): a request while one is queued
    joins it; a request while one runs queues exactly one more (``skipped`` at its snapshot when
    the labels are those of the run it was asked for during).
    """

    __table_args__ = (
        Index(
            "one_queued_job_per_project", "project_id", unique=True,
            sqlite_where=text("state = 'queued'"), postgresql_where=text("state = 'queued'"),
        ),
    )
    id: Optional[int] = Field(default=None, primary_key=True)
    project_id: int = Field(index=True, foreign_key="project.id")
    trigger: str = "start_training"
    state: str = "queued"
    epoch: int = 0
    epochs: int = 0
    stage: str = ""
    message: str = Field(default="", sa_column=Column(Text))
    error: str = Field(default="", sa_column=Column(Text))
    n_train: int = 0
    n_val: int = 0
    version_id: Optional[int] = None
    celery_id: str = ""
    created_at: datetime = Field(default_factory=utcnow)
    started_at: Optional[datetime] = None
    finished_at: Optional[datetime] = None
    #: The job's stages, planned and run, as JSON (:mod:`backend.jobprogress`): a list of
    #: ``{"stage", "epochs", "epoch", "start", "first", "last", "end", "if"}`` (times ISO 8601 UTC),
    #: from which the status page estimates the time left per stage.
    stages_json: str = Field(default="[]", sa_column=Column(Text, nullable=False, server_default=text("'[]'")))
    #: Who claimed the job (:func:`ml_worker.tasks.worker_identity`): ``host=<hostname> pid=<pid>
    #: stack=<LABEL_STUDIO_INSTANCE or ->``; empty for a job not claimed yet (or claimed before this
    #: was recorded). A worker starting on the same host for the same stack fails the ``running``
    #: jobs of a process that is gone at once (:func:`ml_worker.tasks.recover_own_jobs`).
    worker: str = Field(default="", sa_column=Column(Text, nullable=False, server_default=text("''")))
    #: SHA-256 of the labels the job trained on (:func:`ml_worker.tasks.labels_fingerprint`): the
    #: label config and every labelled task's id and latest non-cancelled result; empty before the
    #: snapshot. A job queued during a run is skipped when it is the same (:func:`ml_worker.tasks.take_snapshot`).
    labels_sha: str = Field(default="", sa_column=Column(Text, nullable=False, server_default=text("''")))

    @property
    def stages(self) -> list[dict[str, Any]]:
        try:
            out = json.loads(self.stages_json or "[]")
        except ValueError:
            return []
        return out if isinstance(out, list) else []


class ModelArtifact(SQLModel, table=True):
    """One file of a model version (weights, bundle JSON, plots, exports), stored in the database
    so that every process (backend, workers on other machines) can read it (``modelstore``).

    ``name`` is the file's path inside the version folder (POSIX, relative, e.g. ``detector.pt``);
    ``sha256`` the hex SHA-256 of ``data``; ``size`` its length in bytes. ``data`` is a BLOB on
    SQLite and ``bytea`` on PostgreSQL (1 GB at most per value; a version is a few MB).
    Rows are written once, with the version's :class:`ModelVersion` row, and never changed.
    """

    __table_args__ = (UniqueConstraint("project_id", "version", "name"),)
    id: Optional[int] = Field(default=None, primary_key=True)
    project_id: int  # lookups use the unique (project_id, version, name) index
    version: str
    name: str
    sha256: str
    size: int
    data: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)


class TaskScore(SQLModel, table=True):
    """Uncertainty of one unlabelled task under one model version (all measures 0-1).

    ``uncertainty`` is the configured measure aggregated over the image's boxes; the prediction
    written to Label Studio carries ``score = 1 - uncertainty``. ``rank`` is the position in the
    review queue (0 = most informative) and ``in_query_batch`` marks the diversity-aware batch.
    """

    __table_args__ = (UniqueConstraint("project_id", "task_id", "model_version"),)
    id: Optional[int] = Field(default=None, primary_key=True)
    project_id: int = Field(index=True)
    task_id: int = Field(index=True)
    model_version: str
    uncertainty: float
    least_confidence: float
    margin: float
    entropy: float
    n_boxes: int = 0
    rank: int = 0
    in_query_batch: bool = False
    error: str = ""
    scored_at: datetime = Field(default_factory=utcnow)


class WebhookEvent(SQLModel, table=True):
    """A webhook received from Label Studio; ``payload_json`` holds the fields the product uses (``backend.registry.trim_payload``)."""

    id: Optional[int] = Field(default=None, primary_key=True)
    project_id: Optional[int] = Field(default=None, index=True)
    action: str
    annotation_id: Optional[int] = None
    task_id: Optional[int] = None
    payload_json: str = Field(default="{}", sa_column=Column(Text))
    received_at: datetime = Field(default_factory=utcnow)


class ScoringRun(SQLModel, table=True):
    """One scoring of a project's unlabelled pool (its own step, apart from training; issue 9 §6).

    ``state``: queued -> running -> succeeded | failed (scores in our DB). ``trigger``:
    ``promotion`` (queued by training job ``training_job_id`` after it promoted a version),
    ``manual`` (``faceloop score``) or ``new_tasks``. ``write_state`` follows the write-back of its
    predictions, model version and review view to Label Studio through the outbox
    (:class:`OutboxWrite`): ``pending`` -> ``done`` | ``failed``; ``written`` counts the
    predictions Label Studio acknowledged.
    """

    id: Optional[int] = Field(default=None, primary_key=True)
    project_id: int = Field(index=True)
    trigger: str = "manual"
    training_job_id: Optional[int] = None
    model_version: str = ""
    state: str = "queued"
    stage: str = ""
    scored: int = 0
    failed: int = 0
    written: int = 0
    write_state: str = ""
    error: str = Field(default="", sa_column=Column(Text))
    celery_id: str = ""
    created_at: datetime = Field(default_factory=utcnow)
    started_at: Optional[datetime] = None
    finished_at: Optional[datetime] = None


class OutboxWrite(SQLModel, table=True):
    """One write to Label Studio that must reach it (transactional outbox; issue 9 §6).

    ``kind``: ``predictions`` (``payload_json`` = a list of at most 200
    ``{"task", "model_version", "score", "result"}``), ``model_version`` (point the project at
    ``model_version``) or ``review_view`` (``payload_json`` = ``{"title": ...}``). Delivered in
    ``id`` order per project by :func:`ml_worker.outbox.deliver`; ``state``: ``pending`` ->
    ``done`` | ``failed`` (Label Studio refused it for good: a 4xx other than 401/403/408/429) |
    ``superseded`` (a newer version's write-back replaced it). Times are Unix seconds:
    ``next_attempt_ts`` (backoff) and ``lease_until_ts`` (a deliverer holds the row until then).
    """

    id: Optional[int] = Field(default=None, primary_key=True)
    project_id: int = Field(index=True)
    scoring_run_id: Optional[int] = Field(default=None, index=True)
    kind: str
    model_version: str = ""
    payload_json: str = Field(default="[]", sa_column=Column(Text))
    state: str = Field(default="pending", index=True)
    attempts: int = 0
    next_attempt_ts: float = 0.0
    lease_until_ts: float = 0.0
    last_error: str = Field(default="", sa_column=Column(Text))
    acknowledged: int = 0
    created_at: datetime = Field(default_factory=utcnow)
    done_at: Optional[datetime] = None
