"""The database schema as SQLAlchemy Core tables: the one definition Alembic checks against.

Columns named in the contract (docs/interface.md, "Database") are what users query; the lease
and bookkeeping columns are ours. Every column a user may leave out of a plain SQL INSERT has a
database-side default, so `INSERT INTO actions (system, task_id, kind, params)` works on both
PostgreSQL and SQLite.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Aware UTC datetimes in Python on both databases.

    PostgreSQL stores timestamptz. SQLite has no time type: values are stored as naive UTC
    text in the format of its CURRENT_TIMESTAMP default, so text comparison orders them.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; use UTC-aware values")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):  # a row written by hand on SQLite
            value = datetime.fromisoformat(value)
        moment: datetime = value
        if moment.tzinfo is None:
            return moment.replace(tzinfo=UTC)
        return moment.astimezone(UTC)


class Json(sa.TypeDecorator[Any]):
    """JSON text on SQLite, JSONB on PostgreSQL.

    What `sa.JSON().with_variant(JSONB(), "postgresql")` declares, except that the PostgreSQL
    dialect is imported only when a PostgreSQL engine first uses the type: importing it costs
    ~40 ms of every command's start-up, which a SQLite user should not pay.
    """

    impl = sa.JSON
    cache_ok = True
    # As sa.JSON (none_as_null=False) says: a Python None is stored as JSON null, not SQL NULL;
    # and decoded documents (dicts, lists) are not hashable.
    should_evaluate_none = True
    hashable = False

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import JSONB

            return JSONB()
        return self.impl_instance


Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite autoincrements INTEGER only
NOW = sa.text("CURRENT_TIMESTAMP")


class CurrentUser(sa.sql.expression.ColumnElement[str]):
    """The inserting session's role as a column default (`actions.requested_by`): a plain SQL
    INSERT records who made it. SQLite has no roles, so there the default is NULL."""

    inherit_cache = True
    type = sa.Text()


@compiles(CurrentUser, "postgresql")
def _current_user_postgresql(element: CurrentUser, compiler: SQLCompiler, **kw: Any) -> str:
    return "CURRENT_USER"


@compiles(CurrentUser)
def _current_user_other(element: CurrentUser, compiler: SQLCompiler, **kw: Any) -> str:
    return "NULL"


def _ts(name: str, *, default: bool = False, nullable: bool = True) -> sa.Column[datetime]:
    return sa.Column(
        name, UTCDateTime(), server_default=NOW if default else None, nullable=nullable
    )


tasks = sa.Table(
    "tasks",
    metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("system", sa.String(16), nullable=False),
    sa.Column("task_id", sa.String(255), nullable=False),
    sa.Column("tracked", sa.Boolean(), nullable=False, server_default=sa.true()),
    sa.Column("status", sa.Text()),
    sa.Column("state", sa.String(16), nullable=False, server_default="unknown"),
    sa.Column("title", sa.Text()),
    sa.Column("content_hash", sa.String(64)),
    sa.Column("snapshot_seq", sa.Integer(), nullable=False, server_default="0"),
    _ts("first_seen_at", default=True, nullable=False),
    _ts("last_polled_at"),
    _ts("last_changed_at"),
    _ts("next_poll_at", default=True, nullable=False),
    sa.Column("last_error", sa.Text()),
    sa.Column("consecutive_failures", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("not_found", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("lease_owner", sa.String(255)),
    _ts("lease_until"),
    _ts("untracked_at"),  # retention.untracked counts from here (revision 0003)
    sa.UniqueConstraint("system", "task_id"),
    sa.Index(None, "tracked", "next_poll_at"),
)

task_snapshots = sa.Table(
    "task_snapshots",
    metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("system", sa.String(16), nullable=False),
    sa.Column("task_id", sa.String(255), nullable=False),
    sa.Column("seq", sa.Integer(), nullable=False),
    _ts("fetched_at", default=True, nullable=False),
    sa.Column("content_hash", sa.String(64), nullable=False),
    sa.Column("status", sa.Text()),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("payload", Json(), nullable=False),
    sa.UniqueConstraint("system", "task_id", "seq"),
    sa.Index(None, "fetched_at"),  # retention.snapshots (revision 0003)
)

task_events = sa.Table(
    "task_events",
    metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("system", sa.String(16), nullable=False),
    sa.Column("task_id", sa.String(255), nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("dedup_key", sa.String(255), nullable=False),
    sa.Column("snapshot_seq", sa.Integer()),
    _ts("occurred_at"),
    _ts("observed_at", default=True, nullable=False),
    sa.Column("data", Json(), nullable=False),
    sa.UniqueConstraint("system", "task_id", "kind", "dedup_key"),
    sa.Index(None, "observed_at"),
)

ACTION_STATUSES = ("pending", "running", "succeeded", "failed", "canceled")

actions = sa.Table(
    "actions",
    metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("system", sa.Text(), nullable=False),
    sa.Column("task_id", sa.Text(), nullable=False),
    sa.Column("kind", sa.Text(), nullable=False),
    sa.Column("params", Json()),
    sa.Column("status", sa.String(16), nullable=False, server_default="pending"),
    sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("max_attempts", sa.Integer()),
    _ts("next_attempt_at", default=True, nullable=False),
    sa.Column("idempotency_key", sa.Text(), unique=True),
    sa.Column("last_error", sa.Text()),
    sa.Column("result", Json()),
    _ts("created_at", default=True, nullable=False),
    _ts("updated_at", default=True, nullable=False),
    _ts("finished_at"),
    # ours: who holds the action and until when; the effect count seen before the first attempt
    sa.Column("lease_owner", sa.String(255)),
    _ts("lease_until"),
    sa.Column("baseline", sa.Integer()),
    # who queued it: the database role (a column a submitter cannot write), or enqueue's
    # --requested-by
    sa.Column("requested_by", sa.Text(), server_default=CurrentUser()),
    sa.CheckConstraint(
        "status IN ('pending', 'running', 'succeeded', 'failed', 'canceled')", name="status"
    ),
    sa.Index(None, "status", "next_attempt_at"),
    sa.Index(None, "system", "task_id", "id"),
    sa.Index(None, "finished_at"),  # retention.actions (revision 0003)
)

action_attempts = sa.Table(
    "action_attempts",
    metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("action_id", Id, sa.ForeignKey("actions.id", ondelete="CASCADE"), nullable=False),
    _ts("started_at", default=True, nullable=False),
    _ts("finished_at"),
    sa.Column("outcome", sa.String(16)),
    sa.Column("http_status", sa.Integer()),
    sa.Column("error", sa.Text()),
    sa.Column("worker", sa.String(255), nullable=False),
    sa.Index(None, "action_id"),
)

sync_runs = sa.Table(
    "sync_runs",
    metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("worker", sa.String(255), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False, server_default="sync"),
    _ts("started_at", default=True, nullable=False),
    _ts("finished_at"),
    sa.Column("polled", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("changed", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("failed", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("discovered", sa.Integer(), nullable=False, server_default="0"),
    sa.Index(None, "started_at"),  # retention.sync_runs (revision 0003)
)

# One row per `prune` that deleted (dry runs are not recorded): `status` shows the last one.
prune_runs = sa.Table(
    "prune_runs",
    metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("worker", sa.String(255), nullable=False),
    _ts("started_at", default=True, nullable=False),
    _ts("finished_at"),
    sa.Column("deleted", Json(), nullable=False),  # {"task_snapshots": 120, ...}
)

# What each worker's rate control and circuit breaker looked like at the end of its newest
# cycle, per system: `status` shows it (a daemon's state lives in its memory otherwise).
upstream_health = sa.Table(
    "upstream_health",
    metadata,
    sa.Column("system", sa.String(16), primary_key=True),
    sa.Column("worker", sa.String(255), primary_key=True),
    _ts("updated_at", default=True, nullable=False),
    sa.Column("requests", sa.Integer(), nullable=False, server_default="0"),  # in that cycle
    sa.Column("throttled", sa.Integer(), nullable=False, server_default="0"),  # 429s in it
    sa.Column("rate", sa.Float()),  # requests per second paced at; NULL: not paced
    sa.Column("ceiling", sa.Float()),
    sa.Column("policy", sa.String(32)),  # the gateway's stated limit, e.g. "200/1s"
    sa.Column("circuit", sa.String(32), nullable=False, server_default="closed"),
)

# One row per system per discovery: how far its walk got and why it stopped.
discovery_walks = sa.Table(
    "discovery_walks",
    metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("run_id", Id, sa.ForeignKey("sync_runs.id", ondelete="CASCADE")),
    sa.Column("system", sa.String(16), nullable=False),
    sa.Column("worker", sa.String(255), nullable=False),
    _ts("started_at", default=True, nullable=False),
    _ts("finished_at"),
    sa.Column("pages", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("found", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("new", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("complete", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("error", sa.Text()),
    sa.Index(None, "system", "id"),
)

# The views for people querying with SQL are written out in the revisions that create them, not
# here (Alembic does not track views); their names are part of the contract.
VIEW_NAMES = ("latest_snapshots", "action_queue")
