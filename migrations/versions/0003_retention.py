"""retention: prune_runs, tasks.untracked_at, indexes for pruning by age

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 23:10:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "prune_runs",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("worker", sa.String(length=255), nullable=False),
        sa.Column(
            "started_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "deleted",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prune_runs")),
    )
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("untracked_at", sa.DateTime(timezone=True), nullable=True))
    # Tasks untracked before this revision: their clock starts now (the moment is not known,
    # and counting from an earlier poll could delete a task untracked yesterday).
    op.execute("UPDATE tasks SET untracked_at = CURRENT_TIMESTAMP WHERE NOT tracked")
    with op.batch_alter_table("task_snapshots", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_task_snapshots_fetched_at"), ["fetched_at"], unique=False
        )
    with op.batch_alter_table("actions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_actions_finished_at"), ["finished_at"], unique=False)
    with op.batch_alter_table("sync_runs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_sync_runs_started_at"), ["started_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("sync_runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sync_runs_started_at"))
    with op.batch_alter_table("actions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_actions_finished_at"))
    with op.batch_alter_table("task_snapshots", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_task_snapshots_fetched_at"))
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_column("untracked_at")
    op.drop_table("prune_runs")
