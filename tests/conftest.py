"""Shared fixtures: the anyio backend and one parametrised database fixture.

Every storage test runs on SQLite and on PostgreSQL (see tests/support/db.py for when the
PostgreSQL half is skipped). The helpers themselves live in tests/support/; `Database` and
`run_cli` are importable from here too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support.cli import run_cli
from tests.support.db import PG_URL, Database, fresh_database, migrated_templates
from worker.store import Store

__all__ = ["PG_URL", "Database", "run_cli"]


@pytest.fixture
def anyio_backend() -> str:
    # aiohttp and SQLAlchemy's async engine are asyncio libraries: anyio runs on asyncio only.
    return "asyncio"


@pytest.fixture(scope="session")
def _templates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Migrate once per session; each test then copies a migrated database (fast)."""
    with migrated_templates(tmp_path_factory.mktemp("template")) as templates:
        yield templates


@pytest.fixture(params=["sqlite", "postgres"])
def database(
    request: pytest.FixtureRequest, tmp_path: Path, _templates: dict[str, str]
) -> Iterator[Database]:
    """A clean, migrated database of each kind."""
    with fresh_database(request.param, _templates, tmp_path) as db:
        yield db


@pytest.fixture
async def store(database: Database) -> AsyncIterator[Store]:
    s = Store.open(database.url)
    try:
        yield s
    finally:
        await s.aclose()
