"""actions.requested_by: who queued each action

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 23:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A submitter may cancel its own pending actions through this function and no other way: it
# runs as the owner (SECURITY DEFINER) but only sets a pending action that the calling login
# role requested to canceled, the same transition as `tasksync cancel`. Nobody may call it until
# `tasksync grants --submitter` grants EXECUTE. search_path is pinned, as a definer function's
# must be, so a caller cannot slip its own `actions` in front of ours.
CANCEL_FUNCTION = """
CREATE OR REPLACE FUNCTION tasksync_cancel(action_id bigint) RETURNS boolean
LANGUAGE sql SECURITY DEFINER SET search_path = {schema}, pg_temp AS $$
    WITH canceled AS (
        UPDATE actions
        SET status = 'canceled', finished_at = CURRENT_TIMESTAMP,
            updated_at = CURRENT_TIMESTAMP, lease_owner = NULL, lease_until = NULL
        WHERE id = action_id AND status = 'pending' AND requested_by = session_user
        RETURNING 1
    )
    SELECT EXISTS (SELECT 1 FROM canceled)
$$
"""


def upgrade() -> None:
    # A plain ADD COLUMN, not a batch: on SQLite a batch would copy and drop `actions`, which
    # the views and the grants refer to. The default comes second: given with ADD COLUMN,
    # PostgreSQL would fill the existing rows with the migrating role, but nobody knows who
    # queued those, so they keep NULL.
    op.add_column("actions", sa.Column("requested_by", sa.Text(), nullable=True))
    if op.get_bind().dialect.name == "postgresql":
        # DEFAULT CURRENT_USER (schema.CurrentUser): a plain SQL insert records its role
        op.execute("ALTER TABLE actions ALTER COLUMN requested_by SET DEFAULT CURRENT_USER")
        schema = op.get_bind().scalar(sa.text("SELECT quote_ident(current_schema())"))
        op.execute(CANCEL_FUNCTION.format(schema=schema))
        op.execute("REVOKE ALL ON FUNCTION tasksync_cancel(bigint) FROM PUBLIC")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS tasksync_cancel(bigint)")
    op.execute("ALTER TABLE actions DROP COLUMN requested_by")  # SQLite 3.35+ and PostgreSQL
