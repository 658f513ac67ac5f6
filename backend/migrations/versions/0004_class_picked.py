"""Pre-label acceptance: boxes found without a class that a person kept and gave a class.

Revision ID: 0004_class_picked
Revises: 0003_choice_acceptance
Create Date: 2026-11-30

Adds ``class_picked`` to ``prelabelacceptance`` (:class:`backend.acceptance.PrelabelAcceptance`):
the part of ``relabelled`` whose predicted box had no label (a grey box at day 0 of a project
with new classes). Integer, 0 for rows counted before: the next recount from Label Studio fills it.
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0004_class_picked"
down_revision: Union[str, Sequence[str], None] = "0003_choice_acceptance"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    have = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("prelabelacceptance")}
    if "class_picked" not in have:  # a database made by create_all with this model
        with op.batch_alter_table("prelabelacceptance") as b:
            b.add_column(sa.Column("class_picked", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("prelabelacceptance") as b:
        b.drop_column("class_picked")
