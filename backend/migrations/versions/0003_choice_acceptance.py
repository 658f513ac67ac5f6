"""Pre-label acceptance of image-level choices (Choices projects).

Revision ID: 0003_choice_acceptance
Revises: 0002_model_artifacts
Create Date: 2026-11-30

Adds to ``prelabelacceptance`` (:class:`backend.acceptance.PrelabelAcceptance`) the counts of
image-level choices per model version: ``choices_predicted``, ``choices_accepted``,
``choices_changed``, ``choices_removed``, ``choices_by_hand`` (integers, 0 for rows counted
before: the next recount from Label Studio fills them).
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0003_choice_acceptance"
down_revision: Union[str, Sequence[str], None] = "0002_model_artifacts"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

COLUMNS = ("choices_predicted", "choices_accepted", "choices_changed", "choices_removed", "choices_by_hand")


def upgrade() -> None:
    have = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("prelabelacceptance")}
    with op.batch_alter_table("prelabelacceptance") as b:
        for name in COLUMNS:
            if name not in have:  # a database made by create_all with this model
                b.add_column(sa.Column(name, sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("prelabelacceptance") as b:
        for name in reversed(COLUMNS):
            b.drop_column(name)
