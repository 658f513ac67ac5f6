"""Per-stage progress of a training job.

Revision ID: 0006_job_stages
Revises: 0005_project_ls_instance
Create Date: 2026-11-30

Adds ``trainingjob.stages_json`` (text, ``'[]'`` for rows made before): the job's stages,
planned and run, with their epoch counts and times (``backend.jobprogress``). The status page
estimates the time left per stage from it: detector and classifier epochs differ ~10x in length,
so one rate over the combined ``epoch``/``epochs`` ran long.
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0006_job_stages"
down_revision: Union[str, Sequence[str], None] = "0005_project_ls_instance"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    have = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("trainingjob")}
    if "stages_json" not in have:  # a database made by create_all with this model
        with op.batch_alter_table("trainingjob") as b:
            b.add_column(sa.Column("stages_json", sa.Text(), nullable=False, server_default=sa.text("'[]'")))


def downgrade() -> None:
    with op.batch_alter_table("trainingjob") as b:
        b.drop_column("stages_json")
