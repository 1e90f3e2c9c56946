"""actions.requested_by: who queued each action

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 23:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from worker.store.schema import CurrentUser

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # PostgreSQL: DEFAULT CURRENT_USER, so an INSERT by plain SQL records the inserting role
    # (existing rows keep NULL: nobody knows who queued them). SQLite: DEFAULT NULL.
    # A plain ADD COLUMN, not a batch: on SQLite a batch would copy and drop `actions`, which
    # the views and the grants refer to.
    op.add_column(
        "actions",
        sa.Column("requested_by", sa.Text(), server_default=CurrentUser(), nullable=True),
    )


def downgrade() -> None:
    op.execute("ALTER TABLE actions DROP COLUMN requested_by")  # SQLite 3.35+ and PostgreSQL
