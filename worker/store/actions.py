"""The action queue: enqueue, claim in per-task order, attempts and outcomes.

The steps the action runner takes for every set of actions (`claim_actions`, `baseline_inputs`,
`start_attempts`, `finish`) are batch statements (worker/store/bulk.py: built with SQLAlchemy
Core, compiled once per dialect, rows in the driver's form) run by `_transaction`: on SQLite a
whole transaction in one call into aiosqlite's thread, on PostgreSQL one statement per step.
Through SQLAlchemy's execution each step cost 1-3 ms of CPU whatever the size of the set (the
statement's construction and cache key, a bind processor per parameter, three or four hops to
aiosqlite's thread per statement), more than the requests they guard once sets are small. The
rest of the queue goes through SQLAlchemy as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from worker.model import JSON, ActionStatus, AttemptOutcome
from worker.store.base import StoreBase, as_dict, json_text, utcnow
from worker.store.bulk import Bulk, Row, id_list, in_id_list, stamp
from worker.store.bulk import json_text as json_value
from worker.store.schema import UTCDateTime, action_attempts, actions, task_snapshots, tasks

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

OPEN = (ActionStatus.PENDING, ActionStatus.RUNNING)
TERMINAL = (ActionStatus.SUCCEEDED, ActionStatus.FAILED)


@dataclass(frozen=True, slots=True)
class ClaimedAction:
    id: int
    system: str  # raw, like kind and params: a row inserted by SQL may hold anything
    task_id: str
    kind: str
    params_text: str | None
    attempts: int
    max_attempts: int | None
    baseline: int | None
    last_outcome: AttemptOutcome | None  # of the newest attempt; None: never tried, or below
    interrupted: bool = False  # the newest attempt has no outcome: its worker died mid-call

    @property
    def outcome_unknown(self) -> bool:
        """Whether the last attempt may have taken effect unseen: read back before sending."""
        return self.interrupted or self.last_outcome is AttemptOutcome.UNKNOWN


@dataclass(frozen=True, slots=True)
class Finish:
    """How an attempt (or a read-back) ended and what its action becomes: one row of
    `ActionStore.finish`, the one transition out of `running`."""

    action_id: int
    outcome: AttemptOutcome
    status: ActionStatus  # succeeded | pending | failed
    attempt_id: int | None = None  # the attempt row it ends; None when nothing was sent
    error: str | None = None
    http_status: int | None = None
    result: JSON = None
    next_attempt_at: datetime | None = None
    attempts: int | None = None  # set when a try that sent nothing still counts (a failed read)
    repoll: tuple[str, str] | None = None  # (system, task id) to poll next cycle on success


class BaselineInputs(NamedTuple):
    """What an action's baseline is computed from without asking the upstream: its task's
    newest snapshot, and the params of the actions of the same kind that succeeded on the task
    since that snapshot was taken (their effect may not be in it)."""

    payload: JSON
    done: list[JSON]


class ActionStore(StoreBase):
    async def enqueue(
        self,
        system: str,
        task_id: str,
        kind: str,
        params: Mapping[str, Any],
        key: str | None = None,
        max_attempts: int | None = None,
        now: datetime | None = None,
        requested_by: str | None = None,
    ) -> tuple[int, bool]:
        """Queue an action and track its task. Returns (id, created); with an idempotency key
        already used, the existing action's id and False. Without `requested_by` the column's
        default records the database role (PostgreSQL) or nothing (SQLite)."""
        now = now or utcnow()
        row = {
            "system": system,
            "task_id": task_id,
            "kind": kind,
            "params": dict(params),
            "idempotency_key": key,
            "max_attempts": max_attempts,
            "next_attempt_at": now,
            "created_at": now,
            "updated_at": now,
        }
        if requested_by is not None:
            row["requested_by"] = requested_by
        async with self.engine.begin() as conn:
            await conn.execute(  # an untracked task is tracked again (the contract's enqueue)
                tasks.update()
                .where(
                    tasks.c.system == system, tasks.c.task_id == task_id, sa.not_(tasks.c.tracked)
                )
                .values(tracked=True, next_poll_at=now)
            )
            await conn.execute(  # after the update: see TaskStore.track (a racing prune)
                self.insert(tasks).on_conflict_do_nothing(),
                {"system": system, "task_id": task_id, "first_seen_at": now, "next_poll_at": now},
            )
            insert = self.insert(actions).values(row)
            if key is not None:
                insert = insert.on_conflict_do_nothing(index_elements=["idempotency_key"])
            new_id = await conn.scalar(insert.returning(actions.c.id))
            if new_id is not None:
                return int(new_id), True
            existing = await conn.scalar(
                sa.select(actions.c.id).where(actions.c.idempotency_key == key)
            )
            assert existing is not None  # the conflict was on this key
            return int(existing), False

    async def get_action(self, action_id: int) -> dict[str, Any] | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(_action_columns().where(actions.c.id == action_id))).first()
        return as_dict(row) if row else None

    async def list_actions(
        self, status: str | None = None, limit: int = 1000
    ) -> list[dict[str, Any]]:
        query = _action_columns().order_by(actions.c.id.desc()).limit(limit)
        if status is not None:
            query = query.where(actions.c.status == status)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [as_dict(r) for r in reversed(rows)]

    async def cancel(self, action_id: int, now: datetime | None = None) -> tuple[str | None, bool]:
        """Cancel a pending action. Returns (status afterwards or None if no such action,
        whether this call canceled it)."""
        now = now or utcnow()
        return await self._move(
            action_id, ActionStatus.PENDING, status=ActionStatus.CANCELED, finished_at=now, now=now
        )

    async def retry(self, action_id: int, now: datetime | None = None) -> tuple[str | None, bool]:
        """Put a failed action back in the queue with a fresh attempt budget.

        The baseline is kept: if the last attempt's outcome was unknown, the runner still
        reads the task back before sending anything again. Returns (status, changed)."""
        now = now or utcnow()
        return await self._move(
            action_id,
            ActionStatus.FAILED,
            status=ActionStatus.PENDING,
            attempts=0,
            next_attempt_at=now,
            finished_at=None,
            now=now,
        )

    async def _move(
        self, action_id: int, only_from: ActionStatus, *, now: datetime, **values: Any
    ) -> tuple[str | None, bool]:
        """A user's transition of one action, done only from `only_from`; releases any lease.
        Returns (status afterwards or None if no such action, whether this call moved it)."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                actions.update()
                .where(actions.c.id == action_id, actions.c.status == only_from)
                .values(updated_at=now, lease_owner=None, lease_until=None, **values)
            )
            status = await conn.scalar(sa.select(actions.c.status).where(actions.c.id == action_id))
        return (None if status is None else str(status)), result.rowcount > 0

    async def claim_actions(
        self, worker: str, *, limit: int, lease: float, now: datetime | None = None
    ) -> list[ClaimedAction]:
        """Lease due actions: at most one per task, the oldest open one, so actions on a task
        are applied in the order they were queued. A `running` action whose lease expired
        (its worker died) is taken over."""
        now = now or utcnow()
        pg = self.is_postgres
        st = self._statements
        params = (worker, stamp(now + timedelta(seconds=lease), pg), stamp(now, pg), limit, 0)
        if pg:  # the newest attempts come with the claim
            [rows] = await _transaction(self.engine, [_Step(st.claim, params)])
            newest = [(r[0], r[8][1:] or None) for r in rows if r[8] is not None]
        else:
            rows, newest = await _transaction(
                self.engine,
                [
                    _Step(st.claim, params),
                    _Step(st.newest, lambda done: (id_list([r[0] for r in done[0]], pg),)),
                ],
            )
        outcomes: dict[int, str | None] = {r[0]: r[1] for r in newest}
        claimed = [
            ClaimedAction(
                id=r[0],
                system=r[1],
                task_id=r[2],
                kind=r[3],
                params_text=json_text(r[4]),
                attempts=r[5],
                max_attempts=r[6],
                baseline=r[7],
                last_outcome=_outcome(outcomes.get(r[0])),
                interrupted=r[0] in outcomes and outcomes[r[0]] is None,
            )
            for r in rows
        ]
        return sorted(claimed, key=lambda a: a.id)

    async def close_dangling_attempts(
        self, action_ids: Sequence[int], reason: str, now: datetime | None = None
    ) -> int:
        """Attempts that never recorded an outcome (their worker died mid-call) become unknown."""
        if not action_ids:
            return 0
        now = now or utcnow()
        async with self.engine.begin() as conn:
            result = await conn.execute(
                action_attempts.update()
                .where(
                    action_attempts.c.action_id.in_(list(action_ids)),
                    action_attempts.c.outcome.is_(None),
                )
                .values(outcome=AttemptOutcome.UNKNOWN, finished_at=now, error=reason)
            )
        return int(result.rowcount)

    async def renew_action_leases(self, worker: str, ids: Sequence[int], lease: float) -> None:
        if not ids:
            return
        now = utcnow()
        mine = sa.and_(actions.c.id.in_(list(ids)), actions.c.lease_owner == worker)
        if self.is_postgres:
            # Rows locked right now are skipped, not waited on: the runner records attempts
            # and outcomes beside this on other connections, each statement locking our rows
            # in the order of its join, and two statements waiting on each other deadlock. A
            # row skipped is being written (and released, if finished); the next renewal, a
            # third of a lease later, covers it. (NO KEY UPDATE: what an UPDATE takes anyway;
            # an attempt's foreign key check needs only KEY SHARE.)
            mine = actions.c.id.in_(
                sa.select(actions.c.id)
                .where(mine)
                .with_for_update(key_share=True, skip_locked=True)
                .scalar_subquery()
            )
        async with self.engine.begin() as conn:
            await conn.execute(
                actions.update().where(mine).values(lease_until=now + timedelta(seconds=lease))
            )

    async def release_actions(self, worker: str, ids: Sequence[int]) -> None:
        """Give claimed actions back (shutdown). One with an attempt in flight stays `running`
        with an expired lease, so whoever takes it over verifies before sending again."""
        if not ids:
            return
        now = utcnow()
        in_flight = sa.exists().where(
            action_attempts.c.action_id == actions.c.id, action_attempts.c.outcome.is_(None)
        )
        mine = sa.and_(actions.c.id.in_(list(ids)), actions.c.lease_owner == worker)
        async with self.engine.begin() as conn:
            await conn.execute(
                actions.update()
                .where(mine, ~in_flight)
                .values(
                    status=ActionStatus.PENDING, lease_owner=None, lease_until=None, updated_at=now
                )
            )
            await conn.execute(actions.update().where(mine, in_flight).values(lease_until=now))

    async def next_action_due(self) -> datetime | None:
        async with self.engine.connect() as conn:
            value = await conn.scalar(
                sa.select(sa.func.min(actions.c.next_attempt_at)).where(
                    actions.c.status == ActionStatus.PENDING
                )
            )
        if value is None:
            return None
        return UTCDateTime().process_result_value(value, self.engine.dialect)

    async def baseline_inputs(self, action_ids: Sequence[int]) -> dict[int, BaselineInputs]:
        """For each action whose task has a snapshot: the newest snapshot, and the params of
        the actions of the same kind that succeeded on the task since. Actions whose task has
        no snapshot are absent."""
        if not action_ids:
            return {}
        ids = (id_list(action_ids, self.is_postgres),)
        st = self._statements
        if st.baseline_all is not None:  # PostgreSQL: one statement, the done params as arrays
            [rows] = await _transaction(self.engine, [_Step(st.baseline_all, ids)], write=False)
            return {int(r[0]): BaselineInputs(_payload(r[1]), list(r[2] or ())) for r in rows}
        snapshots, done = await _transaction(
            self.engine, [_Step(st.snapshots, ids), _Step(st.done, ids)], write=False
        )
        out = {int(r[0]): BaselineInputs(_payload(r[1]), []) for r in snapshots}
        for action_id, params in done:
            entry = out.get(int(action_id))
            if entry is not None:
                entry.done.append(params)  # as text: Adds.same reads it
        return out

    async def start_attempts(
        self, worker: str, baselines: Mapping[int, int | None], now: datetime | None = None
    ) -> dict[int, int]:
        """Record one attempt per action (and its baseline, if none is stored yet) *before*
        anything is sent, in one transaction: a crash then leaves a trace that makes the next
        claimer read the task back first. Returns action id -> attempt id for the actions whose
        lease this worker still holds (the others are left untouched)."""
        if not baselines:
            return {}
        pg = self.is_postgres
        at = stamp(now or utcnow(), pg)
        ids = sorted(baselines)
        st = self._statements
        if st.start_all is not None:  # PostgreSQL: one statement
            params = (at, ids, [baselines[i] for i in ids], worker)
            [started] = await _transaction(self.engine, [_Step(st.start_all, params)])
        else:
            _, started = await _transaction(
                self.engine,
                [
                    _Step(
                        st.count_attempt, [(i, worker, at, baselines[i]) for i in ids], many=True
                    ),
                    _Step(st.insert_attempts, (id_list(ids, pg), worker, at)),
                ],
            )
        return {int(action_id): int(attempt_id) for action_id, attempt_id in started}

    async def finish(
        self, worker: str, items: Sequence[Finish], now: datetime | None = None
    ) -> None:
        """Record outcomes in one transaction: each attempt's, and its action's new status;
        releases the leases. An action whose lease this worker lost is left as it is."""
        if not items:
            return
        pg = self.is_postgres
        at = stamp(now or utcnow(), pg)
        items = sorted(items, key=lambda f: f.action_id)
        attempts = [
            (f.attempt_id, str(f.outcome), at, f.http_status, f.error)
            for f in items
            if f.attempt_id is not None
        ]
        finished = [_finished_row(f, at, worker, pg) for f in items]
        # (one row per task: an action is claimed only once the one before it on its task is
        # written, so a group never holds two of one task)
        repoll = list(
            dict.fromkeys(
                f.repoll
                for f in items
                if f.repoll is not None and f.status == ActionStatus.SUCCEEDED
            )
        )
        st = self._statements
        if st.finish_all is not None:  # PostgreSQL: one statement, over columns
            columns = list(zip(*finished, strict=True))
            params = (
                at,
                worker,
                [f.attempt_id for f in items],
                [str(f.outcome) if f.attempt_id is not None else None for f in items],
                [f.http_status for f in items],
                *(list(c) for i, c in enumerate(columns) if i not in (1, 3)),  # worker, now
                [f.error for f in items],
                [system for system, _ in repoll],
                [task_id for _, task_id in repoll],
            )
            await _transaction(self.engine, [_Step(st.finish_all, [params], many=True)])
            return
        await _transaction(
            self.engine,
            [
                _Step(st.finish_attempt, attempts, many=True),
                _Step(st.finish_action, finished, many=True),
                _Step(st.repoll, [(system, task_id, at) for system, task_id in repoll], many=True),
            ],
        )

    @cached_property
    def _statements(self) -> _Statements:
        return _Statements.build(self)


def _action_columns() -> sa.Select[Any]:
    return sa.select(
        actions.c.id,
        actions.c.system,
        actions.c.task_id,
        actions.c.kind,
        sa.cast(actions.c.params, sa.Text).label("params"),
        actions.c.status,
        actions.c.attempts,
        actions.c.max_attempts,
        actions.c.next_attempt_at,
        actions.c.idempotency_key,
        actions.c.last_error,
        sa.cast(actions.c.result, sa.Text).label("result"),
        actions.c.created_at,
        actions.c.updated_at,
        actions.c.finished_at,
        actions.c.requested_by,
    )


def _outcome(value: str | None) -> AttemptOutcome | None:
    # the column has no constraint: a value written by hand counts as no outcome to act on
    try:
        return None if value is None else AttemptOutcome(value)
    except ValueError:
        return None


def _finished_row(f: Finish, now: Any, worker: str, pg: bool) -> Row:
    """The row of `finish_action` for one outcome: what its status sets, NULL where the column
    keeps its value (result unless succeeded; attempts unless a try that sent nothing is
    counted here; next_attempt_at unless pending). `now` is already in the driver's form."""
    succeeded = f.status == ActionStatus.SUCCEEDED
    pending = f.status == ActionStatus.PENDING
    return (
        f.action_id,
        worker,
        str(f.status),
        now,
        now if f.status in TERMINAL else None,  # finished_at
        json_value(f.result) if succeeded else None,  # None is stored as JSON null, as before
        None if succeeded else f.error,  # last_error
        None if succeeded else f.attempts,
        (stamp(f.next_attempt_at, pg) if f.next_attempt_at else now) if pending else None,
    )


def _payload(text: str | None) -> JSON:
    try:
        return None if text is None else orjson.loads(text)
    except orjson.JSONDecodeError:
        return None  # no usable snapshot: the runner reads the task instead


# -- the runner's steps, on the driver ------------------------------------------------------------


class _Step(NamedTuple):
    """One statement of a step: its rows (`many`), or its one row of parameters, or a function
    of the rows of the statements before it that gives them."""

    bulk: Bulk
    params: Any  # Sequence[Row] with many, else Row, or Callable[[list[list[Row]]], ...]
    many: bool = False


@dataclass(frozen=True)
class _Statements:
    """The runner's steps as batch statements (worker/store/bulk.py), built once per store."""

    claim: Bulk
    newest: Bulk
    snapshots: Bulk
    done: Bulk
    count_attempt: Bulk
    insert_attempts: Bulk
    finish_attempt: Bulk
    finish_action: Bulk
    repoll: Bulk
    # PostgreSQL: the baseline inputs, the attempts, and the outcomes, each as one statement
    baseline_all: Bulk | None
    start_all: Bulk | None
    finish_all: Bulk | None

    @classmethod
    def build(cls, store: StoreBase) -> _Statements:
        b = sa.bindparam
        time = UTCDateTime()
        now = b("now", type_=time)
        # constants as SQL, not parameters: every row binds exactly the names listed below
        pending: Any = sa.literal_column("'pending'")
        running: Any = sa.literal_column("'running'")
        succeeded: Any = sa.literal_column("'succeeded'")
        # The oldest open action of each task, found once per claim: O(open actions). (It
        # was a NOT EXISTS probe of each candidate's task for an earlier open action, which
        # walks the task's whole history: every claim slower with each action ever applied,
        # 160 -> 1,230 ms of SQLite's time per 5,000 actions after 20,000; or, through the
        # status index, every open action per candidate: 460 ms a claim on PostgreSQL.)
        opened = actions.alias("opened")
        first_open = (
            sa.select(sa.func.min(opened.c.id).label("id"))
            .where(opened.c.status.in_([pending, running]))
            .group_by(opened.c.system, opened.c.task_id)
            .subquery("first_open")
        )
        # From the first open ones to their rows by primary key, whatever the statistics say:
        # the status test is not an indexable expression here, or a planner whose statistics
        # predate the queue loops over the due actions for each first open one (2,000 queued:
        # 280 ms a claim; as IN (that subquery), 620).
        status = sa.func.coalesce(actions.c.status, sa.literal_column("''"))
        candidates = (
            sa.select(actions.c.id)
            .select_from(first_open.join(actions, actions.c.id == first_open.c.id))
            .where(
                sa.or_(
                    sa.and_(status == pending, actions.c.next_attempt_at <= now),
                    sa.and_(
                        status == running,
                        sa.or_(actions.c.lease_until.is_(None), actions.c.lease_until < now),
                    ),
                )
            )
            .order_by(actions.c.id)
            .limit(b("limit", type_=sa.Integer()))
            .offset(b("offset", type_=sa.Integer()))  # SQLite renders one with a bound LIMIT
        )
        if store.is_postgres:
            # rows another worker is claiming are skipped, not waited on (of the actions
            # only: the first open ones are an aggregate)
            candidates = candidates.with_for_update(skip_locked=True, of=actions)
        chosen = candidates.scalar_subquery()
        if store.is_postgres:
            # = ANY(array(subquery)), as the claim of tasks: the chosen ids are an InitPlan
            # found by primary key, where the generic plan of IN (subquery) (a prepared
            # statement's after five runs) hash-joins the whole table
            picked = actions.c.id == sa.any_(sa.func.array(chosen))
        else:
            picked = actions.c.id.in_(chosen)
        returned = [
            actions.c.id,
            actions.c.system,
            actions.c.task_id,
            actions.c.kind,
            sa.cast(actions.c.params, sa.Text),
            actions.c.attempts,
            actions.c.max_attempts,
            actions.c.baseline,
        ]
        if store.is_postgres:
            # The newest attempt of each claimed action in the same statement (one round trip):
            # NULL (never tried), "" (no outcome: its worker died mid-call) or "=" and its
            # outcome. (Not on SQLite, whose RETURNING names columns unqualified: `id` in the
            # subquery would be the attempt's. There the read that follows costs no round trip.)
            attempt, newer = action_attempts.alias("attempt"), action_attempts.alias("newer")
            returned.append(
                sa.select(
                    sa.func.coalesce(
                        sa.literal_column("'='").op("||")(attempt.c.outcome),
                        sa.literal_column("''"),
                    )
                )
                .where(
                    attempt.c.id
                    == sa.select(sa.func.max(newer.c.id))
                    .where(newer.c.action_id == actions.c.id)
                    # Grouped, so that max() is not planned as a backward walk of the primary
                    # key until a row of this action turns up: for an action never tried that
                    # walked every attempt ever made (a claim 4 -> 190 ms at 30,000 attempts,
                    # statistics from before them). Its own index finds the few rows instead.
                    .group_by(newer.c.action_id)
                    .correlate(actions)  # the claimed row, two levels up
                    .scalar_subquery()
                )
                .correlate(actions)
                .scalar_subquery()
            )
        claim = (
            actions.update()
            .where(picked)
            .values(
                status=running,
                lease_owner=b("worker"),
                lease_until=b("lease_until", type_=time),
                updated_at=now,
            )
            .returning(*returned)
        )
        # the outcome of the newest attempt of each action in "ids" that has one
        last = sa.select(sa.func.max(action_attempts.c.id)).where(
            in_id_list(store, action_attempts.c.action_id)
        )
        newest = sa.select(action_attempts.c.action_id, action_attempts.c.outcome).where(
            action_attempts.c.id.in_(last.group_by(action_attempts.c.action_id))
        )
        # For each of our actions in "ids": its task's newest snapshot, and the actions of the
        # same kind that succeeded on the task since it was taken.
        a, t, s = actions.alias("a"), tasks.alias("t"), task_snapshots.alias("s")
        newest_snapshot = a.join(
            t, sa.and_(t.c.system == a.c.system, t.c.task_id == a.c.task_id)
        ).join(
            s,
            sa.and_(
                s.c.system == t.c.system, s.c.task_id == t.c.task_id, s.c.seq == t.c.snapshot_seq
            ),
        )
        done = actions.alias("done")
        snapshots = (
            sa.select(a.c.id, sa.cast(s.c.payload, sa.Text))
            .select_from(newest_snapshot)
            .where(in_id_list(store, a.c.id))
        )
        done_since = (
            sa.select(a.c.id, sa.cast(done.c.params, sa.Text))
            .select_from(
                newest_snapshot.join(
                    done,
                    sa.and_(
                        done.c.system == a.c.system,
                        done.c.task_id == a.c.task_id,
                        done.c.kind == a.c.kind,
                        # not an indexed expression, on purpose: both planners then reach
                        # `done` from each of our actions by (system, task_id); SQLite (no
                        # statistics) otherwise walked every succeeded action by the status
                        # index, each set slower than the last
                        sa.func.coalesce(done.c.status, sa.literal_column("''")) == succeeded,
                        done.c.finished_at >= s.c.fetched_at,
                    ),
                )
            )
            .where(in_id_list(store, a.c.id))
            .order_by(done.c.id)
        )
        mine = sa.and_(
            actions.c.id == b("id"),
            actions.c.lease_owner == b("worker"),
            actions.c.status == running,
        )
        # Counts the try, and keeps the first baseline stored (NULL: none to store); only
        # while this worker holds the lease.
        count_attempt = (
            actions.update()
            .where(mine)
            .values(
                attempts=actions.c.attempts + sa.literal_column("1"),
                updated_at=now,
                baseline=sa.func.coalesce(actions.c.baseline, b("baseline", type_=sa.Integer())),
            )
        )
        # One attempt row per action of "ids" still ours: the rows count_attempt just counted
        # (and, on PostgreSQL, locked).
        insert_attempts = (
            action_attempts.insert()
            .from_select(
                ["action_id", "started_at", "worker"],
                sa.select(actions.c.id, now, b("worker", type_=sa.String())).where(
                    in_id_list(store, actions.c.id),
                    actions.c.lease_owner == b("worker"),
                    actions.c.status == running,
                ),
            )
            .returning(action_attempts.c.action_id, action_attempts.c.id)
        )
        finish_attempt = (
            action_attempts.update()
            .where(action_attempts.c.id == b("id"))
            .values(
                outcome=b("outcome"),
                finished_at=now,
                http_status=b("http_status"),
                error=b("error"),
            )
        )
        # The one transition out of `running` (see _finished_row); releases the lease.
        finish_action = (
            actions.update()
            .where(actions.c.id == b("id"), actions.c.lease_owner == b("worker"))
            .values(
                status=b("status"),
                updated_at=now,
                lease_owner=sa.null(),
                lease_until=sa.null(),
                finished_at=b("finished_at", type_=time),
                result=sa.func.coalesce(b("result", type_=actions.c.result.type), actions.c.result),
                last_error=b("error"),
                attempts=sa.func.coalesce(b("attempts", type_=sa.Integer()), actions.c.attempts),
                next_attempt_at=sa.func.coalesce(b("next", type_=time), actions.c.next_attempt_at),
            )
        )
        # The task changed upstream: poll it at the next cycle. An action queued with plain SQL
        # for a task nobody tracked starts tracking it, as `enqueue` would.
        upsert = store.insert(tasks)
        repoll = upsert.values(
            system=b("system"), task_id=b("task_id"), first_seen_at=now, next_poll_at=now
        ).on_conflict_do_update(
            index_elements=["system", "task_id"],
            set_={"next_poll_at": upsert.excluded.next_poll_at},
        )
        baseline_all = start_all = finish_all = None
        if store.is_postgres:
            start_all, finish_all = _postgres_sets(now, running)
            baseline_all = _postgres_baselines(store, succeeded)
        return cls(
            baseline_all=baseline_all,
            start_all=start_all,
            finish_all=finish_all,
            claim=Bulk(claim, ("worker", "lease_until", "now", "limit", "offset")),
            newest=Bulk(newest, ("ids",)),
            snapshots=Bulk(snapshots, ("ids",)),
            done=Bulk(done_since, ("ids",)),
            count_attempt=Bulk(count_attempt, ("id", "worker", "now", "baseline")),
            insert_attempts=Bulk(insert_attempts, ("ids", "worker", "now")),
            finish_attempt=Bulk(finish_attempt, ("id", "outcome", "now", "http_status", "error")),
            finish_action=Bulk(finish_action, _FINISH_ACTION),
            repoll=Bulk(repoll, ("system", "task_id", "now")),
        )


# The parameters of finish_action, in `_finished_row` order; finish_all's rows are the
# attempt's three, then these.
_FINISH_ACTION = (
    "id",
    "worker",
    "status",
    "now",
    "finished_at",
    "result",
    "error",
    "attempts",
    "next",
)
_FINISH_COLUMNS = ("attempt_id", "outcome", "http", *_FINISH_ACTION)


def _postgres_sets(now: Any, running: Any) -> tuple[Bulk, Bulk]:
    """start_attempts and finish as one statement each, over arrays (one value per action):
    on PostgreSQL a step is then one round trip, where a transaction of several statements was
    four or five (BEGIN, each statement, COMMIT), each a turn of a busy event loop; and the rows
    are bound as a few arrays rather than a message each. Data-modifying CTEs run exactly once
    and atomically with the statement. They lock rows in the order of the join, which is why
    the lease renewal skips locked rows instead of waiting (renew_action_leases)."""
    from sqlalchemy.dialects import postgresql  # (only here: SQLite's start-up does without)

    b = sa.bindparam

    def array(name: str, kind: Any) -> Any:
        return b(name, type_=postgresql.ARRAY(kind))

    time = UTCDateTime()
    given = (
        sa.func.unnest(array("ids", sa.BigInteger()), array("baselines", sa.Integer()))
        .table_valued("id", "baseline")
        .render_derived(name="v")
    )
    # `id = ANY(ids)` beside each join on the arrays: the planner then reaches the rows by
    # primary key, sized by the array, whatever its statistics say (a queue bulk-loaded since
    # the last ANALYZE had every step scan the whole table, or every running action).
    counted = (
        actions.update()
        .where(
            actions.c.id == sa.any_(array("ids", sa.BigInteger())),
            actions.c.id == given.c.id,
            actions.c.lease_owner == b("worker"),
            # not indexable, on purpose: through the status index the planner read every
            # version of every running action (a bitmap scan never drops dead entries)
            sa.func.coalesce(actions.c.status, sa.literal_column("''")) == running,
        )
        .values(
            attempts=actions.c.attempts + sa.literal_column("1"),
            updated_at=now,
            baseline=sa.func.coalesce(actions.c.baseline, given.c.baseline),
        )
        .returning(actions.c.id)
        .cte("counted")
    )
    start_all = (
        action_attempts.insert()
        .from_select(
            ["action_id", "started_at", "worker"],
            sa.select(counted.c.id, now, b("worker", type_=sa.String())),
        )
        .returning(action_attempts.c.action_id, action_attempts.c.id)
        .add_cte(counted)
    )
    kinds = {
        "attempt_id": sa.BigInteger(),
        "outcome": sa.String(),
        "http": sa.Integer(),
        "id": sa.BigInteger(),
        "status": sa.String(),
        "finished_at": time,
        "result": postgresql.JSONB(),
        "error": sa.Text(),
        "attempts": sa.Integer(),
        "next": time,
        "attempt_error": sa.Text(),
    }
    names = [n for n in _FINISH_COLUMNS if n not in ("worker", "now")] + ["attempt_error"]
    v = (
        sa.func.unnest(*(array(f"{n}s", kinds[n]) for n in names))
        .table_valued(*names)
        .render_derived(name="v")
    )
    ended = (
        action_attempts.update()
        .where(
            action_attempts.c.id == sa.any_(array("attempt_ids", sa.BigInteger())),
            action_attempts.c.id == v.c.attempt_id,
        )
        .values(outcome=v.c.outcome, finished_at=now, http_status=v.c.http, error=v.c.attempt_error)
        .returning(action_attempts.c.id)
        .cte("ended")
    )
    moved = (
        actions.update()
        .where(
            actions.c.id == sa.any_(array("ids", sa.BigInteger())),
            actions.c.id == v.c.id,
            actions.c.lease_owner == b("worker"),
        )
        .values(
            status=v.c.status,
            updated_at=now,
            lease_owner=sa.null(),
            lease_until=sa.null(),
            finished_at=v.c.finished_at,
            result=sa.func.coalesce(v.c.result, actions.c.result),
            last_error=v.c.error,
            attempts=sa.func.coalesce(v.c.attempts, actions.c.attempts),
            next_attempt_at=sa.func.coalesce(v.c.next, actions.c.next_attempt_at),
        )
        .returning(actions.c.id)
        .cte("moved")
    )
    polled = (
        sa.func.unnest(array("systems", sa.String()), array("task_ids", sa.String()))
        .table_valued("system", "task_id")
        .render_derived(name="r")
    )
    upsert = postgresql.insert(tasks).from_select(
        ["system", "task_id", "first_seen_at", "next_poll_at"],
        sa.select(polled.c.system, polled.c.task_id, now, now),
    )
    finish_all = upsert.on_conflict_do_update(
        index_elements=["system", "task_id"], set_={"next_poll_at": upsert.excluded.next_poll_at}
    ).add_cte(ended, moved)
    return (
        Bulk(start_all, ("now", "ids", "baselines", "worker")),
        Bulk(finish_all, ("now", "worker", *(f"{n}s" for n in names), "systems", "task_ids")),
    )


def _postgres_baselines(store: StoreBase, succeeded: Any) -> Bulk:
    """baseline_inputs as one statement: for each of our actions in "ids", its task's newest
    snapshot and the params of the actions of the same kind that succeeded on the task since
    it was taken (an array, in id order). Driven from the ids by primary key through LATERAL
    subqueries the planner cannot flatten (LIMIT 1; an aggregate), so every lookup stays an
    index probe per action whatever the statistics say: as joins, a planner whose statistics
    predate the queue started from every succeeded action (17 ms a set of 256 at 5,000)."""
    from sqlalchemy.dialects.postgresql import aggregate_order_by

    a, t, s = actions.alias("a"), tasks.alias("t"), task_snapshots.alias("s")
    done = actions.alias("done")
    snapshot = (
        sa.select(sa.cast(s.c.payload, sa.Text).label("payload"), s.c.fetched_at)
        .select_from(
            t.join(
                s,
                sa.and_(
                    s.c.system == t.c.system,
                    s.c.task_id == t.c.task_id,
                    s.c.seq == t.c.snapshot_seq,
                ),
            )
        )
        .where(t.c.system == a.c.system, t.c.task_id == a.c.task_id)
        .limit(sa.literal_column("1"))  # (one at most: the task is unique)
        .lateral("snapshot")
    )
    since = (
        sa.select(
            sa.func.array_agg(aggregate_order_by(sa.cast(done.c.params, sa.Text), done.c.id)).label(
                "params"
            )
        )
        .where(
            done.c.system == a.c.system,
            done.c.task_id == a.c.task_id,
            done.c.kind == a.c.kind,
            # not an indexed expression: reached by (system, task_id), as on SQLite
            sa.func.coalesce(done.c.status, sa.literal_column("''")) == succeeded,
            done.c.finished_at >= snapshot.c.fetched_at,
        )
        .lateral("since")
    )
    statement = (
        sa.select(a.c.id, snapshot.c.payload, since.c.params)
        .select_from(a.join(snapshot, sa.true()).join(since, sa.true()))
        .where(in_id_list(store, a.c.id))
    )
    return Bulk(statement, ("ids",))


async def _transaction(
    engine: AsyncEngine, steps: Sequence[_Step], *, write: bool = True
) -> list[list[Row]]:
    """Run `steps`; each one's rows (none for `many`).

    SQLite: in one transaction, and the whole of it one call into aiosqlite's thread, not three
    or four per statement as through SQLAlchemy (2-3x the CPU of a step at the sizes the runner
    uses); the connection is never left inside a transaction whatever happens to the caller,
    and errors are raised as SQLAlchemy's, as from the rest of the store.

    PostgreSQL: each statement on its own (autocommit), on asyncpg's prepared statements. Every
    write step there is a single statement (the claim and its read of the newest attempts need
    no transaction between them: the leases are ours), so BEGIN and COMMIT would only add two
    round trips, each a turn of a busy event loop.
    """
    if engine.dialect.name == "postgresql":
        out: list[list[Row]] = []
        async with engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            for step in steps:
                params = step.params(out) if callable(step.params) else step.params
                if step.many:
                    await step.bulk.run(conn, params)
                    out.append([])
                else:
                    out.append(await step.bulk.rows(conn, params))
        return out
    import sqlite3

    work = [(step, *step.bulk.compiled(engine.dialect)) for step in steps]
    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()
        driver: Any = raw.driver_connection
        try:
            # aiosqlite's own way to run a call in its thread (SQLAlchemy's aiosqlite adapter
            # reaches into it the same way)
            result: list[list[Row]] = await driver._execute(
                _sqlite_transaction, driver._conn, work, write
            )
        except sqlite3.Error as exc:
            statements = "; ".join(sql for _, sql, _ in work)
            raise sa_exc.DBAPIError.instance(statements, None, exc, sqlite3.Error) from exc
    return result


def _sqlite_transaction(
    conn: Any, work: Sequence[tuple[_Step, str, Callable[[Row], Row] | None]], write: bool
) -> list[list[Row]]:
    # IMMEDIATE: the write lock up front, as every write transaction of the store takes it (see
    # worker.store.engine); a read takes none
    conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    out: list[list[Row]] = []
    try:
        for step, sql, reorder in work:
            params = step.params(out) if callable(step.params) else step.params
            if not step.many:
                out.append(conn.execute(sql, reorder(params) if reorder else params).fetchall())
                continue
            if params:
                conn.executemany(sql, [reorder(r) for r in params] if reorder else params)
            out.append([])
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return out
