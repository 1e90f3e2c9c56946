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


def insert_rows(store: Any, table: sa.Table, names: Sequence[str]) -> Bulk:
    """INSERT of rows binding `names` into `table`, each row doing nothing when it conflicts
    with one already stored (or one before it in the same batch)."""
    if not store.is_postgres:
        values: dict[str, Any] = {n: sa.bindparam(n) for n in names}
        return Bulk(store.insert(table).values(values).on_conflict_do_nothing(), tuple(names))
    return ColumnInsert(_unnest_insert(store, table, names), tuple(names))


@dataclass(eq=False)
class ColumnInsert(Bulk):
    """A batch INSERT sent to PostgreSQL as one statement, with one array per column.

    asyncpg's executemany sends a batch of N rows as N bound executions of the INSERT, and the
    server runs each: per row, asyncpg encodes the parameters (the JSONB ones in Python, through
    SQLAlchemy's codec) and the executor starts up. Arrays of text, numbers and timestamps are
    encoded in asyncpg's C code, and the server unnests them in one executor run (see
    `_unnest_insert`). Rows are given as for Bulk: tuples in the order of `names`."""

    async def run(self, conn: AsyncConnection, rows: Sequence[Row]) -> None:
        if not rows:
            return
        sql, reorder = self.compiled(conn.dialect)
        columns = tuple(list(column) for column in zip(*rows, strict=True))
        await conn.exec_driver_sql(sql, reorder(columns) if reorder else columns)


def _unnest_insert(store: Any, table: sa.Table, names: Sequence[str]) -> sa.ClauseElement:
    """INSERT INTO table (names) SELECT ... FROM unnest($1::text[], $2::int[], ...) WITH
    ORDINALITY ORDER BY ordinality ON CONFLICT DO NOTHING.

    The arrays are of the unbounded base types (text, not varchar(n)): a cast to varchar(n)
    would cut a longer value short silently, where the INSERT into the column refuses it as
    storing one row does. JSON goes as text and is cast to the column's JSONB. The rows are
    inserted in the order given, so ids keep following the batch as they do row by row."""
    from sqlalchemy.dialects.postgresql import JSONB

    from worker.store.schema import Json

    def element_type(column: sa.Column[Any]) -> Any:
        return sa.Text() if isinstance(column.type, sa.String | Json) else column.type

    columns = [table.c[n] for n in names]
    arrays = [sa.cast(sa.bindparam(c.name), sa.ARRAY(element_type(c))) for c in columns]
    rows = sa.func.unnest(*arrays).table_valued(*names, with_ordinality="n").render_derived()
    picked = [
        sa.cast(rows.c[c.name], JSONB) if isinstance(c.type, Json) else rows.c[c.name]
        for c in columns
    ]
    select = sa.select(*picked).order_by(rows.c.n)
    insert: sa.ClauseElement = (
        store.insert(table).from_select(list(names), select).on_conflict_do_nothing()
    )
    return insert
