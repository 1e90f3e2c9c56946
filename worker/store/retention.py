"""Retention: what `prune` deletes, in short batches, and what `status` reports about it.

Each rule is one SQL predicate over its table, used both to delete (a real prune) and to count
(`--dry-run`, which ORs the rules of a table so a row two rules cover is counted once, as a real
prune deletes it once).

Every batch is its own short transaction. On PostgreSQL a batch picks its rows with
`FOR UPDATE SKIP LOCKED`, so two pruners split the work instead of queueing behind each other,
and no batch deletes a row another one is deleting. Lock order is fixed (task rows first, then
their children) and the only batches that wait on another pruner (an untracked task's children
locked by a snapshot or event batch) wait on a single-statement transaction that itself waits on
nobody, so pruners cannot deadlock. Sync and the action runner never update the rows a prune
deletes (old snapshots and events are append-only; finished actions are not claimed), except
`retry` of a failed action: it either waits for the batch or re-checks `status` and is skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import anyio
import sqlalchemy as sa

from worker.store.base import StoreBase, utcnow
from worker.store.schema import (
    action_attempts,
    actions,
    prune_runs,
    sync_runs,
    task_events,
    task_snapshots,
    tasks,
)

# The tables a prune deletes from, in the order `prune` reports them.
PRUNED_TABLES = (
    "task_snapshots",
    "task_events",
    "actions",
    "action_attempts",
    "sync_runs",
    "tasks",
)
FINISHED = ("succeeded", "failed", "canceled")
OPEN = ("pending", "running")
# An untracked task takes all its rows with it: a batch locks this many tasks per 100 rows of
# batch size (a task carries a few dozen snapshots and events on average).
TASKS_PER_100_ROWS = 1
SQLITE_PAUSE = 0.1  # between two batches on SQLite: see RetentionStore._between_batches


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """Ages in seconds (None: keep for ever) and the rows per delete transaction."""

    snapshots: float | None = None
    events: float | None = None
    actions: float | None = None
    sync_runs: float | None = None
    untracked: float | None = None
    batch_size: int = 2000

    @property
    def configured(self) -> bool:
        return any(
            v is not None
            for v in (self.snapshots, self.events, self.actions, self.sync_runs, self.untracked)
        )


@dataclass(frozen=True, slots=True)
class _Cutoffs:
    snapshots: datetime | None
    events: datetime | None
    actions: datetime | None
    sync_runs: datetime | None
    untracked: datetime | None


def _cutoffs(policy: RetentionPolicy, now: datetime) -> _Cutoffs:
    def cut(age: float | None) -> datetime | None:
        return None if age is None else now - timedelta(seconds=age)

    return _Cutoffs(
        cut(policy.snapshots),
        cut(policy.events),
        cut(policy.actions),
        cut(policy.sync_runs),
        cut(policy.untracked),
    )


# -- the rules ---------------------------------------------------------------------------------


def _expired_untracked(t: Any, cutoff: datetime) -> sa.ColumnElement[bool]:
    """An untracked task whose rows may all go: untracked long enough, and no open action (an
    open action keeps its task, or it would be applied to a task nobody tracks any more)."""
    a = actions.alias("open_a")
    has_open = (
        sa.exists()
        .where(a.c.system == t.c.system, a.c.task_id == t.c.task_id, a.c.status.in_(OPEN))
        .correlate(t)
    )
    return sa.and_(sa.not_(t.c.tracked), t.c.untracked_at < cutoff, ~has_open)


def _of_expired_untracked(child: sa.Table, cutoff: datetime) -> sa.ColumnElement[bool]:
    t = tasks.alias("gone_t")
    return (
        sa.exists()
        .where(t.c.system == child.c.system, t.c.task_id == child.c.task_id)
        .where(_expired_untracked(t, cutoff))
        .correlate(child)
    )


def _old_snapshot(cutoff: datetime) -> sa.ColumnElement[bool]:
    s = task_snapshots
    t = tasks.alias("newest_t")
    newest = (
        sa.exists()
        .where(t.c.system == s.c.system, t.c.task_id == s.c.task_id, t.c.snapshot_seq == s.c.seq)
        .correlate(s)
    )
    return sa.and_(s.c.fetched_at < cutoff, ~newest)


def _old_action(cutoff: datetime) -> sa.ColumnElement[bool]:
    return sa.and_(actions.c.status.in_(FINISHED), actions.c.finished_at < cutoff)


def _untracked_action(cutoff: datetime) -> sa.ColumnElement[bool]:
    return sa.and_(actions.c.status.in_(FINISHED), _of_expired_untracked(actions, cutoff))


def _rules(c: _Cutoffs) -> dict[str, list[sa.ColumnElement[bool]]]:
    """Every rule, per table: what a dry run counts."""
    rules: dict[str, list[sa.ColumnElement[bool]]] = {name: [] for name in PRUNED_TABLES}
    if c.snapshots is not None:
        rules["task_snapshots"].append(_old_snapshot(c.snapshots))
    if c.events is not None:
        rules["task_events"].append(task_events.c.observed_at < c.events)
    if c.actions is not None:
        rules["actions"].append(_old_action(c.actions))
    if c.sync_runs is not None:
        rules["sync_runs"].append(sync_runs.c.started_at < c.sync_runs)
    if c.untracked is not None:
        rules["task_snapshots"].append(_of_expired_untracked(task_snapshots, c.untracked))
        rules["task_events"].append(_of_expired_untracked(task_events, c.untracked))
        rules["actions"].append(_untracked_action(c.untracked))
        rules["tasks"].append(_expired_untracked(tasks, c.untracked))
    if rules["actions"]:
        # attempts go with their action
        rules["action_attempts"].append(
            sa.exists()
            .select_from(actions)
            .where(actions.c.id == action_attempts.c.action_id, sa.or_(*rules["actions"]))
            .correlate(action_attempts)
        )
    return rules


# -- the store ---------------------------------------------------------------------------------

Progress = Callable[[], None]
ShouldStop = Callable[[], bool]


class RetentionStore(StoreBase):
    async def prune(
        self,
        policy: RetentionPolicy,
        worker: str,
        *,
        dry_run: bool = False,
        now: datetime | None = None,
        progress: Progress | None = None,
        should_stop: ShouldStop | None = None,
    ) -> dict[str, int]:
        """Delete (or, dry, count) what the policy lets go. Rows per table, every table named.

        A real prune is recorded in `prune_runs` (updated after each rule, so an interrupted
        one shows what it did); `should_stop` is asked between batches."""
        now = now or utcnow()
        cut = _cutoffs(policy, now)
        if dry_run:
            return await self._count(cut)
        beat = progress or (lambda: None)
        stop = should_stop or (lambda: False)
        done = dict.fromkeys(PRUNED_TABLES, 0)
        run_id = await self._record(worker, now, done, None, None)
        steps: list[tuple[datetime | None, Callable[..., Any]]] = [
            (cut.snapshots, self._prune_snapshots),
            (cut.events, self._prune_events),
            (cut.actions, self._prune_actions),
            (cut.sync_runs, self._prune_sync_runs),
            (cut.untracked, self._prune_untracked),
        ]
        if cut.untracked is not None:
            await self._start_untracked_clocks(now)
        for cutoff, step in steps:
            if cutoff is None or stop():
                continue
            await step(cutoff, policy.batch_size, done, beat, stop)
            await self._record(worker, now, done, run_id, None)
        # finished_at stays NULL for a prune cut short (a daemon asked to stop)
        await self._record(worker, now, done, run_id, None if stop() else utcnow())
        return done

    # -- counting (dry run) --------------------------------------------------------------

    async def _count(self, cut: _Cutoffs) -> dict[str, int]:
        tables = {
            "task_snapshots": task_snapshots,
            "task_events": task_events,
            "actions": actions,
            "action_attempts": action_attempts,
            "sync_runs": sync_runs,
            "tasks": tasks,
        }
        counts = dict.fromkeys(PRUNED_TABLES, 0)
        async with self.engine.connect() as conn:
            for name, rules in _rules(cut).items():
                if rules:
                    query = sa.select(sa.func.count()).select_from(tables[name])
                    counts[name] = int(await conn.scalar(query.where(sa.or_(*rules))) or 0)
        return counts

    # -- deleting ------------------------------------------------------------------------

    async def _batches(
        self,
        table: sa.Table,
        where: sa.ColumnElement[bool],
        size: int,
        beat: Progress,
        stop: ShouldStop,
    ) -> int:
        """Delete the rows matching `where` in id order, one short transaction per batch."""
        total, after = 0, 0
        while not stop():
            pick = self.skip_locked(
                sa.select(table.c.id)
                .where(where, table.c.id > after)
                .order_by(table.c.id)
                .limit(size)
            )
            # one statement: pick (locking, skipping what another pruner holds) and delete
            delete = table.delete().where(self._one_of(table.c.id, pick))
            async with self.engine.begin() as conn:
                ids = (await conn.scalars(delete.returning(table.c.id))).all()
            if not ids:
                return total
            total += len(ids)
            after = max(ids)
            beat()
            await self._between_batches()
        return total

    async def _between_batches(self) -> None:
        """SQLite has one write lock, and a writer waiting for it sleeps in steps of up to
        100 ms (its busy handler): a pruner that began its next batch at once would take the
        lock again before the sync loop woke, batch after batch (the benchmark measured a
        cycle delayed by seconds). A pause of one such step lets every waiter in first."""
        if not self.is_postgres:
            await anyio.sleep(SQLITE_PAUSE)

    def _one_of(self, column: sa.Column[Any], pick: sa.Select[Any]) -> sa.ColumnElement[bool]:
        """`id IN (subquery)`, which PostgreSQL plans as a hash join over a scan of the whole
        table (every batch would read every row); `id = ANY(ARRAY(subquery))` looks each id up
        in the primary key. SQLite looks IN up by rowid already."""
        if self.is_postgres:
            return column == sa.any_(sa.func.array(pick.scalar_subquery()))
        return column.in_(pick.scalar_subquery())

    async def _prune_snapshots(
        self, cutoff: datetime, size: int, done: dict[str, int], beat: Progress, stop: ShouldStop
    ) -> None:
        done["task_snapshots"] += await self._batches(
            task_snapshots, _old_snapshot(cutoff), size, beat, stop
        )

    async def _prune_events(
        self, cutoff: datetime, size: int, done: dict[str, int], beat: Progress, stop: ShouldStop
    ) -> None:
        done["task_events"] += await self._batches(
            task_events, task_events.c.observed_at < cutoff, size, beat, stop
        )

    async def _prune_sync_runs(
        self, cutoff: datetime, size: int, done: dict[str, int], beat: Progress, stop: ShouldStop
    ) -> None:
        done["sync_runs"] += await self._batches(
            sync_runs, sync_runs.c.started_at < cutoff, size, beat, stop
        )

    async def _prune_actions(
        self, cutoff: datetime, size: int, done: dict[str, int], beat: Progress, stop: ShouldStop
    ) -> None:
        after = 0
        while not stop():
            pick = self.skip_locked(
                sa.select(actions.c.id)
                .where(_old_action(cutoff), actions.c.id > after)
                .order_by(actions.c.id)
                .limit(size)
            )
            async with self.engine.begin() as conn:
                ids = (await conn.scalars(pick)).all()
                if ids:
                    await self._delete_actions(conn, list(ids), done)
            if not ids:
                return
            after = max(ids)
            beat()
            await self._between_batches()

    async def _delete_actions(self, conn: Any, ids: list[int], done: dict[str, int]) -> None:
        # attempts explicitly (not by the foreign key's cascade), so they can be counted
        gone = await conn.execute(
            action_attempts.delete().where(action_attempts.c.action_id.in_(ids))
        )
        done["action_attempts"] += int(gone.rowcount)
        gone = await conn.execute(actions.delete().where(actions.c.id.in_(ids)))
        done["actions"] += int(gone.rowcount)

    async def _start_untracked_clocks(self, now: datetime) -> None:
        """Rows untracked by hand (an SQL UPDATE) carry no untracked_at: their clock starts at
        the first prune that sees them."""
        async with self.engine.begin() as conn:
            await conn.execute(
                tasks.update()
                .where(sa.not_(tasks.c.tracked), tasks.c.untracked_at.is_(None))
                .values(untracked_at=now)
            )

    async def _prune_untracked(
        self, cutoff: datetime, size: int, done: dict[str, int], beat: Progress, stop: ShouldStop
    ) -> None:
        per_batch = max(1, size * TASKS_PER_100_ROWS // 100)
        after = 0
        while not stop():
            # The task rows are locked first and for the whole batch: `track` and `enqueue`
            # update a task before they insert it, so one that races this batch waits, finds
            # the row gone, and inserts it anew.
            pick = self.skip_locked(
                sa.select(tasks.c.id, tasks.c.system, tasks.c.task_id)
                .where(_expired_untracked(tasks, cutoff), tasks.c.id > after)
                .order_by(tasks.c.id)
                .limit(per_batch)
            )
            async with self.engine.begin() as conn:
                picked = (await conn.execute(pick)).all()
                if picked:
                    await self._delete_tasks(conn, picked, done)
            if not picked:
                return
            after = max(int(r[0]) for r in picked)
            beat()
            await self._between_batches()

    async def _delete_tasks(self, conn: Any, picked: list[Any], done: dict[str, int]) -> None:
        pairs = [(str(r[1]), str(r[2])) for r in picked]
        for name, table in (("task_snapshots", task_snapshots), ("task_events", task_events)):
            gone = await conn.execute(
                table.delete().where(sa.tuple_(table.c.system, table.c.task_id).in_(pairs))
            )
            done[name] += int(gone.rowcount)
        finished = (
            await conn.scalars(
                sa.select(actions.c.id).where(
                    sa.tuple_(actions.c.system, actions.c.task_id).in_(pairs),
                    actions.c.status.in_(FINISHED),
                )
            )
        ).all()
        if finished:
            await self._delete_actions(conn, list(finished), done)
        gone = await conn.execute(tasks.delete().where(tasks.c.id.in_([int(r[0]) for r in picked])))
        done["tasks"] += int(gone.rowcount)

    async def _record(
        self,
        worker: str,
        started: datetime,
        deleted: dict[str, int],
        run_id: int | None,
        finished: datetime | None,
    ) -> int:
        async with self.engine.begin() as conn:
            if run_id is None:
                new_id = await conn.scalar(
                    prune_runs.insert()
                    .values(worker=worker, started_at=started, deleted=dict(deleted))
                    .returning(prune_runs.c.id)
                )
                return int(new_id)
            await conn.execute(
                prune_runs.update()
                .where(prune_runs.c.id == run_id)
                .values(deleted=dict(deleted), finished_at=finished)
            )
            return run_id

    # -- space ---------------------------------------------------------------------------

    async def database_size(self) -> int:
        """Bytes the database takes: the SQLite file's pages, or PostgreSQL's database."""
        async with self.engine.connect() as conn:
            if self.is_postgres:
                return int(
                    await conn.scalar(sa.text("SELECT pg_database_size(current_database())"))
                )
            pages = await conn.scalar(sa.text("PRAGMA page_count"))
            page_size = await conn.scalar(sa.text("PRAGMA page_size"))
            return int(pages or 0) * int(page_size or 0)

    async def vacuum(self) -> None:
        """SQLite: VACUUM rewrites the file without the free pages (the space goes back to the
        file system). PostgreSQL: a plain VACUUM ANALYZE of the pruned tables makes the space
        reusable without the exclusive lock of VACUUM FULL, which would stop the sync loop."""
        async with self.engine.connect() as conn:
            if self.is_postgres:
                auto = await conn.execution_options(isolation_level="AUTOCOMMIT")
                for name in PRUNED_TABLES:
                    await auto.exec_driver_sql(f"VACUUM (ANALYZE) {name}")
                return
            # VACUUM cannot run in a transaction, and this engine begins every transaction with
            # BEGIN IMMEDIATE: use the driver's connection directly (its autocommit mode).
            raw = await conn.get_raw_connection()
            driver = raw.driver_connection
            assert driver is not None
            await driver.execute("VACUUM")
            await driver.execute("PRAGMA wal_checkpoint(TRUNCATE)")


# -- for `status` ------------------------------------------------------------------------------


async def table_rows(conn: Any) -> dict[str, int]:
    """Rows per table (exact counts)."""
    counted = {
        "tasks": tasks,
        "task_snapshots": task_snapshots,
        "task_events": task_events,
        "actions": actions,
        "action_attempts": action_attempts,
        "sync_runs": sync_runs,
        "prune_runs": prune_runs,
    }
    out = {}
    for name, table in counted.items():
        out[name] = int(await conn.scalar(sa.select(sa.func.count()).select_from(table)) or 0)
    return out


async def last_prune(conn: Any) -> dict[str, Any] | None:
    row = (
        await conn.execute(sa.select(prune_runs).order_by(prune_runs.c.id.desc()).limit(1))
    ).first()
    if row is None:
        return None
    found = dict(row._mapping)
    deleted = found["deleted"] if isinstance(found["deleted"], dict) else {}
    # in the order `prune` prints (JSONB keeps its own key order)
    found["deleted"] = {t: int(deleted.get(t, 0)) for t in PRUNED_TABLES}
    return found
