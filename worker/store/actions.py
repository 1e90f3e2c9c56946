"""The action queue: enqueue, claim in per-task order, attempts and outcomes."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import sqlalchemy as sa

from worker.model import JSON, ActionStatus, AttemptOutcome
from worker.store.base import StoreBase, as_dict, json_text, utcnow
from worker.store.schema import UTCDateTime, action_attempts, actions, task_snapshots, tasks

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


class DoneAction(NamedTuple):
    """An action that succeeded on a task after its newest snapshot was taken."""

    kind: str
    params: JSON
    finished_at: datetime


class BaselineInputs(NamedTuple):
    """What an action's baseline is computed from without asking the upstream."""

    fetched_at: datetime  # of the task's newest snapshot
    payload: JSON
    done: list[DoneAction]


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
        earlier = actions.alias("earlier")
        candidates = (
            sa.select(actions.c.id)
            .where(
                sa.or_(
                    sa.and_(
                        actions.c.status == ActionStatus.PENDING, actions.c.next_attempt_at <= now
                    ),
                    sa.and_(
                        actions.c.status == ActionStatus.RUNNING,
                        sa.or_(actions.c.lease_until.is_(None), actions.c.lease_until < now),
                    ),
                ),
                ~sa.exists().where(
                    earlier.c.system == actions.c.system,
                    earlier.c.task_id == actions.c.task_id,
                    earlier.c.id < actions.c.id,
                    earlier.c.status.in_(OPEN),
                ),
            )
            .order_by(actions.c.id)
            .limit(limit)
        )
        statement = (
            actions.update()
            .where(actions.c.id.in_(self.skip_locked(candidates).scalar_subquery()))
            .values(
                status=ActionStatus.RUNNING,
                lease_owner=worker,
                lease_until=now + timedelta(seconds=lease),
                updated_at=now,
            )
            .returning(
                actions.c.id,
                actions.c.system,
                actions.c.task_id,
                actions.c.kind,
                sa.cast(actions.c.params, sa.Text),
                actions.c.attempts,
                actions.c.max_attempts,
                actions.c.baseline,
            )
        )
        async with self.engine.begin() as conn:
            rows = (await conn.execute(statement)).all()
            if not rows:
                return []
            ids = [r[0] for r in rows]
            newest = (
                sa.select(
                    action_attempts.c.action_id, sa.func.max(action_attempts.c.id).label("last")
                )
                .where(action_attempts.c.action_id.in_(ids))
                .group_by(action_attempts.c.action_id)
                .subquery()
            )
            outcomes = dict(
                (
                    await conn.execute(
                        sa.select(newest.c.action_id, action_attempts.c.outcome).join(
                            action_attempts, action_attempts.c.id == newest.c.last
                        )
                    )
                ).all()
            )
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
        async with self.engine.begin() as conn:
            await conn.execute(
                actions.update()
                .where(actions.c.id.in_(list(ids)), actions.c.lease_owner == worker)
                .values(lease_until=now + timedelta(seconds=lease))
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

    async def baseline_inputs(
        self, keys: Sequence[tuple[str, str]], kinds: Collection[str]
    ) -> dict[tuple[str, str], BaselineInputs]:
        """For each (system, task_id) that has a snapshot: its newest snapshot, and the actions
        of `kinds` that succeeded on it since. Tasks without a snapshot are absent."""
        wanted = list(dict.fromkeys(keys))
        if not wanted or not kinds:
            return {}
        pair = sa.tuple_(tasks.c.system, tasks.c.task_id)
        snapshots = (
            sa.select(
                task_snapshots.c.system,
                task_snapshots.c.task_id,
                task_snapshots.c.fetched_at,
                task_snapshots.c.payload,
            )
            .join(
                tasks,
                sa.and_(
                    tasks.c.system == task_snapshots.c.system,
                    tasks.c.task_id == task_snapshots.c.task_id,
                    tasks.c.snapshot_seq == task_snapshots.c.seq,
                ),
            )
            .where(pair.in_(wanted))
        )
        done = sa.select(
            actions.c.system,
            actions.c.task_id,
            actions.c.kind,
            actions.c.params,
            actions.c.finished_at,
        ).where(
            sa.tuple_(actions.c.system, actions.c.task_id).in_(wanted),
            actions.c.status == ActionStatus.SUCCEEDED,
            actions.c.kind.in_(sorted(kinds)),
        )
        out: dict[tuple[str, str], BaselineInputs] = {}
        async with self.engine.connect() as conn:
            for system, task_id, fetched_at, payload in (await conn.execute(snapshots)).all():
                out[(system, task_id)] = BaselineInputs(fetched_at, payload, [])
            for system, task_id, kind, params, finished_at in (await conn.execute(done)).all():
                entry = out.get((system, task_id))
                if entry is not None and finished_at is not None and finished_at >= entry[0]:
                    entry.done.append(DoneAction(kind, params, finished_at))
        return out

    async def start_attempts(
        self, worker: str, baselines: Mapping[int, int | None], now: datetime | None = None
    ) -> dict[int, int]:
        """Record one attempt per action (and its baseline, if none is stored yet) *before*
        anything is sent, in one transaction: a crash then leaves a trace that makes the next
        claimer read the task back first. Returns action id -> attempt id for the actions whose
        lease this worker still holds."""
        now = now or utcnow()
        ids = list(baselines)
        if not ids:
            return {}
        async with self.engine.begin() as conn:
            with_baseline = [
                {"b_id": i, "b_base": b} for i, b in baselines.items() if b is not None
            ]
            if with_baseline:
                await conn.execute(
                    actions.update()
                    .where(actions.c.id == sa.bindparam("b_id"))
                    .values(baseline=sa.func.coalesce(actions.c.baseline, sa.bindparam("b_base"))),
                    with_baseline,
                )
            owned = (
                (
                    await conn.execute(
                        actions.update()
                        .where(
                            actions.c.id.in_(ids),
                            actions.c.lease_owner == worker,
                            actions.c.status == ActionStatus.RUNNING,
                        )
                        .values(attempts=actions.c.attempts + 1, updated_at=now)
                        .returning(actions.c.id)
                    )
                )
                .scalars()
                .all()
            )
            if not owned:
                return {}
            rows = (
                await conn.execute(
                    action_attempts.insert().returning(
                        action_attempts.c.action_id,
                        action_attempts.c.id,
                        sort_by_parameter_order=True,
                    ),
                    [{"action_id": i, "started_at": now, "worker": worker} for i in owned],
                )
            ).all()
        return {int(action_id): int(attempt_id) for action_id, attempt_id in rows}

    async def finish(
        self, worker: str, items: Sequence[Finish], now: datetime | None = None
    ) -> None:
        """Record outcomes in one transaction: each attempt's, and its action's new status;
        releases the leases. An action whose lease this worker lost is left as it is."""
        if not items:
            return
        now = now or utcnow()
        b = sa.bindparam
        attempts = [
            {"b_aid": f.attempt_id, "b_out": f.outcome, "b_http": f.http_status, "b_err": f.error}
            for f in items
            if f.attempt_id is not None
        ]
        by_status: dict[ActionStatus, list[dict[str, Any]]] = {}
        for f in items:
            by_status.setdefault(f.status, []).append(
                {
                    "b_id": f.action_id,
                    "b_err": f.error,
                    "b_result": f.result,
                    "b_next": f.next_attempt_at or now,
                    "b_n": f.attempts,
                }
            )
        repoll = [
            {
                "system": f.repoll[0],
                "task_id": f.repoll[1],
                "first_seen_at": now,
                "next_poll_at": now,
            }
            for f in items
            if f.repoll is not None and f.status == ActionStatus.SUCCEEDED
        ]
        mine = sa.and_(actions.c.id == b("b_id"), actions.c.lease_owner == worker)
        # a try that sent nothing (a failed read) still counts: Finish.attempts, when set
        counted = sa.func.coalesce(b("b_n", type_=sa.Integer()), actions.c.attempts)
        async with self.engine.begin() as conn:
            if attempts:
                await conn.execute(
                    action_attempts.update()
                    .where(action_attempts.c.id == b("b_aid"))
                    .values(
                        outcome=b("b_out"),
                        finished_at=now,
                        http_status=b("b_http"),
                        error=b("b_err"),
                    ),
                    attempts,
                )
            for status, rows in by_status.items():
                await conn.execute(
                    actions.update().where(mine).values(_finished_values(status, now, counted)),
                    rows,
                )
            if repoll:
                # The task changed upstream: poll it at the next cycle. An action queued with
                # plain SQL for a task nobody tracked starts tracking it, as `enqueue` would.
                upsert = self.insert(tasks)
                await conn.execute(
                    upsert.on_conflict_do_update(
                        index_elements=["system", "task_id"],
                        set_={"next_poll_at": upsert.excluded.next_poll_at},
                    ),
                    repoll,
                )


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


def _finished_values(status: ActionStatus, now: datetime, counted: Any) -> dict[str, Any]:
    """The columns `finish` sets for actions ending an attempt in `status`."""
    b = sa.bindparam
    values: dict[str, Any] = {
        "status": status,
        "updated_at": now,
        "lease_owner": None,
        "lease_until": None,
        "finished_at": now if status in TERMINAL else None,
    }
    if status == ActionStatus.SUCCEEDED:
        values |= {"result": b("b_result", type_=actions.c.result.type), "last_error": None}
    else:
        values |= {"attempts": counted, "last_error": b("b_err")}
    if status == ActionStatus.PENDING:
        values["next_attempt_at"] = b("b_next", type_=actions.c.next_attempt_at.type)
    return values


def _outcome(value: str | None) -> AttemptOutcome | None:
    # the column has no constraint: a value written by hand counts as no outcome to act on
    try:
        return None if value is None else AttemptOutcome(value)
    except ValueError:
        return None
