"""The action queue against the sandbox, on both databases: every kind, bad rows, faults at
high rates with exactly-once effects and per-task order, and crashes at every point."""

from __future__ import annotations

import signal
from pathlib import Path

import anyio
import pytest
import sqlalchemy as sa

from tests.support.cli import clean_env, tasksync_argv
from tests.support.db import Database, count, rows
from tests.support.sandbox import clients, settings_for, track_all
from worker.actions import ActionRunner
from worker.sandbox import Sandbox
from worker.store import Store
from worker.sync import SyncCycle

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
