"""Batch statements run through the driver's own executemany, with rows as the driver takes them.

SQLAlchemy's executemany looks at every parameter of every row in Python (building a dict of
bound values per row, then calling each column type's bind processor: UTCDateTime's, the
dialect's DATETIME formatting, JSON serialisation). On a first cycle of 18,000 tasks that was
about 15 % of the process's CPU (py-spy, bench/README.md). Here a statement is still built with
SQLAlchemy Core (so it is checked against the schema and rendered for each dialect, casts
included), compiled once per dialect, and its rows are plain tuples of values already in the
driver's form: `stamp` for timestamps, `json_text` for JSON columns, str/int/bool/None else.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.compiler import SQLCompiler

from worker.store.engine import dumps_json

Row = tuple[Any, ...]


def stamp(moment: datetime | None, postgres: bool) -> Any:
    """A timestamp as the driver takes it: aware UTC for asyncpg; on SQLite naive UTC text in
    the format UTCDateTime writes, so stored values keep comparing as text."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        raise ValueError("naive datetime given to the database; use UTC-aware values")
    moment = moment.astimezone(UTC)
    if postgres:
        return moment
    m = moment  # SQLAlchemy's SQLite DATETIME text, digit for digit (strftime pads no year)
    return (
        f"{m.year:04d}-{m.month:02d}-{m.day:02d} "
        f"{m.hour:02d}:{m.minute:02d}:{m.second:02d}.{m.microsecond:06d}"
    )


def json_text(value: Any) -> str:
    """A JSON column's value as the drivers take it (text; asyncpg's jsonb codec is SQLAlchemy's,
    which takes text too)."""
    return dumps_json(value)


@dataclass(eq=False)
class Bulk:
    """One batch statement whose bound parameters are `names`; rows are tuples in that order."""

    statement: sa.ClauseElement
    names: tuple[str, ...]
    _compiled: dict[str, tuple[str, Callable[[Row], Row] | None]] = field(default_factory=dict)

    def compiled(self, dialect: Dialect) -> tuple[str, Callable[[Row], Row] | None]:
        """The SQL text and, when the statement binds parameters in another order than `names`
        (or one of them twice), how to reorder a row."""
        found = self._compiled.get(dialect.name)
        if found is None:
            # for_executemany: no implicit RETURNING of the new ids (nothing would read them)
            compiled = self.statement.compile(dialect=dialect, for_executemany=True)
            assert isinstance(compiled, SQLCompiler)
            order = compiled.positiontup or []
            unknown = set(order) - set(self.names)
            if unknown:
                raise ValueError(f"statement binds {sorted(unknown)}, not in {self.names}")
            picks = [self.names.index(name) for name in order]
            reorder = None
            if picks != list(range(len(self.names))):
                getter = operator.itemgetter(*picks)
                reorder = getter if len(picks) > 1 else (lambda row: (getter(row),))
            found = self._compiled[dialect.name] = (compiled.string, reorder)
        return found

    async def rows(self, conn: AsyncConnection, params: Row) -> list[Row]:
        """Run once with `params`; the rows it returns, as the driver gives them."""
        sql, reorder = self.compiled(conn.dialect)
        result = await conn.exec_driver_sql(sql, reorder(params) if reorder else params)
        return [tuple(r) for r in result.all()]

    async def run(self, conn: AsyncConnection, rows: Sequence[Row]) -> None:
        if not rows:
            return
        sql, reorder = self.compiled(conn.dialect)
        await conn.exec_driver_sql(sql, [reorder(r) for r in rows] if reorder else list(rows))


def in_id_list(store: Any, column: Any) -> Any:
    """`column` is one of the ids bound as "ids" (see `id_list`): one parameter, whatever the
    number of ids, so the statement is compiled and prepared once (an IN list of N
    parameters is rendered anew for every N)."""
    ids: sa.BindParameter[Any] = sa.bindparam("ids")
    if store.is_postgres:
        return column == sa.any_(sa.type_coerce(ids, sa.ARRAY(sa.BigInteger())))
    return column.in_(sa.select(sa.column("value")).select_from(sa.func.json_each(ids)))


def id_list(ids: Sequence[int], postgres: bool) -> Any:
    """The "ids" parameter of `in_id_list`: an array for asyncpg, JSON text for SQLite."""
    return list(ids) if postgres else json_text(list(ids))


def insert_rows(insert: Any, names: Sequence[str]) -> Bulk:
    """`insert` (a dialect INSERT, e.g. with on_conflict_do_nothing) binding `names`."""
    return Bulk(insert.values({n: sa.bindparam(n) for n in names}), tuple(names))
