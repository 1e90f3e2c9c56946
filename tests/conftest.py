"""Shared fixtures: the anyio backend and one parametrised database fixture.

Every storage test runs on SQLite and on PostgreSQL. PostgreSQL tests use the server named by
TASKSYNC_TEST_POSTGRES_URL; without it they are skipped, except under CI=true where a missing
server is a failure (a green run must have exercised both databases).
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from worker.store import Store

PG_URL = os.environ.get("TASKSYNC_TEST_POSTGRES_URL")
IN_CI = os.environ.get("CI") == "true"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def anyio_backend() -> str:
    # aiohttp and SQLAlchemy's async engine are asyncio libraries: anyio runs on asyncio only.
    return "asyncio"


@dataclass(frozen=True)
class Database:
    kind: str  # "sqlite" or "postgres"
    url: str  # a plain URL as a user writes it in tasksync.toml


def _psql_admin(sql: str) -> None:
    import anyio
    import asyncpg  # noqa: F401  (the driver is what the product uses; the admin side too)

    assert PG_URL is not None

    async def run() -> None:
        import asyncpg as pg

        conn = await pg.connect(PG_URL.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    anyio.run(run)


def _pg_url_for(name: str) -> str:
    assert PG_URL is not None
    base, _, _ = PG_URL.rpartition("/")
    return f"{base}/{name}"


@pytest.fixture(scope="session")
def _templates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Migrate once per session; each test then copies a migrated database (fast)."""
    from worker.store.migrate import upgrade

    sqlite_file = tmp_path_factory.mktemp("template") / "template.db"
    upgrade(f"sqlite:///{sqlite_file}")
    templates = {"sqlite": str(sqlite_file)}
    pg_template = f"tasksync_tpl_{os.getpid()}"
    if PG_URL:
        _psql_admin(f"DROP DATABASE IF EXISTS {pg_template}")
        _psql_admin(f"CREATE DATABASE {pg_template}")
        upgrade(_pg_url_for(pg_template))
        templates["postgres"] = pg_template
    yield templates
    if PG_URL:
        _psql_admin(f"DROP DATABASE IF EXISTS {pg_template}")


_counter = itertools.count()


@pytest.fixture(params=["sqlite", "postgres"])
def database(
    request: pytest.FixtureRequest, tmp_path: Path, _templates: dict[str, str]
) -> Iterator[Database]:
    """A clean, migrated database of each kind."""
    if request.param == "sqlite":
        path = tmp_path / "tasksync.db"
        shutil.copyfile(_templates["sqlite"], path)
        yield Database("sqlite", f"sqlite:///{path}")
        return
    if not PG_URL:
        if IN_CI:
            pytest.fail(
                "CI=true but TASKSYNC_TEST_POSTGRES_URL is not set: PostgreSQL tests must run"
            )
        pytest.skip("postgres: TASKSYNC_TEST_POSTGRES_URL is not set")
    name = f"tasksync_t_{os.getpid()}_{next(_counter)}_{uuid.uuid4().hex[:6]}"
    _psql_admin(f"CREATE DATABASE {name} TEMPLATE {_templates['postgres']}")
    try:
        yield Database("postgres", _pg_url_for(name))
    finally:
        _psql_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
async def store(database: Database) -> AsyncIterator[Store]:
    s = Store.open(database.url)
    try:
        yield s
    finally:
        await s.aclose()


def run_cli(
    *args: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 60,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the real `tasksync` command in a subprocess."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TASKSYNC_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
        input=input,
        check=False,
    )
