"""Who claimed a training job, and a fingerprint of the labels it trained on.

Revision ID: 0007_job_worker_labels
Revises: 0006_job_stages
Create Date: 2026-11-30

Adds ``trainingjob.worker`` (text, ``''`` for rows made before): ``host=<hostname> pid=<pid>
stack=<instance>`` of the worker process that claimed the job, so a worker starting for the same
stack on the same host fails at once a ``running`` job whose process is gone (Ctrl-C of
``faceloop up`` during a training) instead of waiting for its heartbeat to time out; and
``trainingjob.labels_sha`` (text, ``''``): SHA-256 of the label config and of every labelled
task's latest result at the job's snapshot, so a job queued during a run on the same labels is
skipped (``ml_worker.tasks``).
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0007_job_worker_labels"
down_revision: Union[str, Sequence[str], None] = "0006_job_stages"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

COLUMNS = ("worker", "labels_sha")


def upgrade() -> None:
    have = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("trainingjob")}
    missing = [c for c in COLUMNS if c not in have]  # a database made by create_all with this model has them
    if missing:
        with op.batch_alter_table("trainingjob") as b:
            for c in missing:
                b.add_column(sa.Column(c, sa.Text(), nullable=False, server_default=sa.text("''")))


def downgrade() -> None:
    with op.batch_alter_table("trainingjob") as b:
        for c in COLUMNS:
            b.drop_column(c)
