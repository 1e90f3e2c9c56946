"""Alembic environment: runs the revisions on tasksync's async engine (aiosqlite / asyncpg)."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from alembic import context
from sqlalchemy.engine import Connection

from worker.store.engine import create_engine
from worker.store.schema import UTCDateTime, metadata

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
    return False


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        render_item=_render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _main() -> None:
    engine = create_engine(_url(), pool_size=1)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported: run them against a database")
asyncio.run(_main())
