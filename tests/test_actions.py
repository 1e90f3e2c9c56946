"""The action queue against the sandbox, on both databases: every kind, bad rows, faults at
high rates with exactly-once effects and per-task order, and crashes at every point."""

from __future__ import annotations

import json
import signal
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
import sqlalchemy as sa

from tests.support.cli import clean_env, tasksync_argv
from tests.support.db import Database, count, rows
from tests.support.sandbox import clients, settings_for, track_all
from worker.actions import ActionRunner
from worker.model import ActionStatus, AttemptOutcome
from worker.sandbox import Sandbox
from worker.store import Finish, Store
from worker.sync import SyncCycle
from worker.upstreams.base import Upstream

pytestmark = pytest.mark.anyio


async def test_every_kind_is_applied_once(database: Database, store: Store) -> None:
    async with Sandbox(seed=11, tasks_per_system=6) as sb:
        settings = settings_for(sb, database.url)
        await track_all(store, sb)
        async with clients(settings) as upstreams:
            await SyncCycle(store, upstreams, settings, "w1").run()
            aicc = sb.task_ids("aicc")[0]
            waiting = [
                t
                for t in sb.task_ids("secmaster")
                if sb.payload("secmaster", t)["status"] == "waiting"
            ]
            sec, sec2 = waiting[0], waiting[1]
            sb.mutate("secmaster", sec, "comment", comment="someone else's note")
            existing = sb.payload("secmaster", sec)["comments"][-1]["id"]
            queued = [
                (
                    "aicc",
                    aicc,
                    "process",
                    {
                        "title": "handled",
                        "description": "called the customer",
                        "creator_id": "10gg00000148QvgpaLAm",
                    },
                ),
                ("secmaster", sec, "comment", {"comment": "checked"}),
                ("secmaster", sec, "delete-comment", {"comment_id": existing}),
                ("secmaster", sec, "add-attachment", {"attachment_id": "att-42"}),
                ("secmaster", sec, "delete-attachment", {"attachment_id": "att-42"}),
                ("secmaster", sec, "terminate", {}),
                ("secmaster", sec2, "continue", {}),
            ]
            ids = [(await store.enqueue(s, t, k, p))[0] for s, t, k, p in queued]
            stats = await ActionRunner(store, upstreams, settings, "w1").run_until_idle()
            assert stats.succeeded == len(queued), stats
            done = await rows(store, "SELECT id, status, result, attempts FROM actions ORDER BY id")
            assert [r["status"] for r in done] == ["succeeded"] * len(queued)
            assert all(r["result"] is not None for r in done)
            assert await count(store, "action_attempts", "outcome = 'succeeded'") == len(queued)
            applied = sb.applied()
            assert sorted(e.kind for e in applied) == sorted(k for _, _, k, _ in queued)
            # the order on the secmaster task is the queue order
            assert [e.kind for e in sb.applied("secmaster", sec)] == [
                k for s, t, k, _ in queued if t == sec
            ]
            assert sb.payload("secmaster", sec)["status"] == "canceled"
            assert sb.payload("secmaster", sec2)["status"] == "finished"
            # the tasks were made due so the next cycle shows the effect
            stats_sync = await SyncCycle(store, upstreams, settings, "w1").run()
            assert stats_sync.polled == 3  # the three tasks acted on
            assert (
                await count(store, "task_events", "task_id = :t AND kind = 'status_changed'", t=sec)
                == 1
            )
            assert (
                await count(
                    store,
                    "task_events",
                    "task_id = :t AND kind = 'comment_added' AND CAST(data AS TEXT) LIKE '%checked%'",
                    t=sec,
                )
                == 1
            )
            assert ids == sorted(ids)


async def test_invalid_rows_are_failed_with_a_reason(database: Database, store: Store) -> None:
    async with Sandbox(seed=12, tasks_per_system=2) as sb:
        settings = settings_for(sb, database.url)
        sec = sb.task_ids("secmaster")[0]
        bad = [
            ("secmaster", sec, "explode", "{}", "unknown secmaster action 'explode'"),
            ("secmaster", sec, "comment", '{"text": "x"}', "does not take text"),
            ("secmaster", sec, "comment", "{}", "needs comment"),
            ("secmaster", sec, "comment", '{"comment": 5}', "must be a string"),
            ("secmaster", sec, "comment", '"just a string"', "must be a JSON object"),
            (
                "aicc",
                "x",
                "process",
                '{"title": "' + "t" * 200 + '", "description": "d"}',
                "at most 128",
            ),
            ("koodrive", "k", "comment", '{"comment": "x"}', "read-only"),
            ("nosuch", "k", "comment", '{"comment": "x"}', "unknown system 'nosuch'"),
            (
                "secmaster",
                sec,
                "delete-comment",
                '{"comment_id": "1\'; DROP TABLE actions; --"}',
                "does not exist",
            ),
        ]
        async with store.engine.begin() as conn:
            for system, task, kind, params, _ in bad:
                await conn.execute(
                    sa.text(
                        "INSERT INTO actions (system, task_id, kind, params) VALUES (:s, :t, :k, :p)"
                    )
                    if database.kind == "sqlite"
                    else sa.text(
                        "INSERT INTO actions (system, task_id, kind, params) VALUES (:s, :t, :k, CAST(:p AS JSONB))"
                    ),
                    {"s": system, "t": task, "k": kind, "p": params},
                )
            if database.kind == "sqlite":  # PostgreSQL refuses these at INSERT time itself
                await conn.execute(
                    sa.text(
                        "INSERT INTO actions (system, task_id, kind, params) VALUES ('secmaster', 'x', 'comment', 'not json')"
                    )
                )
                await conn.execute(
                    sa.text(
                        "INSERT INTO actions (system, task_id, kind) VALUES ('secmaster', 'x', 'comment')"
                    )
                )
        async with clients(settings) as upstreams:
            await ActionRunner(store, upstreams, settings, "w1").run_until_idle()
        failed = await rows(store, "SELECT id, status, last_error FROM actions ORDER BY id")
        assert all(r["status"] == "failed" and r["last_error"] for r in failed), failed
        for (_, _, _, _, message), row in zip(bad, failed, strict=False):
            assert message in row["last_error"], (message, row["last_error"])
        if database.kind == "sqlite":
            assert "not valid JSON" in failed[-2]["last_error"]
            assert "missing" in failed[-1]["last_error"]
        assert await count(store, "actions") == len(failed)  # the SQL-looking text was data


async def test_unconfigured_system_fails_the_action(database: Database, store: Store) -> None:
    async with Sandbox(seed=13, tasks_per_system=1) as sb:
        import tomllib

        from worker.config import Settings

        data = tomllib.loads(sb.config_toml(systems=["aicc"]))
        data["database"] = {"url": database.url}
        settings = Settings.model_validate(data)
        await store.enqueue("secmaster", "t", "terminate", {})
        async with clients(settings) as upstreams:
            await ActionRunner(store, upstreams, settings, "w1").run_until_idle()
        [row] = await rows(store, "SELECT status, last_error FROM actions")
        assert row["status"] == "failed" and "secmaster is not configured" in row["last_error"]


async def _drain(store: Store, settings, upstreams, limit: float = 60) -> None:  # type: ignore[no-untyped-def]
    """Run the runner until no action is open (retries are due within milliseconds here)."""
    with anyio.fail_after(limit):
        while await count(store, "actions", "status IN ('pending', 'running')"):
            await ActionRunner(store, upstreams, settings, "w1").run_until_idle()
            await anyio.sleep(0.05)


@pytest.mark.parametrize(
    "faults",
    [
        "500=0.3,429=0.15,429-no-retry-after=0.1",
        "drop=0.35,malformed=0.15,slow=0.1,slow-seconds=1.5,expire=7",
    ],
)
async def test_faults_at_high_rates_keep_exactly_once_and_order(
    database: Database, store: Store, faults: str
) -> None:
    async with Sandbox(seed=14, tasks_per_system=4) as sb:
        settings = settings_for(sb, database.url)
        settings = settings.model_copy(
            update={
                "systems": settings.systems.model_copy(
                    update={
                        name: getattr(settings.systems, name).model_copy(update={"timeout": 0.5})
                        for name in ("aicc", "secmaster", "koodrive")
                    }
                ),
                "retry": settings.retry.model_copy(update={"max_attempts": 30}),
            }
        )
        await track_all(store, sb)
        waiting = [
            t for t in sb.task_ids("secmaster") if sb.payload("secmaster", t)["status"] == "waiting"
        ]
        aicc = sb.task_ids("aicc")[:2]
        async with clients(settings) as upstreams:
            await SyncCycle(store, upstreams, settings, "w1").run()
            texts: dict[str, list[str]] = {}
            for task in waiting:
                for n in range(5):
                    text = f"note {n} on {task[:8]}"
                    texts.setdefault(task, []).append(text)
                    await store.enqueue("secmaster", task, "comment", {"comment": text})
            for task in aicc:
                for n in range(3):
                    text = f"step {n}"
                    texts.setdefault(task, []).append(text)
                    await store.enqueue(
                        "aicc",
                        task,
                        "process",
                        {
                            "title": text,
                            "description": f"did {n}",
                            "creator_id": "10gg00000148QvgpaLAm",
                        },
                    )
            sb.set_faults(faults)
            await _drain(store, settings, upstreams)
            sb.set_faults(None)
        outcome = await rows(store, "SELECT status, last_error FROM actions")
        assert all(r["status"] in ("succeeded", "failed") for r in outcome)
        assert all(r["last_error"] for r in outcome if r["status"] == "failed")
        succeeded = sum(r["status"] == "succeeded" for r in outcome)
        assert succeeded >= len(outcome) - 2, outcome  # 30 attempts: failures are near impossible
        for task, wanted in texts.items():
            system = "aicc" if task in aicc else "secmaster"
            seen = [
                e.params.get("comment") or e.params.get("title")
                for e in sb.applied(system, task)  # type: ignore[arg-type]
            ]
            # each effect exactly once, in queue order
            assert len(seen) == len(set(seen)), (task, seen)
            assert seen == [w for w in wanted if w in seen]
        applied_total = len(sb.applied())
        assert applied_total == succeeded
        assert sum(sb.faults.counts.values()) > 0 if hasattr(sb.faults, "counts") else True


@pytest.mark.parametrize("point", ["after-attempt", "during-call", "after-answer"])
async def test_kill_at_each_crash_point_loses_nothing_and_duplicates_nothing(
    database: Database, store: Store, tmp_path: Path, point: str
) -> None:
    async with Sandbox(seed=15, tasks_per_system=3) as sb:
        waiting = [
            t for t in sb.task_ids("secmaster") if sb.payload("secmaster", t)["status"] == "waiting"
        ]
        task = waiting[0]
        config = tmp_path / "tasksync.toml"
        config.write_text(
            sb.config_toml()
            + '\n[worker]\nlease = "1s"\n\n[retry]\nbase_delay = 0.01\nmax_delay = 0.05\n'
        )
        config.chmod(0o600)
        await store.enqueue("secmaster", task, "comment", {"comment": "exactly once"})
        await store.enqueue("secmaster", task, "comment", {"comment": "and then this"})
        env = clean_env({"TASKSYNC_DATABASE__URL": database.url})
        cmd = tasksync_argv("--config", str(config), "apply")
        if point == "during-call":
            # every answer is late: the comment is applied, then the process dies waiting
            sb.set_faults("slow=1.0,slow-seconds=3")
            async with await anyio.open_process(cmd, env=env) as process:
                with anyio.fail_after(30):
                    while not sb.applied("secmaster", task):
                        await anyio.sleep(0.02)
                process.send_signal(signal.SIGKILL)
                await process.wait()
            sb.set_faults(None)
            killed = process.returncode
        else:
            result = await anyio.run_process(
                cmd, env=env | {"TASKSYNC_TEST_CRASH_AT": point}, check=False
            )
            killed = result.returncode
        assert killed == -signal.SIGKILL
        await anyio.sleep(1.2)  # the lease expires
        with anyio.fail_after(60):
            while await count(store, "actions", "status IN ('pending', 'running')"):
                result = await anyio.run_process(cmd, env=env, check=False)
                assert result.returncode == 0, result.stderr
        done = await rows(store, "SELECT status FROM actions ORDER BY id")
        assert [d["status"] for d in done] == ["succeeded", "succeeded"]
        texts = [e.params["comment"] for e in sb.applied("secmaster", task)]
        assert texts == ["exactly once", "and then this"]
        attempts = await rows(store, "SELECT outcome FROM action_attempts ORDER BY id")
        if point != "after-attempt":
            assert attempts[0]["outcome"] == "unknown"
        assert all(a["outcome"] is not None for a in attempts)


# -- the pipeline and its store steps -------------------------------------------------------------


class _Watched:
    """A client that checks, as each write goes out, that its attempt row is already committed
    (rule 1), and counts the writes in flight."""

    def __init__(self, inner: Upstream, store: Store) -> None:
        self.inner = inner
        self.store = store
        self.in_flight = 0
        self.most = 0
        self.unrecorded: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def apply(self, task_id: str, kind: str, params: Mapping[str, str]) -> Mapping[str, Any]:
        open_attempts = await count(
            self.store,
            "action_attempts AS t JOIN actions AS a ON a.id = t.action_id",
            "a.task_id = :task AND a.status = 'running' AND t.outcome IS NULL",
            task=task_id,
        )
        if open_attempts != 1:
            self.unrecorded.append(task_id)
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            return await self.inner.apply(task_id, kind, params)
        finally:
            self.in_flight -= 1


async def test_the_pipeline_records_each_attempt_before_its_request_and_keeps_the_order(
    database: Database, store: Store
) -> None:
    async with Sandbox(seed=16, tasks_per_system=30) as sb:
        settings = settings_for(sb, database.url, concurrency=4)
        tasks = sb.task_ids("secmaster")
        await store.track("secmaster", tasks)
        async with clients(settings) as upstreams:
            await SyncCycle(store, upstreams, settings, "w1").run()
            watched = _Watched(upstreams["secmaster"], store)
            # many sets' worth: one comment on each task, and three more on the first task
            for n, task in enumerate(tasks):
                await store.enqueue("secmaster", task, "comment", {"comment": f"one {n}"})
            for n in range(3):
                await store.enqueue("secmaster", tasks[0], "comment", {"comment": f"more {n}"})
            runner = ActionRunner(store, {"secmaster": watched}, settings, "w1")  # type: ignore[dict-item]
            stats = await runner.run_until_idle()
        assert stats.succeeded == len(tasks) + 3, stats
        assert watched.unrecorded == []
        assert 1 <= watched.most <= 4  # never more than `concurrency`
        assert runner.in_flight == set()
        texts = [e.params["comment"] for e in sb.applied("secmaster", tasks[0])]
        assert texts == ["one 0", "more 0", "more 1", "more 2"]
        assert len(sb.applied()) == len(tasks) + 3
        assert await count(store, "action_attempts", "outcome = 'succeeded'") == len(tasks) + 3


async def test_store_steps_write_what_each_outcome_sets(database: Database, store: Store) -> None:
    ids = [
        (await store.enqueue("secmaster", f"t{n}", "comment", {"comment": "c"}))[0] for n in "abcde"
    ]
    a, b, c, d, e = ids
    hours = 7200  # leases that outlive the test's hour
    claimed = {x.id: x for x in await store.claim_actions("w1", limit=10, lease=hours)}
    assert sorted(claimed) == ids
    assert all(x.last_outcome is None and not x.interrupted for x in claimed.values())
    # another worker took d over (its lease had run out): no attempt of ours is recorded for it
    async with store.engine.begin() as conn:
        await conn.execute(sa.text("UPDATE actions SET lease_owner = 'w2' WHERE id = :d"), {"d": d})
    started = await store.start_attempts("w1", {a: 2, b: None, c: 0, d: 1})
    assert sorted(started) == [a, b, c]
    later = datetime.now(UTC) + timedelta(hours=1)
    await store.finish(
        "w1",
        [
            Finish(
                a,
                AttemptOutcome.SUCCEEDED,
                ActionStatus.SUCCEEDED,
                started[a],
                result={"ok": [1, 2]},
                http_status=200,
                repoll=("secmaster", "ta"),
            ),
            Finish(
                b,
                AttemptOutcome.UNKNOWN,
                ActionStatus.PENDING,
                started[b],
                error="lost",
                next_attempt_at=later,
            ),
            Finish(
                c,
                AttemptOutcome.FAILED,
                ActionStatus.FAILED,
                started[c],
                error="refused",
                http_status=400,
            ),
            # a read that failed before anything was sent still counts as a try
            Finish(e, AttemptOutcome.RETRY, ActionStatus.PENDING, error="unreadable", attempts=3),
            Finish(d, AttemptOutcome.SUCCEEDED, ActionStatus.SUCCEEDED, result={}),  # not ours
        ],
    )
    got = {
        r["id"]: r
        for r in await rows(
            store,
            "SELECT id, status, attempts, baseline, last_error, CAST(result AS TEXT) AS result, "
            "lease_owner, finished_at, next_attempt_at FROM actions",
        )
    }
    assert got[a]["status"] == "succeeded" and got[a]["attempts"] == 1
    assert got[a]["baseline"] == 2 and got[a]["last_error"] is None
    assert json.loads(got[a]["result"]) == {"ok": [1, 2]}
    assert got[a]["lease_owner"] is None and got[a]["finished_at"] is not None
    assert got[b]["status"] == "pending" and got[b]["attempts"] == 1 and got[b]["baseline"] is None
    assert got[b]["last_error"] == "lost" and got[b]["finished_at"] is None
    assert _aware(got[b]["next_attempt_at"]) == later
    assert got[c]["status"] == "failed" and got[c]["last_error"] == "refused"
    assert got[c]["finished_at"] is not None and got[c]["result"] is None
    assert got[e]["status"] == "pending" and got[e]["attempts"] == 3
    assert got[d]["status"] == "running" and got[d]["lease_owner"] == "w2"  # left alone
    assert got[d]["attempts"] == 0 and got[d]["baseline"] is None
    attempts = {
        r["action_id"]: r
        for r in await rows(
            store, "SELECT action_id, outcome, http_status, error, finished_at FROM action_attempts"
        )
    }
    assert sorted(attempts) == [a, b, c]
    assert attempts[a]["outcome"] == "succeeded" and attempts[a]["http_status"] == 200
    assert attempts[b]["outcome"] == "unknown" and attempts[b]["error"] == "lost"
    assert attempts[c]["outcome"] == "failed" and attempts[c]["http_status"] == 400
    assert all(r["finished_at"] is not None for r in attempts.values())
    # the succeeded action's task is due now (written in the store's own time format: the
    # claim of tasks compares it as text on SQLite)
    [task] = await rows(store, "SELECT next_poll_at FROM tasks WHERE task_id = 'ta'")
    assert _aware(task["next_poll_at"]) <= datetime.now(UTC)
    # b is not due for an hour, e is due now and was tried three times
    [again] = await store.claim_actions("w1", limit=10, lease=hours)
    assert again.id == e and again.attempts == 3 and again.last_outcome is None
    soon = later - timedelta(seconds=1)
    assert not await store.claim_actions("w1", limit=10, lease=hours, now=soon)
    [retried] = await store.claim_actions("w1", limit=10, lease=hours, now=later)
    assert retried.id == b and retried.last_outcome is AttemptOutcome.UNKNOWN
    assert retried.outcome_unknown and not retried.interrupted
    # an attempt left without an outcome (its worker died) is reported as interrupted
    await store.start_attempts("w1", {b: None}, now=later)
    async with store.engine.begin() as conn:
        await conn.execute(sa.text("UPDATE actions SET lease_until = NULL WHERE id = :b"), {"b": b})
    [interrupted] = await store.claim_actions("w2", limit=10, lease=60, now=later)
    assert interrupted.id == b and interrupted.interrupted and interrupted.outcome_unknown


async def test_baselines_count_what_succeeded_since_the_snapshot(
    database: Database, store: Store
) -> None:
    async with Sandbox(seed=17, tasks_per_system=2) as sb:
        settings = settings_for(sb, database.url)
        task = sb.task_ids("secmaster")[0]
        await store.track("secmaster", [task])
        async with clients(settings) as upstreams:
            await SyncCycle(store, upstreams, settings, "w1").run()
            # applied after the snapshot: the snapshot does not show it yet
            await store.enqueue("secmaster", task, "comment", {"comment": "twice"})
            await store.enqueue("secmaster", task, "delete-attachment", {"attachment_id": "x"})
            await ActionRunner(store, upstreams, settings, "w1").run_until_idle()
            second, _ = await store.enqueue("secmaster", task, "comment", {"comment": "twice"})
            [claimed] = await store.claim_actions("w1", limit=10, lease=60)
            assert claimed.id == second
            inputs = await store.baseline_inputs([second])
            assert isinstance(inputs[second].payload, dict)
            # the earlier comment, not the other kind
            assert [json.loads(str(p)) for p in inputs[second].done] == [{"comment": "twice"}]
            assert await store.baseline_inputs([]) == {}
            await store.finish("w1", [Finish(second, AttemptOutcome.FAILED, ActionStatus.FAILED)])
            # once a snapshot shows it, it counts from the snapshot
            await SyncCycle(store, upstreams, settings, "w1").run()
            third, _ = await store.enqueue("secmaster", task, "comment", {"comment": "twice"})
            [claimed] = await store.claim_actions("w1", limit=10, lease=60)
            assert (await store.baseline_inputs([third]))[third].done == []


def _aware(value: Any) -> datetime:
    if isinstance(value, str):  # SQLite
        value = datetime.fromisoformat(value)
    moment: datetime = value
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


async def test_lease_renewal_skips_rows_being_written(database: Database, store: Store) -> None:
    """PostgreSQL: recording attempts or outcomes locks our rows in its own order, beside the
    renewal on another connection; the renewal must not wait for them (two statements waiting
    on each other are a deadlock), only renew the others."""
    if database.kind != "postgres":
        pytest.skip("SQLite writes one transaction at a time")
    first, _ = await store.enqueue("secmaster", "t1", "comment", {"comment": "a"})
    second, _ = await store.enqueue("secmaster", "t2", "comment", {"comment": "b"})
    await store.claim_actions("w1", limit=10, lease=5)
    async with store.engine.connect() as busy:
        await busy.execute(sa.text("SELECT id FROM actions WHERE id = :i FOR UPDATE"), {"i": first})
        with anyio.fail_after(5):
            await store.renew_action_leases("w1", [first, second], lease=3600)
        await busy.rollback()
    leases = {
        r["id"]: _aware(r["lease_until"])
        for r in await rows(store, "SELECT id, lease_until FROM actions")
    }
    soon = datetime.now(UTC) + timedelta(seconds=60)
    assert leases[first] < soon < leases[second]
