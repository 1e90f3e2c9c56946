"""Migrations: the head constant matches the revisions, upgrade is idempotent, no drift."""

from __future__ import annotations

from pathlib import Path

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


def test_postgresql_stores_tasks_with_room_for_updates_and_payloads_as_lz4(
    database: Database,
) -> None:
    """Revision 0005: storage settings on PostgreSQL only (what rows hold is unchanged)."""
    import anyio
    import sqlalchemy as sa

    from worker.store import Store

    if database.kind == "sqlite":
        pytest.skip("storage settings are PostgreSQL's; revision 0005 changes nothing on SQLite")

    async def settings() -> tuple[object, object, object]:
        store = Store.open(database.url)
        try:
            async with store.engine.connect() as conn:
                options = await conn.scalar(
                    sa.text("SELECT reloptions FROM pg_class WHERE relname = 'tasks'")
                )
                compression = await conn.scalar(
                    sa.text(
                        "SELECT attcompression::text FROM pg_attribute "
                        "WHERE attrelid = 'task_snapshots'::regclass AND attname = 'payload'"
                    )
                )
                has_lz4 = await conn.scalar(
                    sa.text(
                        "SELECT 'lz4' = ANY(enumvals) FROM pg_settings "
                        "WHERE name = 'default_toast_compression'"
                    )
                )
                return (options, compression, has_lz4)
        finally:
            await store.aclose()

    options, compression, has_lz4 = anyio.run(settings)
    assert options == ["fillfactor=70"]
    assert compression == ("l" if has_lz4 else "")


def test_commands_beside_the_first_migration_of_a_sqlite_file_wait_for_it(tmp_path: Path) -> None:
    """A fresh SQLite file is migrated by the first command that uses it. Commands started
    while that runs must wait for it and find the schema at head: every revision is one
    transaction with the others, so none of them can read a half-migrated file (each revision
    used to commit on its own, and a command arriving between two said "the database schema
    is at revision 0002; run `tasksync migrate`")."""
    import subprocess
    import time

    from tests.support.cli import spawn_cli

    env = {"TASKSYNC_DATABASE__URL": f"sqlite:///{tmp_path / 'fresh.db'}"}
    commands = []
    for _ in range(14):  # staggered across the first migration's few hundred milliseconds
        commands.append(
            spawn_cli("status", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
        time.sleep(0.025)
    outcomes = [(proc.communicate(timeout=60)[1], proc.returncode) for proc in commands]
    assert [rc for _, rc in outcomes] == [0] * len(commands), outcomes
