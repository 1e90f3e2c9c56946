"""PostgreSQL storage settings for the hot tables: room for HOT updates in tasks, lz4 payloads

Revision ID: 0005
Revises: 0004

Nothing changes on SQLite, and nothing any user sees on PostgreSQL: both settings are how rows
are stored, not what they hold.

- `tasks` keeps 30 % of each page free (fillfactor 70). Every poll updates a task twice (the
  claim's lease, then the result); with full pages each new row version goes to another page
  and every index of the table gets an entry for it. With room on the page, the claim (which
  changes no indexed column) is a heap-only update. Pages written from now on follow it.
- `task_snapshots.payload` is compressed with lz4 instead of pglz where the server has lz4
  (PostgreSQL 14 and newer, built with it, as Debian's and the official images are): payloads
  above 2 kB are compressed on insert, and pglz was a fifth of storing one.
  Rows stored before keep their compression; reading either is transparent.

bench/README.md has the figures.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TASKS_FILLFACTOR = 70


def _has_lz4() -> bool:
    found = op.get_bind().execute(
        sa.text(
            "SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'"
        )
    )
    return bool(found.scalar())


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(f"ALTER TABLE tasks SET (fillfactor = {TASKS_FILLFACTOR})")
    if _has_lz4():
        op.execute("ALTER TABLE task_snapshots ALTER COLUMN payload SET COMPRESSION lz4")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("ALTER TABLE tasks RESET (fillfactor)")
    if _has_lz4():
        op.execute("ALTER TABLE task_snapshots ALTER COLUMN payload SET COMPRESSION DEFAULT")
