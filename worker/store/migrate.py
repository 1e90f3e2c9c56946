"""`tasksync migrate`: Alembic `upgrade head` with the revisions shipped in the package."""

from __future__ import annotations

from importlib import resources
from typing import Any

# The newest revision, known without importing Alembic (it costs a tenth of a second on every
# command); tests/test_migrations.py checks it against the revisions on disk.
HEAD_REVISION = "0003"


def _alembic_config(url: str) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(resources.files("worker.migrations")))
    config.attributes["url"] = url
    return config


def head_revision(url: str) -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config(url)).get_current_head()
    assert head is not None
    return head


def upgrade(url: str) -> str:
    """Bring the schema to the newest revision (safe to repeat). Returns the revision.

    Runs its own event loop (Alembic's env.py), so call it outside any running loop.
    """
    from alembic import command

    command.upgrade(_alembic_config(url), "head")
    return head_revision(url)


def current_revision(url: str) -> str | None:
    """The database's revision, or None when it has never been migrated."""
    import asyncio

    import sqlalchemy as sa

    from worker.store.engine import create_engine

    async def look() -> str | None:
        engine = create_engine(url, pool_size=1)
        try:
            async with engine.connect() as conn:
                exists = await conn.run_sync(lambda c: sa.inspect(c).has_table("alembic_version"))
                if not exists:
                    return None
                value = await conn.scalar(sa.text("SELECT version_num FROM alembic_version"))
                return None if value is None else str(value)
        finally:
            await engine.dispose()

    return asyncio.run(look())


class SchemaOutdated(Exception):
    """The database is at an older revision: `tasksync migrate` must run first."""


_checked: set[str] = set()


def ensure_schema(url: str) -> None:
    """A database that was never migrated is migrated on first use (a fresh SQLite file needs
    no ceremony); one at an older revision is left for `tasksync migrate` to upgrade, so an
    operator decides when a schema change happens. Call it outside any running event loop."""
    if url in _checked:
        return
    current = current_revision(url)
    if current is None:
        upgrade(url)
    elif current != HEAD_REVISION:
        raise SchemaOutdated(_revision_problem(url, current))
    _checked.add(url)


def _revision_problem(url: str, current: str) -> str:
    from alembic.script import ScriptDirectory

    known = {r.revision for r in ScriptDirectory.from_config(_alembic_config(url)).walk_revisions()}
    if current in known:
        return f"the database schema is at revision {current}; run `tasksync migrate`"
    return (
        f"the database schema is at revision {current}, which this tasksync does not know "
        f"(its newest is {HEAD_REVISION}): was it migrated by a newer version? upgrade tasksync"
    )


def check_not_newer(url: str) -> None:
    """`migrate` on a database a newer tasksync migrated: say so instead of failing in Alembic."""
    current = current_revision(url)
    if current is not None and current != HEAD_REVISION:
        problem = _revision_problem(url, current)
        if "does not know" in problem:
            raise SchemaOutdated(problem)
