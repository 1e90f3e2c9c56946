"""The driver-level batch statements (worker/store/bulk.py): values in the driver's form must be
what SQLAlchemy's own processing would have stored, on both databases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import sqlite

from tests.support.db import Database
from worker.store import Store, create_engine
from worker.store.bulk import Bulk, id_list, in_id_list, insert_rows, json_text, stamp
from worker.store.schema import UTCDateTime, task_events, task_snapshots, tasks
from worker.store.tasks import EVENT_COLUMNS, ClaimedTask


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 12, 7, 18, 43, 10, 123456, tzinfo=UTC),
        datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),  # no microseconds: still six digits
        datetime(999, 3, 4, 5, 6, 7, 8, tzinfo=UTC),  # a year of three digits is padded
        datetime(2026, 6, 1, 2, 0, 0, 5, tzinfo=timezone(timedelta(hours=8))),  # to UTC first
    ],
)
def test_sqlite_stamp_is_the_text_sqlalchemy_stores(moment: datetime) -> None:
    dialect = sqlite.dialect()
    column_type = UTCDateTime()
    processed = column_type.process_bind_param(moment, dialect)
    stored = column_type.impl.dialect_impl(dialect).bind_processor(dialect)(processed)  # type: ignore[misc]
    assert stamp(moment, postgres=False) == stored
    assert stamp(moment, postgres=True) == moment.astimezone(UTC)


def test_a_naive_stamp_is_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        stamp(datetime(2026, 1, 1), postgres=False)


def test_a_statement_binding_a_name_twice_is_given_it_twice() -> None:
    b = sa.bindparam
    statement = sa.select(sa.literal_column("1")).where(sa.and_(b("a") == b("b"), b("b") != b("a")))
    bulk = Bulk(statement, ("a", "b"))
    sql, reorder = bulk.compiled(sqlite.dialect())
    assert sql.count("?") == 4
    assert reorder is not None and reorder((1, 2)) == (1, 2, 2, 1)


def test_a_statement_binding_an_unnamed_parameter_is_refused() -> None:
    bulk = Bulk(sa.select(sa.literal(5)), ())
    with pytest.raises(ValueError, match="not in"):
        bulk.compiled(sqlite.dialect())


@pytest.mark.anyio
async def test_an_id_list_is_one_parameter_on_both_databases(
    database: Database, store: Store
) -> None:
    await store.track("aicc", [f"t{i}" for i in range(10)])
    async with store.engine.connect() as conn:
        ids = [row[0] for row in await conn.execute(sa.select(tasks.c.id).order_by(tasks.c.id))]
    chosen = ids[2:7]
    release = Bulk(
        tasks.update().where(in_id_list(store, tasks.c.id)).values(not_found=sa.true()), ("ids",)
    )
    async with store.engine.begin() as conn:
        await release.run(conn, [(id_list(chosen, store.is_postgres),)])
    async with store.engine.connect() as conn:
        marked = [r[0] for r in await conn.execute(sa.select(tasks.c.id).where(tasks.c.not_found))]
    assert sorted(marked) == chosen


@pytest.mark.anyio
async def test_inserted_rows_keep_their_order_and_skip_conflicts(
    database: Database, store: Store
) -> None:
    """A batch INSERT through the driver: ids follow the batch's order (the change stream reads
    events by id), a row conflicting with a stored one or with one earlier in the same batch is
    skipped, JSON arrives as JSON (JSON null included) and NULLs stay NULL."""
    insert = insert_rows(store.insert(task_events).on_conflict_do_nothing(), EVENT_COLUMNS)
    now = stamp(datetime(2026, 12, 7, 12, 0, tzinfo=UTC), store.is_postgres)

    def rows(*events: tuple[str, object]) -> list[tuple[object, ...]]:
        return [("aicc", "t1", "trace", key, 1, None, now, json_text(data)) for key, data in events]

    async with store.engine.begin() as conn:
        await insert.run(conn, rows(("k3", {"a": [1, 2]}), ("k1", None)))
    async with store.engine.begin() as conn:
        await insert.run(
            conn,
            rows(
                ("k1", {"again": True}),  # conflicts with a stored row
                ("k2", "two"),
                ("k0", {"né": "été"}),
                ("k2", "twice"),  # conflicts with a row earlier in this batch
            ),
        )
    async with store.engine.connect() as conn:
        stored = await conn.execute(
            sa.select(
                task_events.c.dedup_key, task_events.c.data, task_events.c.occurred_at
            ).order_by(task_events.c.id)
        )
        assert [tuple(r) for r in stored] == [
            ("k3", {"a": [1, 2]}, None),
            ("k1", None, None),
            ("k2", "two", None),
            ("k0", {"né": "été"}, None),
        ]


@pytest.mark.anyio
@pytest.mark.parametrize("due", [False, True])
async def test_claims_walk_the_tasks_in_id_order_one_batch_at_a_time(
    database: Database, store: Store, due: bool
) -> None:
    """Keyset claims of each system cover its tracked tasks once, in id order, whatever the
    interleaving; on SQLite each claim walks the primary key from `after` (no index read and
    sort of every candidate per batch, which made a cycle's claims quadratic)."""
    for i in range(40):
        for system in ("aicc", "secmaster", "koodrive"):
            await store.track(system, [f"{system}-{i}"])
    await store.untrack("aicc", ["aicc-7"])
    due_before = datetime.now(UTC) + timedelta(seconds=1) if due else None
    for system in ("aicc", "secmaster", "koodrive"):
        claimed: list[str] = []
        after = 0
        while batch := await store.claim_tasks(
            "w1", after_id=after, limit=7, lease=60, due_before=due_before, system=system
        ):
            assert [t.id for t in batch] == sorted(t.id for t in batch) and batch[0].id > after
            after = batch[-1].id
            claimed += [t.task_id for t in batch]
        expected = [f"{system}-{i}" for i in range(40) if (system, i) != ("aicc", 7)]
        assert claimed == expected
    if store.is_postgres:
        return  # PostgreSQL plans from its statistics (the claim's own comment)
    claim = store._bulk.claim_due if due else store._bulk.claim_all
    sql, _ = claim.compiled(sqlite.dialect())
    async with store.engine.connect() as conn:
        params = ("w1", "x", 0, "aicc", "x", 7, 0) + (("x",) if due else ())
        plan = " / ".join(
            str(r[-1]) for r in await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params)
        )
    assert "INTEGER PRIMARY KEY (rowid>?)" in plan and "TEMP B-TREE" not in plan, plan


@pytest.mark.anyio
async def test_latest_payloads_are_index_lookups_of_the_exact_snapshots(
    database: Database, store: Store
) -> None:
    """The payload of each claimed task's current snapshot (not an older or newer one, not
    another system's task of the same id), found through the snapshots' unique index."""
    ids = ["t1", "4711", 'quote"d né', "t4"]
    for system in ("aicc", "koodrive"):
        await store.track(system, ids)
    at = stamp(datetime(2026, 12, 7, tzinfo=UTC), store.is_postgres)
    insert = insert_rows(
        store.insert(task_snapshots),
        ("system", "task_id", "seq", "fetched_at", "content_hash", "state", "payload"),
    )
    async with store.engine.begin() as conn:
        await insert.run(
            conn,
            [
                (system, task_id, seq, at, "h", "open", json_text({"of": [system, task_id, seq]}))
                for system in ("aicc", "koodrive")
                for task_id in ids
                for seq in (1, 2, 3)
            ],
        )
        rows = await conn.execute(sa.select(tasks.c.id, tasks.c.system, tasks.c.task_id))
        task_ids = {(r.system, r.task_id): r.id for r in rows}
    now = datetime.now(UTC)

    def claimed(system: str, task_id: str, seq: int) -> ClaimedTask:
        return ClaimedTask(task_ids[(system, task_id)], system, task_id, "h", seq, 0, now)  # type: ignore[arg-type]

    wanted = [
        claimed("aicc", "t1", 2),
        claimed("aicc", "4711", 3),
        claimed("aicc", 'quote"d né', 1),
        claimed("koodrive", "4711", 1),
        claimed("koodrive", "t4", 0),  # no snapshot yet: nothing to look up
        claimed("koodrive", "t1", 4),  # not stored (yet): absent
    ]
    found = await store.latest_payloads(wanted)
    assert found == {t.id: {"of": [t.system, t.task_id, t.snapshot_seq]} for t in wanted[:4]}
    if store.is_postgres:
        return  # PostgreSQL chooses by its statistics (an index search at any real size)
    async with store.engine.connect() as conn:
        sql = str(store._latest_payloads.compile(dialect=conn.dialect))
        explained = await conn.exec_driver_sql(
            f"EXPLAIN QUERY PLAN {sql}", ("[]", "$[0]", "$[1]", "$[2]")
        )
        plan = " / ".join(str(r[-1]) for r in explained)
    assert "SCAN task_snapshots" not in plan and "USING INDEX" in plan, plan


@pytest.mark.anyio
async def test_sqlite_transactions_take_turns_on_one_connection(
    database: Database, store: Store
) -> None:
    """SQLite runs one transaction at a time (each begins IMMEDIATE), so concurrent ones wait
    for the one connection in the pool's queue instead of sleeping in SQLite's busy handler on
    connections of their own; all of them complete."""
    if store.is_postgres:
        pytest.skip("PostgreSQL runs transactions side by side on a pool of connections")
    opened: list[object] = []
    sa.event.listen(store.engine.sync_engine, "connect", lambda conn, _: opened.append(conn))

    async def track(n: int) -> None:
        async with store.engine.begin() as conn:
            await conn.execute(sa.text("SELECT count(*) FROM tasks"))
            await anyio.sleep(0.01)  # hold the transaction across a switch to the others
            await conn.execute(
                tasks.insert().values(
                    system="aicc", task_id=f"t{n}", next_poll_at=datetime.now(UTC)
                )
            )

    async with anyio.create_task_group() as tg:
        for n in range(20):
            tg.start_soon(track, n)
    assert len(opened) <= 1
    async with store.engine.connect() as conn:
        assert await conn.scalar(sa.select(sa.func.count()).select_from(tasks)) == 20


@pytest.mark.anyio
async def test_an_in_memory_sqlite_database_keeps_its_static_connection() -> None:
    """The one-connection pool is for files: `sqlite:///:memory:` has its own static pool (and
    would refuse a pool size)."""
    engine = create_engine("sqlite:///:memory:")
    try:
        async with engine.connect() as conn:
            assert await conn.scalar(sa.text("SELECT 1")) == 1
    finally:
        await engine.dispose()
