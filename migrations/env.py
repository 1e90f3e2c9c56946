"""Alembic environment: runs the revisions on tasksync's async engine (aiosqlite / asyncpg)."""

from __future__ import annotations

import asyncio
import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import sqlalchemy as sa
from alembic import context
from sqlalchemy.engine import Connection

from worker.store.engine import async_url, create_engine, sqlite_path
from worker.store.schema import Json, UTCDateTime, metadata

config = context.config


def _url() -> str:
    url = config.attributes.get("url")
    if url:
        return str(url)
    from worker.config import load_config

    return load_config().settings.database.url


def _render_item(type_: str, obj: Any, autogen_context: Any) -> str | Literal[False]:
    # A revision must not import the live schema (it would change with it): our column type is
    # written as the DDL type it compiles to.
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    if type_ == "type" and isinstance(obj, Json):  # as the revisions before it was a decorator
        autogen_context.imports.add("from sqlalchemy.dialects import postgresql")
        return 'sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")'
    return False


# Two processes may migrate one database at once (a fresh one is migrated on first use): the
# second waits for the first and then finds the schema at head, instead of running a revision
# the first already ran ("duplicate column name").
MIGRATION_LOCK = 7_270_726_001  # pg_advisory_xact_lock key


@contextmanager
def _sqlite_lock(url: str) -> Iterator[None]:
    path = sqlite_path(async_url(url))
    if path is None:
        yield
        return
    with open(f"{path}.migrate-lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def _run(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(sa.text(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"))
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        render_item=_render_item,
        # All revisions in one transaction on SQLite too (Alembic assumes SQLite cannot, from
        # a driver that committed before DDL; ours runs DDL inside BEGIN IMMEDIATE). Without
        # it each revision committed on its own, and a process reading a fresh database at
        # that moment (a first command beside the one migrating it) found an older revision
        # and refused to run instead of waiting for the migration to finish.
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _main() -> None:
    url = _url()
    with _sqlite_lock(url):
        await _migrate(url)


async def _migrate(url: str) -> None:
    engine = create_engine(url, pool_size=1)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported: run them against a database")
asyncio.run(_main())
