"""rate control and discovery state: upstream_health, discovery_walks

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the column types as they were at this revision (not imported from the
# live schema, so a later change there never rewrites this one).
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
NOW = sa.text("(CURRENT_TIMESTAMP)")


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "upstream_health",
        sa.Column("system", sa.String(length=16), nullable=False),
        sa.Column("worker", sa.String(length=255), nullable=False),
        sa.Column("updated_at", _ts(), server_default=NOW, nullable=False),
        sa.Column("requests", sa.Integer(), server_default="0", nullable=False),
        sa.Column("throttled", sa.Integer(), server_default="0", nullable=False),
        sa.Column("rate", sa.Float(), nullable=True),
        sa.Column("ceiling", sa.Float(), nullable=True),
        sa.Column("policy", sa.String(length=32), nullable=True),
        sa.Column("circuit", sa.String(length=32), server_default="closed", nullable=False),
        sa.PrimaryKeyConstraint("system", "worker", name=op.f("pk_upstream_health")),
    )
    op.create_table(
        "discovery_walks",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("run_id", ID, nullable=True),
        sa.Column("system", sa.String(length=16), nullable=False),
        sa.Column("worker", sa.String(length=255), nullable=False),
        sa.Column("started_at", _ts(), server_default=NOW, nullable=False),
        sa.Column("finished_at", _ts(), nullable=True),
        sa.Column("pages", sa.Integer(), server_default="0", nullable=False),
        sa.Column("found", sa.Integer(), server_default="0", nullable=False),
        sa.Column("new", sa.Integer(), server_default="0", nullable=False),
        sa.Column("complete", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["sync_runs.id"],
            name=op.f("fk_discovery_walks_run_id_sync_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_discovery_walks")),
    )
    op.create_index(
        op.f("ix_discovery_walks_system_id"), "discovery_walks", ["system", "id"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_discovery_walks_system_id"), table_name="discovery_walks")
    op.drop_table("discovery_walks")
    op.drop_table("upstream_health")
