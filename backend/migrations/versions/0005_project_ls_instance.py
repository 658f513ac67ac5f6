"""The Label Studio instance a project belongs to.

Revision ID: 0005_project_ls_instance
Revises: 0004_class_picked
Create Date: 2026-11-30

Adds ``project.ls_instance`` (string, "" for rows made before: the first Label Studio that sets
the project up afterwards claims it). Project ids are Label Studio's, so two Label Studio
instances writing into one database would otherwise share rows (``backend.registry.upsert_project``
refuses that now).
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0005_project_ls_instance"
down_revision: Union[str, Sequence[str], None] = "0004_class_picked"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    have = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("project")}
    if "ls_instance" not in have:  # a database made by create_all with this model
        with op.batch_alter_table("project") as b:
            b.add_column(sa.Column("ls_instance", sa.String(), nullable=False,
                                   server_default=sa.text("''")))


def downgrade() -> None:
    with op.batch_alter_table("project") as b:
        b.drop_column("ls_instance")
