"""Migrations: the head constant matches the revisions, upgrade is idempotent, no drift."""

from __future__ import annotations

import pytest

from tests.support.db import Database
from worker.store.migrate import HEAD_REVISION, current_revision, head_revision, upgrade


def test_head_constant_matches_the_revisions() -> None:
    assert head_revision("sqlite:///:memory:") == HEAD_REVISION


def test_upgrade_is_idempotent_and_reports_head(database: Database) -> None:
    assert current_revision(database.url) == HEAD_REVISION
    assert upgrade(database.url) == HEAD_REVISION
    assert upgrade(database.url) == HEAD_REVISION


def test_no_drift_between_models_and_revisions(database: Database) -> None:
    import anyio
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from worker.store.engine import create_engine
    from worker.store.schema import metadata

    async def diff() -> list[object]:
        engine = create_engine(database.url, pool_size=1)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(
                    lambda c: compare_metadata(
                        MigrationContext.configure(c, opts={"compare_type": True}), metadata
                    )
                )
        finally:
            await engine.dispose()

    assert anyio.run(diff) == []


@pytest.mark.parametrize("view", ["latest_snapshots", "action_queue"])
def test_views_exist(database: Database, view: str) -> None:
    import anyio
    import sqlalchemy as sa

    from worker.store import Store

    async def query() -> int:
        store = Store.open(database.url)
        try:
            async with store.engine.connect() as conn:
                return len((await conn.execute(sa.text(f"SELECT * FROM {view}"))).all())
        finally:
            await store.aclose()

    assert anyio.run(query) == 0
