"""The test databases: one factory for SQLite and PostgreSQL, and plain-SQL readers.

PostgreSQL tests use the server named by TASKSYNC_TEST_POSTGRES_URL; without it they are
skipped, except under CI=true where a missing server is a failure (a green run must have
exercised both databases). Each test gets a copy of a database migrated once per session.
"""

from __future__ import annotations

import itertools
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from worker.store import Store

PG_URL = os.environ.get("TASKSYNC_TEST_POSTGRES_URL")
IN_CI = os.environ.get("CI") == "true"


@dataclass(frozen=True)
class Database:
    kind: str  # "sqlite" or "postgres"
    url: str  # a plain URL as a user writes it in tasksync.toml


def psql_admin(sql: str) -> None:
    """One statement on the PostgreSQL server (CREATE/DROP DATABASE cannot run in a transaction)."""
    import anyio
    import asyncpg

    assert PG_URL is not None

    async def run() -> None:
        conn = await asyncpg.connect(PG_URL.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    anyio.run(run)


def pg_url_for(name: str) -> str:
    assert PG_URL is not None
    base, _, _ = PG_URL.rpartition("/")
    return f"{base}/{name}"


def require_postgres() -> None:
    """Skip a PostgreSQL test without a server; under CI=true, fail it."""
    if PG_URL:
        return
    if IN_CI:
        pytest.fail("CI=true but TASKSYNC_TEST_POSTGRES_URL is not set: PostgreSQL tests must run")
    pytest.skip("postgres: TASKSYNC_TEST_POSTGRES_URL is not set")


@contextmanager
def migrated_templates(folder: Path) -> Iterator[dict[str, str]]:
    """Migrate once (a SQLite file, and a PostgreSQL template database when there is a server)."""
    from worker.store.migrate import upgrade

    sqlite_file = folder / "template.db"
    upgrade(f"sqlite:///{sqlite_file}")
    templates = {"sqlite": str(sqlite_file)}
    pg_template = f"tasksync_tpl_{os.getpid()}"
    if PG_URL:
        psql_admin(f"DROP DATABASE IF EXISTS {pg_template}")
        psql_admin(f"CREATE DATABASE {pg_template}")
        upgrade(pg_url_for(pg_template))
        templates["postgres"] = pg_template
    try:
        yield templates
    finally:
        if PG_URL:
            psql_admin(f"DROP DATABASE IF EXISTS {pg_template}")


_counter = itertools.count()


@contextmanager
def fresh_database(kind: str, templates: dict[str, str], folder: Path) -> Iterator[Database]:
    """A clean, migrated database of `kind`, copied from the templates; dropped afterwards."""
    if kind == "sqlite":
        path = folder / "tasksync.db"
        shutil.copyfile(templates["sqlite"], path)
        yield Database("sqlite", f"sqlite:///{path}")
        return
    require_postgres()
    name = f"tasksync_t_{os.getpid()}_{next(_counter)}_{uuid.uuid4().hex[:6]}"
    psql_admin(f"CREATE DATABASE {name} TEMPLATE {templates['postgres']}")
    try:
        yield Database("postgres", pg_url_for(name))
    finally:
        psql_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def count(store: Store, table: str, where: str = "1=1", **params: Any) -> int:
    async with store.engine.connect() as conn:
        value = await conn.scalar(sa.text(f"SELECT count(*) FROM {table} WHERE {where}"), params)
    return int(value or 0)


async def rows(store: Store, sql: str, **params: Any) -> list[dict[str, Any]]:
    async with store.engine.connect() as conn:
        result = await conn.execute(sa.text(sql), params)
        return [dict(r._mapping) for r in result]
