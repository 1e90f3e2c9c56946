"""`tasksync migrate`: Alembic `upgrade head` with the revisions shipped in the package."""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

# The newest revision, known without importing Alembic (it costs a tenth of a second on every
# command); tests/test_migrations.py checks it against the revisions on disk.
HEAD_REVISION = "0005"


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

    from worker.store.engine import create_engine

    async def look() -> str | None:
        engine = create_engine(url, pool_size=1)
        try:
            return await read_revision(engine)
        finally:
            await engine.dispose()

    return asyncio.run(look())


async def read_revision(engine: AsyncEngine) -> str | None:
    """The revision of the database behind an open engine, or None when never migrated."""
    import sqlalchemy as sa

    async with engine.connect() as conn:
        exists = await conn.run_sync(lambda c: sa.inspect(c).has_table("alembic_version"))
        if not exists:
            return None
        value = await conn.scalar(sa.text("SELECT version_num FROM alembic_version"))
    return None if value is None else str(value)


class SchemaOutdated(Exception):
    """The database is at an older revision: `tasksync migrate` must run first."""


class NeverMigrated(Exception):
    """check_schema found no schema: `upgrade` it, outside the event loop, then go on."""


_checked: set[str] = set()

T = TypeVar("T")


def run_migrated(url: str, run: Callable[[bool], T]) -> T:
    """`run(True)`: a command's work that first reads the schema's revision on its own engine
    (`check_schema`), not on an engine of its own opened before it. A database never migrated
    is migrated here, outside any event loop (Alembic runs its own), then `run(False)`."""
    try:
        return run(True)
    except NeverMigrated:
        pass
    ensure_schema(url)
    return run(False)


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


async def check_schema(engine: AsyncEngine) -> None:
    """ensure_schema's check on the engine a command works with, in its event loop: one
    connection where ensure_schema opens an engine of its own first (on PostgreSQL a second
    connection and dialect initialisation, ~15 ms of a 0.35 s `tasksync status`). Raises
    NeverMigrated for the caller to migrate, or SchemaOutdated as ensure_schema does."""
    current = await read_revision(engine)
    if current is None:
        raise NeverMigrated
    if current != HEAD_REVISION:
        # the URL only locates the revisions shipped in the package: its password stays hidden
        raise SchemaOutdated(_revision_problem(str(engine.url), current))


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
