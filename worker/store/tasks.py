"""Tracked tasks: tracking, claiming due work, and writing poll results in batches."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any

import sqlalchemy as sa
from sqlalchemy.sql.elements import UnaryExpression
from sqlalchemy.sql.operators import custom_op

from worker.model import JSON, Event, System
from worker.store.base import StoreBase, utcnow
from worker.store.bulk import Bulk, Row, id_list, in_id_list, insert_rows, json_text, stamp
from worker.store.events import lock_event_order, notify_events
from worker.store.schema import UTCDateTime, task_events, task_snapshots, tasks


@dataclass(frozen=True, slots=True)
class ClaimedTask:
    id: int
    system: System
    task_id: str
    content_hash: str | None
    snapshot_seq: int
    consecutive_failures: int
    seen_next_poll_at: datetime  # at the claim: a re-poll set while we hold the task wins
    state: str | None = None  # of the stored snapshot: an unchanged poll keeps it


@dataclass(slots=True)
class PollResult:
    """What one poll of one claimed task produced, ready to be written."""

    task: ClaimedTask
    polled_at: datetime
    next_poll_at: datetime
    # set when the content changed:
    payload: JSON = None
    payload_json: str | None = None  # the payload's JSON text, when it was made already
    content_hash: str | None = None
    status: str | None = None
    state: str | None = None
    title: str | None = None
    events: list[Event] = field(default_factory=list)
    # set when the poll failed:
    error: str | None = None
    not_found: bool = False
    # set when nothing was sent (circuit open, rate paused): the task is only released
    deferred: bool = False

    @property
    def changed(self) -> bool:
        return self.error is None and not self.deferred and self.content_hash is not None


class TaskStore(StoreBase):
    async def track(self, system: str, task_ids: Iterable[str], now: datetime | None = None) -> int:
        """Track tasks (idempotent). Returns how many were not tracked before."""
        now = now or utcnow()
        ids = list(dict.fromkeys(task_ids))
        if not ids:
            return 0
        async with self.engine.begin() as conn:
            before = await conn.scalar(
                sa.select(sa.func.count())
                .select_from(tasks)
                .where(tasks.c.system == system, tasks.c.task_id.in_(ids), tasks.c.tracked)
            )
            # update before insert: a prune deleting one of these untracked tasks holds its
            # row, so the update waits, finds it gone, and the insert below brings it back
            await conn.execute(
                tasks.update()
                .where(tasks.c.system == system, tasks.c.task_id.in_(ids), sa.not_(tasks.c.tracked))
                .values(tracked=True, next_poll_at=now, not_found=False)
            )
            await conn.execute(
                self.insert(tasks).on_conflict_do_nothing(),
                [
                    {"system": system, "task_id": t, "first_seen_at": now, "next_poll_at": now}
                    for t in ids
                ],
            )
        return len(ids) - int(before or 0)

    async def track_many(
        self, pairs: Sequence[tuple[str, str]], now: datetime | None = None
    ) -> int:
        """Track discovered (system, task_id) pairs; returns how many rows were new."""
        now = now or utcnow()
        if not pairs:
            return 0
        async with self.engine.begin() as conn:
            result = await conn.execute(
                self.insert(tasks).on_conflict_do_nothing().returning(tasks.c.id),
                [
                    {"system": s, "task_id": t, "first_seen_at": now, "next_poll_at": now}
                    for s, t in pairs
                ],
            )
            return len(result.all())

    async def untrack(self, system: str, task_ids: Iterable[str]) -> int:
        ids = list(dict.fromkeys(task_ids))
        async with self.engine.begin() as conn:
            result = await conn.execute(
                tasks.update()
                .where(tasks.c.system == system, tasks.c.task_id.in_(ids), tasks.c.tracked)
                .values(tracked=False, lease_owner=None, lease_until=None, untracked_at=utcnow())
            )
        return int(result.rowcount)

    async def claim_tasks(
        self,
        worker: str,
        *,
        after_id: int,
        limit: int,
        lease: float,
        due_before: datetime | None,
        system: System,
        now: datetime | None = None,
    ) -> list[ClaimedTask]:
        """Lease up to `limit` tracked tasks of `system` with id > after_id, in id order.

        `due_before=None` claims every tracked task (sync --all). Tasks leased by a live worker
        are skipped; an expired lease (a worker that died) is taken over.
        """
        now = now or utcnow()
        pg = self.is_postgres
        claim = self._bulk.claim_all if due_before is None else self._bulk.claim_due
        params: Row = (
            worker,
            stamp(now + timedelta(seconds=lease), pg),
            after_id,
            system,
            stamp(now, pg),
            limit,
            0,
        )
        if due_before is not None:
            params += (stamp(due_before, pg),)
        async with self.engine.begin() as conn:
            rows = await claim.rows(conn, params)
        read_time = _read_time if pg else _read_sqlite_time
        claimed = [
            ClaimedTask(
                int(r[0]), system, str(r[1]), r[2], int(r[3]), int(r[4]), read_time(r[5]), r[6]
            )
            for r in rows
        ]
        claimed.sort(key=lambda t: t.id)
        return claimed

    async def count_due(
        self, systems: Sequence[str], *, all_tasks: bool, now: datetime | None = None
    ) -> int:
        query = (
            sa.select(sa.func.count())
            .select_from(tasks)
            .where(tasks.c.tracked, tasks.c.system.in_(systems))
        )
        if not all_tasks:
            query = query.where(tasks.c.next_poll_at <= (now or utcnow()))
        async with self.engine.connect() as conn:
            return int(await conn.scalar(query) or 0)

    async def latest_payloads(self, claimed: Sequence[ClaimedTask]) -> dict[int, JSON]:
        """The stored payload of each task's newest snapshot, keyed by tasks.id.

        The keys are one parameter joined to the snapshots' unique index, so each lookup is an
        index search whatever the table's size. (`(system, task_id, seq) IN (VALUES ...)` was
        a scan of every snapshot on SQLite, and a hash join over them on PostgreSQL, for every
        batch with a change: its cost grew with the history kept.)"""
        wanted = [t for t in claimed if t.snapshot_seq > 0]
        if not wanted:
            return {}
        keys = {(t.system, t.task_id, t.snapshot_seq): t.id for t in wanted}
        if self.is_postgres:
            params: dict[str, Any] = {
                "systems": [k[0] for k in keys],
                "task_ids": [k[1] for k in keys],
                "seqs": [k[2] for k in keys],
            }
        else:
            params = {"keys": json_text(list(keys))}
        async with self.engine.connect() as conn:
            rows = (await conn.execute(self._latest_payloads, params)).all()
        return {keys[(s, t, q)]: payload for s, t, q, payload in rows}

    @cached_property
    def _latest_payloads(self) -> sa.Select[Any]:
        b = sa.bindparam
        snapshots = task_snapshots.c
        if self.is_postgres:
            keys = (
                sa.func.unnest(
                    b("systems", type_=sa.ARRAY(sa.String())),
                    b("task_ids", type_=sa.ARRAY(sa.String())),
                    b("seqs", type_=sa.ARRAY(sa.Integer())),
                )
                .table_valued("system", "task_id", "seq", name="wanted")
                .render_derived()
            )
            key: tuple[Any, ...] = (keys.c.system, keys.c.task_id, keys.c.seq)
        else:
            listed = sa.func.json_each(b("keys", type_=sa.String())).table_valued(
                "value", name="wanted"
            )
            key = tuple(sa.func.json_extract(listed.c.value, f"$[{i}]") for i in range(3))
            keys = listed
        matches = sa.and_(
            snapshots.system == key[0], snapshots.task_id == key[1], snapshots.seq == key[2]
        )
        return sa.select(
            snapshots.system, snapshots.task_id, snapshots.seq, snapshots.payload
        ).select_from(keys.join(task_snapshots, matches))

    async def write_results(self, worker: str, results: Sequence[PollResult]) -> None:
        """Write one batch of poll results in one transaction: snapshots and events (which
        do nothing on conflict, so a repeated or raced cycle adds nothing) and task rows.

        A result is written only while this worker still holds the task's lease: a worker that
        was frozen past its lease must not store a snapshot over the one of the worker that
        took the task over (its older content would take the next sequence number)."""
        async with self.engine.begin() as conn:
            owned = await self._still_owned(conn, worker, [r.task for r in results if r.changed])
            await self._write(
                conn, worker, [r for r in results if not r.changed or r.task.id in owned]
            )

    async def _still_owned(
        self, conn: Any, worker: str, claimed: Sequence[ClaimedTask]
    ) -> set[int]:
        if not claimed:
            return set()
        ids = id_list([t.id for t in claimed], self.is_postgres)
        seqs = {row[0]: row[1] for row in await self._bulk.owned.rows(conn, (ids, worker))}
        return {t.id for t in claimed if seqs.get(t.id) == t.snapshot_seq}

    @cached_property
    def _bulk(self) -> _BulkWrites:
        return _BulkWrites.build(self)

    async def _write(self, conn: Any, worker: str, results: Sequence[PollResult]) -> None:
        pg = self.is_postgres
        bulk = self._bulk
        stamps: dict[datetime, Any] = {}  # a batch shares one or two times: convert each once

        def at(moment: datetime) -> Any:
            found = stamps.get(moment)
            if found is None:
                found = stamps[moment] = stamp(moment, pg)
            return found

        snapshots: list[Row] = []
        events: list[Row] = []
        changed: list[Row] = []
        # Unchanged rows get the same values per (polled, next poll) -- one or two groups per
        # batch -- so each group is one set-based UPDATE rather than a row-by-row executemany.
        unchanged: dict[tuple[datetime, datetime, datetime], list[int]] = {}
        failed: list[Row] = []
        deferred: list[int] = []
        for r in results:
            t = r.task
            if r.deferred:
                deferred.append(t.id)
            elif r.error is not None:
                failed.append(
                    (
                        t.id,
                        worker,
                        at(r.polled_at),
                        at(t.seen_next_poll_at),
                        at(r.next_poll_at),
                        r.error,
                        t.consecutive_failures + 1,
                        r.not_found,
                    )
                )
            elif r.changed:
                seq = t.snapshot_seq + 1
                polled = at(r.polled_at)
                snapshots.append(
                    (
                        t.system,
                        t.task_id,
                        seq,
                        polled,
                        r.content_hash,
                        r.status,
                        r.state,
                        r.payload_json if r.payload_json is not None else json_text(r.payload),
                    )
                )
                events.extend(
                    (
                        t.system,
                        t.task_id,
                        str(e.kind),
                        e.dedup_key,
                        seq,
                        stamp(e.occurred_at, pg),
                        polled,
                        json_text(dict(e.data)),
                    )
                    for e in r.events
                )
                # last_changed_at is when tasksync saw the change; the upstream's own update
                # time stays in the payload (and in the events' occurred_at)
                changed.append(
                    (
                        t.id,
                        worker,
                        polled,
                        at(t.seen_next_poll_at),
                        at(r.next_poll_at),
                        r.status,
                        r.state,
                        r.title,
                        r.content_hash,
                        seq,
                    )
                )
            else:
                unchanged.setdefault((r.polled_at, r.next_poll_at, t.seen_next_poll_at), []).append(
                    t.id
                )
        await bulk.snapshots.run(conn, snapshots)
        await bulk.changed.run(conn, changed)
        for (polled, next_poll, seen), ids in unchanged.items():
            await bulk.unchanged.run(
                conn, [(id_list(ids, pg), worker, at(polled), at(seen), at(next_poll))]
            )
        if deferred:
            await bulk.release.run(conn, [(id_list(deferred, pg), worker)])
        await bulk.failed.run(conn, failed)
        if events and pg:
            # Last: from here to the commit, other workers' batches wait for the event-order
            # lock (store/events.py), so it covers only what needs it. Taken first, it made the
            # whole of every batch's write wait its turn: a first cycle of 18,000 tasks took
            # 3.80 s instead of 3.45 (medians of 9 alternated runs, bench/README.md). No
            # deadlock: whoever holds the lock only inserts events of tasks it holds (their
            # rows locked by `_still_owned` before anything else) and commits.
            await lock_event_order(conn)
            # one NOTIFY per transaction that stored events, naming the highest new id: under
            # the lock every id above `before` is ours
            before = await conn.scalar(sa.select(sa.func.max(task_events.c.id)))
            await bulk.events.run(conn, events)
            after = await conn.scalar(sa.select(sa.func.max(task_events.c.id)))
            if after is not None and (before is None or after > before):
                await notify_events(conn, int(after))
        else:
            await bulk.events.run(conn, events)

    async def renew_task_leases(self, worker: str, ids: Sequence[int], lease: float) -> None:
        if not ids:
            return
        async with self.engine.begin() as conn:
            await conn.execute(
                tasks.update()
                .where(tasks.c.id.in_(list(ids)), tasks.c.lease_owner == worker)
                .values(lease_until=utcnow() + timedelta(seconds=lease))
            )

    async def release_tasks(self, worker: str, ids: Sequence[int]) -> None:
        if not ids:
            return
        async with self.engine.begin() as conn:
            await conn.execute(
                tasks.update()
                .where(tasks.c.id.in_(list(ids)), tasks.c.lease_owner == worker)
                .values(lease_owner=None, lease_until=None)
            )


# The columns of a batch of events, in the order of its rows (TaskStore._write builds them)
EVENT_COLUMNS = (
    "system",
    "task_id",
    "kind",
    "dedup_key",
    "snapshot_seq",
    "occurred_at",
    "observed_at",
    "data",
)


@dataclass(frozen=True)
class _BulkWrites:
    """The batch statements of a poll write (worker/store/bulk.py): rows are tuples."""

    snapshots: Bulk
    events: Bulk
    changed: Bulk
    failed: Bulk
    claim_all: Bulk
    claim_due: Bulk
    unchanged: Bulk  # one statement for a group of task ids
    release: Bulk
    owned: Bulk  # which of the ids this worker still holds, with their snapshot_seq

    @classmethod
    def build(cls, store: StoreBase) -> _BulkWrites:
        b = sa.bindparam
        time = UTCDateTime()
        mine = sa.and_(tasks.c.id == b("id"), tasks.c.lease_owner == b("worker"))
        # constants as SQL, not parameters: every row binds exactly the names below
        release = {"lease_owner": sa.null(), "lease_until": sa.null()}
        ok = {"last_error": sa.null(), "consecutive_failures": sa.literal_column("0")}
        sooner = _keep_sooner(b("seen", type_=time), b("next", type_=time))
        changed = (
            tasks.update()
            .where(mine)
            .values(
                status=b("status"),
                state=b("state"),
                title=b("title"),
                content_hash=b("hash"),
                snapshot_seq=b("seq"),
                last_polled_at=b("polled", type_=time),
                last_changed_at=b("polled", type_=time),
                next_poll_at=sooner,
                not_found=sa.false(),
                **ok,
                **release,
            )
        )
        listed = sa.and_(in_id_list(store, tasks.c.id), tasks.c.lease_owner == b("worker"))
        unchanged = (
            tasks.update()
            .where(listed)
            .values(
                last_polled_at=b("polled", type_=time),
                next_poll_at=sooner,
                not_found=sa.false(),
                **ok,
                **release,
            )
        )
        owned = sa.select(tasks.c.id, tasks.c.snapshot_seq).where(listed)
        if store.is_postgres:
            owned = owned.with_for_update()
        failed = (
            tasks.update()
            .where(mine)
            .values(
                last_polled_at=b("polled", type_=time),
                next_poll_at=sooner,
                last_error=b("error"),
                consecutive_failures=b("failures"),
                not_found=b("not_found"),
                **release,
            )
        )
        common = ("id", "worker", "polled", "seen", "next")
        claim = ("worker", "lease_until", "after", "system", "now", "limit", "offset")
        return cls(
            claim_all=Bulk(_claim(store, due=False), claim),
            # FOR UPDATE on PostgreSQL: held until the rows are written
            owned=Bulk(owned, ("ids", "worker")),
            unchanged=Bulk(unchanged, ("ids", "worker", "polled", "seen", "next")),
            release=Bulk(tasks.update().where(listed).values(**release), ("ids", "worker")),
            claim_due=Bulk(_claim(store, due=True), (*claim, "due")),
            snapshots=insert_rows(
                store.insert(task_snapshots).on_conflict_do_nothing(),
                (
                    "system",
                    "task_id",
                    "seq",
                    "fetched_at",
                    "content_hash",
                    "status",
                    "state",
                    "payload",
                ),
            ),
            events=insert_rows(store.insert(task_events).on_conflict_do_nothing(), EVENT_COLUMNS),
            changed=Bulk(changed, (*common, "status", "state", "title", "hash", "seq")),
            failed=Bulk(failed, (*common, "error", "failures", "not_found")),
        )


def _claim(store: StoreBase, *, due: bool) -> Any:
    b = sa.bindparam
    time = UTCDateTime()
    tracked, system = tasks.c.tracked, tasks.c.system
    if not store.is_postgres:
        tracked, system = _unindexed(tracked), _unindexed(system)
    candidates = (
        sa.select(tasks.c.id)
        .where(
            tracked,
            tasks.c.id > b("after", type_=sa.BigInteger()),
            system == b("system", type_=sa.String()),
            sa.or_(tasks.c.lease_until.is_(None), tasks.c.lease_until < b("now", type_=time)),
        )
        .order_by(tasks.c.id)
        .limit(b("limit", type_=sa.Integer()))
        .offset(b("offset", type_=sa.Integer()))  # SQLite renders one with a bound LIMIT
    )
    if due:
        candidates = candidates.where(tasks.c.next_poll_at <= b("due", type_=time))
    chosen = store.skip_locked(candidates).scalar_subquery()
    if store.is_postgres:
        # = ANY(array(subquery)): the chosen ids are an InitPlan, and the update finds them by
        # primary key. With IN (subquery), the generic plan that a prepared statement settles
        # on after five runs hash-joins the whole table: 21 ms a claim instead of 4 at 18,000
        # tasks (EXPLAIN ANALYZE under plan_cache_mode = force_generic_plan).
        picked = tasks.c.id == sa.any_(sa.func.array(chosen))
    else:
        picked = tasks.c.id.in_(chosen)
    return (
        tasks.update()
        .where(picked)
        .values(lease_owner=b("worker"), lease_until=b("lease_until", type_=time))
        .returning(
            tasks.c.id,
            tasks.c.task_id,
            tasks.c.content_hash,
            tasks.c.snapshot_seq,
            tasks.c.consecutive_failures,
            tasks.c.next_poll_at,
            tasks.c.state,
        )
    )


def _unindexed(column: sa.Column[Any]) -> Any:
    """`+column`: SQLite's documented way to keep a term from choosing an index.

    A claim walks the primary key from `after` and stops at `limit`, reading about three rows
    per claimed one (the systems interleave). Without statistics SQLite would rather read the
    candidates through the (tracked, next_poll_at) or (system, task_id) index and sort every
    one of them by id, for every batch: a cycle's claims then cost O(tasks² / batch), 0.40 s of
    SQLite's time in an 18,000-task `sync --all` against 0.09 s for the walk. Only where very
    few tasks are due is the index cheaper (3 against 14 ms a cycle at 1 % of 18,000), and the
    walk stays linear whatever the share."""
    return UnaryExpression(column, operator=custom_op("+"), type_=column.type)


def _read_time(value: datetime) -> datetime:
    return value.astimezone(UTC)


def _read_sqlite_time(value: str) -> datetime:
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


def _keep_sooner(seen: Any, planned: Any) -> Any:
    """The next poll this result plans, unless someone made the task due sooner while we held
    it (an action finished on it): that re-poll must not be pushed back by a stale fetch."""
    moved_sooner = sa.and_(tasks.c.next_poll_at != seen, tasks.c.next_poll_at < planned)
    return sa.case((moved_sooner, tasks.c.next_poll_at), else_=planned)
