"""Baseline: the schema ``SQLModel.metadata.create_all`` made before migrations existed.

Revision ID: 0001_baseline
Revises:
Create Date: 2026-11-30

Tables of ``backend.models`` and ``backend.acceptance.PrelabelAcceptance``, with the partial
unique index ``one_queued_job_per_project`` (at most one queued training job per project).

A database made by ``create_all`` before this revision has no ``alembic_version`` table; upgrading
it runs this revision, which creates only the tables it lacks (``prelabelacceptance`` was made on
first use, so older databases may miss it) and then records the revision: nothing is lost.
``project.promoted_version_id`` and ``modelversion.project_id`` reference each other, so the
project's foreign key is added once both tables exist (PostgreSQL checks the referenced table).
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0001_baseline"
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

QUEUED = sa.text("state = 'queued'")


def _tz():
    return sa.DateTime(timezone=True)  # sqlmodel's UTCDateTime stores through DateTime(timezone=True)


def upgrade() -> None:
    existing = set(sa.inspect(op.get_bind()).get_table_names())

    if "project" not in existing:
        op.create_table(
            "project",
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("title", sa.String(), nullable=False),
            sa.Column("label_config", sa.Text(), nullable=True),
            sa.Column("labels_json", sa.String(), nullable=False),
            sa.Column("ls_url", sa.String(), nullable=False),
            sa.Column("promoted_version_id", sa.Integer(), nullable=True),
            sa.Column("min_annotations_to_start_training", sa.Integer(), nullable=False),
            sa.Column("updated_at", _tz(), nullable=False),
            sa.PrimaryKeyConstraint("id"),
        )

    if "modelversion" not in existing:
        op.create_table(
            "modelversion",
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("project_id", sa.Integer(), nullable=False),
            sa.Column("version", sa.String(), nullable=False),
            sa.Column("path", sa.String(), nullable=False),
            sa.Column("sha256", sa.String(), nullable=False),
            sa.Column("classes_json", sa.String(), nullable=False),
            sa.Column("parent_id", sa.Integer(), nullable=True),
            sa.Column("metrics_json", sa.Text(), nullable=True),
            sa.Column("status", sa.String(), nullable=False),
            sa.Column("gate_reason", sa.String(), nullable=False),
            sa.Column("training_job_id", sa.Integer(), nullable=True),
            sa.Column("created_at", _tz(), nullable=False),
            sa.Column("promoted_at", _tz(), nullable=True),
            sa.ForeignKeyConstraint(["parent_id"], ["modelversion.id"]),
            sa.ForeignKeyConstraint(["project_id"], ["project.id"]),
            sa.PrimaryKeyConstraint("id"),
            sa.UniqueConstraint("project_id", "version"),
        )
        with op.batch_alter_table("modelversion") as b:
            b.create_index("ix_modelversion_project_id", ["project_id"], unique=False)

    if "project" not in existing:
        with op.batch_alter_table("project") as b:
            b.create_foreign_key("project_promoted_version_id_fkey", "modelversion", ["promoted_version_id"], ["id"])

    if "trainingjob" not in existing:
        op.create_table(
            "trainingjob",
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("project_id", sa.Integer(), nullable=False),
            sa.Column("trigger", sa.String(), nullable=False),
            sa.Column("state", sa.String(), nullable=False),
            sa.Column("epoch", sa.Integer(), nullable=False),
            sa.Column("epochs", sa.Integer(), nullable=False),
            sa.Column("stage", sa.String(), nullable=False),
            sa.Column("message", sa.Text(), nullable=True),
            sa.Column("error", sa.Text(), nullable=True),
            sa.Column("n_train", sa.Integer(), nullable=False),
            sa.Column("n_val", sa.Integer(), nullable=False),
            sa.Column("version_id", sa.Integer(), nullable=True),
            sa.Column("celery_id", sa.String(), nullable=False),
            sa.Column("created_at", _tz(), nullable=False),
            sa.Column("started_at", _tz(), nullable=True),
            sa.Column("finished_at", _tz(), nullable=True),
            sa.ForeignKeyConstraint(["project_id"], ["project.id"]),
            sa.PrimaryKeyConstraint("id"),
        )
        with op.batch_alter_table("trainingjob") as b:
            b.create_index("ix_trainingjob_project_id", ["project_id"], unique=False)
            b.create_index("one_queued_job_per_project", ["project_id"], unique=True,
                           sqlite_where=QUEUED, postgresql_where=QUEUED)

    if "taskscore" not in existing:
        op.create_table(
            "taskscore",
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("project_id", sa.Integer(), nullable=False),
            sa.Column("task_id", sa.Integer(), nullable=False),
            sa.Column("model_version", sa.String(), nullable=False),
            sa.Column("uncertainty", sa.Float(), nullable=False),
            sa.Column("least_confidence", sa.Float(), nullable=False),
            sa.Column("margin", sa.Float(), nullable=False),
            sa.Column("entropy", sa.Float(), nullable=False),
            sa.Column("n_boxes", sa.Integer(), nullable=False),
            sa.Column("rank", sa.Integer(), nullable=False),
            sa.Column("in_query_batch", sa.Boolean(), nullable=False),
            sa.Column("error", sa.String(), nullable=False),
            sa.Column("scored_at", _tz(), nullable=False),
            sa.PrimaryKeyConstraint("id"),
            sa.UniqueConstraint("project_id", "task_id", "model_version"),
        )
        with op.batch_alter_table("taskscore") as b:
            b.create_index("ix_taskscore_project_id", ["project_id"], unique=False)
            b.create_index("ix_taskscore_task_id", ["task_id"], unique=False)

    if "webhookevent" not in existing:
        op.create_table(
            "webhookevent",
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("project_id", sa.Integer(), nullable=True),
            sa.Column("action", sa.String(), nullable=False),
            sa.Column("annotation_id", sa.Integer(), nullable=True),
            sa.Column("task_id", sa.Integer(), nullable=True),
            sa.Column("payload_json", sa.Text(), nullable=True),
            sa.Column("received_at", _tz(), nullable=False),
            sa.PrimaryKeyConstraint("id"),
        )
        with op.batch_alter_table("webhookevent") as b:
            b.create_index("ix_webhookevent_project_id", ["project_id"], unique=False)

    if "scoringrun" not in existing:
        op.create_table(
            "scoringrun",
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("project_id", sa.Integer(), nullable=False),
            sa.Column("trigger", sa.String(), nullable=False),
            sa.Column("training_job_id", sa.Integer(), nullable=True),
            sa.Column("model_version", sa.String(), nullable=False),
            sa.Column("state", sa.String(), nullable=False),
            sa.Column("stage", sa.String(), nullable=False),
            sa.Column("scored", sa.Integer(), nullable=False),
            sa.Column("failed", sa.Integer(), nullable=False),
            sa.Column("written", sa.Integer(), nullable=False),
            sa.Column("write_state", sa.String(), nullable=False),
            sa.Column("error", sa.Text(), nullable=True),
            sa.Column("celery_id", sa.String(), nullable=False),
            sa.Column("created_at", _tz(), nullable=False),
            sa.Column("started_at", _tz(), nullable=True),
            sa.Column("finished_at", _tz(), nullable=True),
            sa.PrimaryKeyConstraint("id"),
        )
        with op.batch_alter_table("scoringrun") as b:
            b.create_index("ix_scoringrun_project_id", ["project_id"], unique=False)

    if "outboxwrite" not in existing:
        op.create_table(
            "outboxwrite",
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("project_id", sa.Integer(), nullable=False),
            sa.Column("scoring_run_id", sa.Integer(), nullable=True),
            sa.Column("kind", sa.String(), nullable=False),
            sa.Column("model_version", sa.String(), nullable=False),
            sa.Column("payload_json", sa.Text(), nullable=True),
            sa.Column("state", sa.String(), nullable=False),
            sa.Column("attempts", sa.Integer(), nullable=False),
            sa.Column("next_attempt_ts", sa.Float(), nullable=False),
            sa.Column("lease_until_ts", sa.Float(), nullable=False),
            sa.Column("last_error", sa.Text(), nullable=True),
            sa.Column("acknowledged", sa.Integer(), nullable=False),
            sa.Column("created_at", _tz(), nullable=False),
            sa.Column("done_at", _tz(), nullable=True),
            sa.PrimaryKeyConstraint("id"),
        )
        with op.batch_alter_table("outboxwrite") as b:
            b.create_index("ix_outboxwrite_project_id", ["project_id"], unique=False)
            b.create_index("ix_outboxwrite_scoring_run_id", ["scoring_run_id"], unique=False)
            b.create_index("ix_outboxwrite_state", ["state"], unique=False)

    if "prelabelacceptance" not in existing:
        op.create_table(
            "prelabelacceptance",
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("project_id", sa.Integer(), nullable=False),
            sa.Column("model_version", sa.String(), nullable=False),
            sa.Column("annotations", sa.Integer(), nullable=False),
            sa.Column("predicted", sa.Integer(), nullable=False),
            sa.Column("accepted", sa.Integer(), nullable=False),
            sa.Column("relabelled", sa.Integer(), nullable=False),
            sa.Column("moved", sa.Integer(), nullable=False),
            sa.Column("moved_relabelled", sa.Integer(), nullable=False),
            sa.Column("deleted", sa.Integer(), nullable=False),
            sa.Column("drawn", sa.Integer(), nullable=False),
            sa.Column("updated_at", _tz(), nullable=False),
            sa.PrimaryKeyConstraint("id"),
            sa.UniqueConstraint("project_id", "model_version"),
        )
        with op.batch_alter_table("prelabelacceptance") as b:
            b.create_index("ix_prelabelacceptance_project_id", ["project_id"], unique=False)


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":  # SQLite does not check references when dropping
        op.drop_constraint("project_promoted_version_id_fkey", "project", type_="foreignkey")
    for table in ("prelabelacceptance", "outboxwrite", "scoringrun", "webhookevent", "taskscore", "trainingjob",
                  "modelversion", "project"):
        op.drop_table(table)
