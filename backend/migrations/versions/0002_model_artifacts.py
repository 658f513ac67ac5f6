"""Model artifacts: every file of a model version in the database (``modelstore``).

Revision ID: 0002_model_artifacts
Revises: 0001_baseline
Create Date: 2026-11-30

Table ``modelartifact`` (:class:`backend.models.ModelArtifact`): one row per file of a model
version (project, version, file name, SHA-256, size, bytes), so that workers on other machines
read versions from the database. ``data`` is ``bytea`` on PostgreSQL and a BLOB on SQLite.
Versions registered before this revision stay on the disk of the machine that trained them
(``modelstore.model_path`` falls back to ``modelversion.path``).
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0002_model_artifacts"
down_revision: Union[str, Sequence[str], None] = "0001_baseline"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    if "modelartifact" in sa.inspect(op.get_bind()).get_table_names():
        return  # a database made by create_all with this model (adopted at the baseline)
    op.create_table(
        "modelartifact",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("sha256", sa.String(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("project_id", "version", "name"),
    )


def downgrade() -> None:
    op.drop_table("modelartifact")
