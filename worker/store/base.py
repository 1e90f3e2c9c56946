"""What every part of the store shares: the engine, the dialect, time and row helpers."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine


def utcnow() -> datetime:
    return datetime.now(UTC)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class StoreBase:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.is_postgres = engine.dialect.name == "postgresql"
        # Only this database's dialect: importing the PostgreSQL one costs ~40 ms of every
        # command's start-up, which a SQLite user should not pay (nor a PostgreSQL user SQLite's).
        self._insert: Callable[[sa.Table], Any]
        if self.is_postgres:
            from sqlalchemy.dialects import postgresql

            self._insert = postgresql.insert
        else:
            from sqlalchemy.dialects import sqlite

            self._insert = sqlite.insert

    def insert(self, table: sa.Table) -> Any:
        """A dialect INSERT that supports on_conflict_do_nothing()."""
        return self._insert(table)

    def skip_locked(self, select: sa.Select[Any]) -> sa.Select[Any]:
        """Row claims: PostgreSQL lets concurrent workers skip each other's rows. SQLite has a
        single writer (the worker lock) and serialises transactions, so it needs nothing."""
        return select.with_for_update(skip_locked=True) if self.is_postgres else select

    async def aclose(self) -> None:
        await self.engine.dispose()


def as_dict(row: Any) -> dict[str, Any]:
    return dict(row._mapping)


def json_text(value: Any) -> str | None:
    """Columns declared JSON come back decoded; read through CAST(... AS TEXT) they do not,
    which is how user-inserted rows with broken JSON are read without crashing."""
    if value is None or isinstance(value, str):
        return value
    return str(value)
