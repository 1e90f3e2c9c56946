"""The sync engine against the sandbox, on both databases."""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
import pytest
import sqlalchemy as sa

from tests.conftest import Database
from tests.helpers import clients, count, rows, settings_for, track_all
from worker.sandbox import Sandbox
from worker.store import Store
from worker.sync import SyncCycle, discover

pytestmark = pytest.mark.anyio


async def test_first_sync_stores_snapshots_and_history_then_nothing_new(
    database: Database, store: Store
) -> None:
    async with Sandbox(seed=3, tasks_per_system=8) as sb:
        settings = settings_for(sb, database.url)
        assert await track_all(store, sb) == 24
        async with clients(settings) as upstreams:
            stats = await SyncCycle(store, upstreams, settings, "w1").run()
            assert (stats.polled, stats.changed, stats.failed) == (24, 24, 0)
            assert await count(store, "task_snapshots") == 24
            assert await count(store, "task_events", "kind = 'status_changed'") == 0
            # the history a task already has is recorded at the first observation
            traces = sum(
                len(sb.payload("aicc", t).get("taskTrace") or []) for t in sb.task_ids("aicc")
            )
            assert await count(store, "task_events", "kind = 'trace'") == traces
            comments = sum(
                len(sb.payload("secmaster", t)["comments"]) for t in sb.task_ids("secmaster")
            )
            assert await count(store, "task_events", "kind = 'comment_added'") == comments
            events = await count(store, "task_events")

            # tasks reflect the newest snapshot
            for system in ("aicc", "secmaster", "koodrive"):
                for task_id in sb.task_ids(system):  # type: ignore[arg-type]
                    [row] = await rows(
                        store,
                        "SELECT t.status, t.content_hash, s.payload FROM tasks t JOIN task_snapshots s "
                        "ON s.system = t.system AND s.task_id = t.task_id AND s.seq = t.snapshot_seq "
                        "WHERE t.system = :s AND t.task_id = :t",
                        s=system,
                        t=task_id,
                    )
                    payload = row["payload"]
                    if isinstance(payload, str):
                        import json

                        payload = json.loads(payload)
                    assert payload == sb.payload(system, task_id)  # type: ignore[arg-type]

            # an unchanged second cycle (--all) writes no snapshot and no event
            stats = await SyncCycle(store, upstreams, settings, "w1").run(all_tasks=True)
            assert (stats.polled, stats.changed, stats.failed) == (24, 0, 0)
            assert await count(store, "task_snapshots") == 24
            assert await count(store, "task_events") == events
            # nothing is due right after a cycle
            stats = await SyncCycle(store, upstreams, settings, "w1").run()
            assert stats.polled == 0
            assert await count(store, "sync_runs") == 3


async def test_upstream_changes_become_exactly_the_expected_events(
    database: Database, store: Store
) -> None:
    async with Sandbox(seed=4, tasks_per_system=3) as sb:
        settings = settings_for(sb, database.url)
        await track_all(store, sb)
        async with clients(settings) as upstreams:
            cycle = SyncCycle(store, upstreams, settings, "w1")
            await cycle.run()
            before = await count(store, "task_events")
            aicc = sb.task_ids("aicc")[0]
            sec = sb.task_ids("secmaster")[0]
            koo = sb.task_ids("koodrive")[0]
            sb.mutate("aicc", aicc, "trace", title="called back", description="customer reached")
            sb.mutate("aicc", aicc, "status", status="Completed")
            sb.mutate("secmaster", sec, "comment", comment="looked at it")
            sb.mutate("secmaster", sec, "add-attachment", attachment_id="att-1")
            sb.mutate("secmaster", sec, "status", status="finished")
            sb.mutate("koodrive", koo, "status", status=3, result_code="18000205")
            stats = await cycle.run(all_tasks=True)
            assert stats.changed == 3
            new = await rows(
                store,
                "SELECT system, task_id, kind, data FROM task_events WHERE id > :n ORDER BY id",
                n=before,
            )
            kinds = sorted((r["system"], r["kind"]) for r in new)
            assert kinds == sorted(
                [
                    ("aicc", "status_changed"),
                    ("aicc", "trace"),
                    ("secmaster", "status_changed"),
                    ("secmaster", "comment_added"),
                    ("secmaster", "attachment_added"),
                    ("koodrive", "status_changed"),
                ]
            )
            # removals
            comment_id = next(
                c["id"]
                for c in sb.payload("secmaster", sec)["comments"]
                if c["message"] == "looked at it"
            )
            sb.mutate("secmaster", sec, "delete-comment", comment_id=comment_id)
            sb.mutate("secmaster", sec, "delete-attachment", attachment_id="att-1")
            await cycle.run(all_tasks=True)
            removed = await rows(
                store,
                "SELECT kind FROM task_events WHERE kind IN ('comment_removed', 'attachment_removed')",
            )
            assert sorted(r["kind"] for r in removed) == ["attachment_removed", "comment_removed"]
            [task] = await rows(
                store, "SELECT status, state, snapshot_seq FROM tasks WHERE task_id = :t", t=sec
            )
            assert (task["status"], task["state"], task["snapshot_seq"]) == ("finished", "done", 3)


async def test_repeated_and_concurrent_cycles_never_duplicate(
    database: Database, store: Store
) -> None:
    async with Sandbox(seed=5, tasks_per_system=20) as sb:
        settings = settings_for(sb, database.url)
        await track_all(store, sb)
        async with clients(settings) as upstreams:
            await SyncCycle(store, upstreams, settings, "w1").run()
            for task_id in sb.task_ids("secmaster")[:5]:
                sb.mutate("secmaster", task_id, "comment", comment="again")
            # A repeated cycle: the task rows lose their last write (as if the process died
            # after the events were stored), so the same change is computed and written again.
            snapshot = await rows(store, "SELECT id, content_hash, snapshot_seq FROM tasks")
            await SyncCycle(store, upstreams, settings, "w1").run(all_tasks=True)
            events = await count(store, "task_events")
            snapshots = await count(store, "task_snapshots")
            async with store.engine.begin() as conn:
                for row in snapshot:
                    await conn.execute(
                        sa.text(
                            "UPDATE tasks SET content_hash = :h, snapshot_seq = :q WHERE id = :id"
                        ),
                        {"h": row["content_hash"], "q": row["snapshot_seq"], "id": row["id"]},
                    )
            await SyncCycle(store, upstreams, settings, "w1").run(all_tasks=True)
            assert await count(store, "task_events") == events
            assert await count(store, "task_snapshots") == snapshots

            # Two workers racing over the same due tasks
            for task_id in sb.task_ids("secmaster")[5:10]:
                sb.mutate("secmaster", task_id, "comment", comment="race")
            async with store.engine.begin() as conn:
                await conn.execute(sa.text("UPDATE tasks SET next_poll_at = CURRENT_TIMESTAMP"))
            if database.kind == "postgres":
                other = Store.open(database.url)
                try:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(SyncCycle(store, upstreams, settings, "w1").run)
                        tg.start_soon(SyncCycle(other, upstreams, settings, "w2").run)
                finally:
                    await other.aclose()
            else:
                await SyncCycle(store, upstreams, settings, "w1").run()
            assert (
                await count(
                    store,
                    "task_events",
                    "kind = 'comment_added' AND CAST(data AS TEXT) LIKE '%race%'",
                )
                == 5
            )
            dupes = await rows(
                store,
                "SELECT system, task_id, kind, dedup_key, count(*) AS n FROM task_events "
                "GROUP BY system, task_id, kind, dedup_key HAVING count(*) > 1",
            )
            assert dupes == []
            # four cycles over 60 tasks; in the race each task was fetched by one worker only
            assert set(sb.requests.detail.values()) == {4}


async def test_failures_back_off_and_recover(database: Database, store: Store) -> None:
    async with Sandbox(seed=6, tasks_per_system=4, faults="500=1.0") as sb:
        settings = settings_for(sb, database.url, poll_interval=300)
        await track_all(store, sb)
        await store.track("aicc", ["nosuchtask0000000001"])
        async with clients(settings) as upstreams:
            stats = await SyncCycle(store, upstreams, settings, "w1").run()
            assert stats.failed == 13 and stats.changed == 0
            failing = await rows(store, "SELECT * FROM tasks WHERE consecutive_failures > 0")
            assert len(failing) == 13
            assert all(r["last_error"] and "500" in r["last_error"] for r in failing)
            assert await count(store, "sync_runs", "failed = 13") == 1
            # backed off: nothing is due now
            assert (await SyncCycle(store, upstreams, settings, "w1").run()).polled == 0
            sb.set_faults(None)
        # a new process: the old one's circuit for aicc (five 500s in a row) is still open
        async with clients(settings) as upstreams:
            stats = await SyncCycle(store, upstreams, settings, "w1").run(all_tasks=True)
            assert stats.changed == 12 and stats.failed == 1
            [gone] = await rows(store, "SELECT * FROM tasks WHERE consecutive_failures > 0")
            assert gone["task_id"] == "nosuchtask0000000001" and gone["not_found"]
            assert "not found" in gone["last_error"].lower() or "404" in gone["last_error"]
            # a task the upstream says does not exist waits the terminal interval
            [due] = await rows(
                store,
                "SELECT next_poll_at, last_polled_at FROM tasks WHERE task_id = 'nosuchtask0000000001'",
            )
            gap = store_time(due["next_poll_at"]) - store_time(due["last_polled_at"])
            assert gap.total_seconds() >= settings.worker.terminal_poll_interval * 0.99


def store_time(value: object):  # type: ignore[no-untyped-def]
    from datetime import datetime

    if isinstance(value, str):
        return datetime.fromisoformat(value)
    return value


async def test_discover_tracks_new_tasks(database: Database, store: Store) -> None:
    async with Sandbox(seed=7, tasks_per_system=15) as sb:
        settings = settings_for(sb, database.url)
        async with clients(settings) as upstreams:
            listable = {s: u for s, u in upstreams.items() if s != "koodrive"}
            stats = await discover(store, listable, "w1")
            assert stats.new > 0 and not stats.failed
            assert await count(store, "tasks") == stats.new
            again = await discover(store, listable, "w1")
            assert again.new == 0 and again.seen == stats.seen


async def test_two_sync_processes_split_2000_tasks(
    database: Database, store: Store, tmp_path: Path
) -> None:
    if database.kind != "postgres":
        pytest.skip(
            "several workers need PostgreSQL; SQLite refuses a second worker (tested in test_cli)"
        )
    async with Sandbox(seed=8, tasks_per_system=667) as sb:
        assert await track_all(store, sb) == 2001
        config = tmp_path / "tasksync.toml"
        config.write_text(sb.config_toml())
        config.chmod(0o600)
        env = {"TASKSYNC_DATABASE__URL": database.url, "TASKSYNC_WORKER__BATCH_SIZE": "50"}
        import os

        full_env = {k: v for k, v in os.environ.items() if not k.startswith("TASKSYNC_")} | env
        cmd = [sys.executable, "-m", "worker", "--config", str(config), "sync", "--quiet"]
        results = []
        with anyio.fail_after(90):
            async with anyio.create_task_group() as tg:

                async def one() -> None:
                    results.append(await anyio.run_process(cmd, env=full_env, check=False))

                tg.start_soon(one)
                tg.start_soon(one)
        assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
        fetched = sb.requests.detail
        assert len(fetched) == 2001
        assert max(fetched.values()) == 1, "a task was fetched twice"
        workers = await rows(store, "SELECT worker, polled FROM sync_runs")
        assert sum(r["polled"] for r in workers) == 2001
        assert await count(store, "task_snapshots") == 2001
