"""Database URLs, engines and the SQLite single-worker lock."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine


class DatabaseUrlError(ValueError):
    """The configured database URL cannot be used (names database.url)."""


def async_url(url: str) -> URL:
    """Pick the asyncio driver for a plain URL: sqlite -> aiosqlite, postgresql -> asyncpg."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DatabaseUrlError(f"database.url: {redact_url(url)!r} is not a database URL") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return parsed.set(drivername="sqlite+aiosqlite")
    if backend == "postgresql":
        return parsed.set(drivername="postgresql+asyncpg")
    raise DatabaseUrlError(
        f"database.url: unsupported database {backend!r}; use sqlite or postgresql"
    )


def sync_url(url: str) -> URL:
    """The same database for Alembic's synchronous run (through the async driver's sync shim)."""
    return async_url(url)


def redact_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable URL>"


def sqlite_path(url: URL) -> Path | None:
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return Path(url.database)


def create_engine(url: str, *, pool_size: int = 10) -> AsyncEngine:
    target = async_url(url)
    kwargs: dict[str, Any] = {}
    if target.get_backend_name() == "sqlite":
        path = sqlite_path(target)
        if path is not None and not path.parent.exists():
            raise DatabaseUrlError(f"database.url: directory {path.parent} does not exist")
        kwargs["connect_args"] = {"timeout": 30}
        # One connection: every transaction here begins IMMEDIATE, so SQLite runs them one at a
        # time whatever the pool. With more connections, a transaction arriving while another
        # writes sleeps in SQLite's busy handler (1, 2, 5, 10 ... ms, past the moment the
        # lock is free) on a thread of its own; with one, it waits in the pool's asyncio queue
        # and starts the moment the connection returns. An unchanged 18,000-task cycle took
        # 2.15 s instead of 2.62 (median of 5 alternated runs, bench/README.md). (An in-memory
        # database has SQLAlchemy's single static connection already.)
        if path is not None:
            kwargs.update(pool_size=1, max_overflow=0)
    else:
        # No pre-ping: it would add a round trip to every transaction of the hot path. A
        # connection the server dropped fails its first statement instead; SQLAlchemy then
        # invalidates the pool and the loops retry (service.py backs off on database outages).
        kwargs.update(pool_size=pool_size, max_overflow=pool_size, pool_recycle=3600)
        # asyncpg's statement cache is per connection; keep it (prepared statements are the
        # cheap path for our batch statements)
        kwargs["connect_args"] = {"server_settings": {"application_name": "tasksync"}}
    # orjson for the JSON columns: about 8x faster than the json module on payload-sized
    # documents, and every snapshot and event goes through it.
    kwargs["json_serializer"] = dumps_json
    kwargs["json_deserializer"] = orjson.loads
    engine = create_async_engine(target, **kwargs)
    if target.get_backend_name() == "sqlite":
        _configure_sqlite(engine)
    return engine


def _configure_sqlite(engine: AsyncEngine) -> None:
    @sa.event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event below decide when transactions start (the driver's
        # own implicit BEGIN is DEFERRED, which lets two writers deadlock into SQLITE_BUSY).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @sa.event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: sa.Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def dumps_json(value: Any) -> str:
    try:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
    except orjson.JSONEncodeError:  # e.g. an integer beyond 64 bits in an upstream payload
        return json.dumps(value, ensure_ascii=False)


class WorkerLockError(RuntimeError):
    pass


class SqliteWorkerLock:
    """SQLite has one writer: a second sync/apply/run worker on the same file is refused.

    An advisory flock beside the database file is released by the kernel when the process dies,
    so a crashed worker never leaves a stale lock behind.
    """

    def __init__(self, db_path: Path) -> None:
        self.path = db_path.with_name(db_path.name + ".worker-lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise WorkerLockError(
                f"another tasksync worker (pid {holder}) is already working on {self.path.with_suffix('')}; "
                "SQLite supports one worker at a time — use PostgreSQL to run several"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
