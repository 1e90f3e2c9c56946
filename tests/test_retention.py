"""Retention: each key removes exactly its rows and never a newest snapshot or an open action;
dry runs change nothing; big prunes beside a sync cycle and an apply pass; two pruners."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
import sqlalchemy as sa

from tests.support.cli import run_cli
from tests.support.db import Database, count, rows
from tests.support.sandbox import clients, settings_for, track_all
from worker.actions import ActionRunner
from worker.sandbox import Sandbox
from worker.store import RetentionPolicy, Store, utcnow
from worker.store.schema import (
    action_attempts,
    actions,
    prune_runs,
    sync_runs,
    task_events,
    task_snapshots,
    tasks,
)
from worker.sync import SyncCycle

pytestmark = pytest.mark.anyio

DAY = 86400.0
OLD = timedelta(days=100)  # older than every age below
NEW = timedelta(hours=1)


async def _seed(store: Store, now: datetime) -> None:
    """A small world with one row of each case, named so the expectations read plainly."""
    old, new = now - OLD, now - NEW

    def task(task_id: str, seq: int, tracked: bool = True, untracked_at: Any = None) -> Any:
        return {
            "system": "secmaster",
            "task_id": task_id,
            "tracked": tracked,
            "snapshot_seq": seq,
            "first_seen_at": old,
            "next_poll_at": now,
            "untracked_at": untracked_at,
        }

    def snap(task_id: str, seq: int, at: datetime) -> Any:
        return {
            "system": "secmaster",
            "task_id": task_id,
            "seq": seq,
            "fetched_at": at,
            "content_hash": f"{task_id}-{seq}",
            "status": "open",
            "state": "open",
            "payload": {"seq": seq},
        }

    def event(task_id: str, key: str, at: datetime) -> Any:
        return {
            "system": "secmaster",
            "task_id": task_id,
            "kind": "comment_added",
            "dedup_key": key,
            "observed_at": at,
            "data": {"key": key},
        }

    def action(task_id: str, key: str, status: str, finished: datetime | None) -> Any:
        return {
            "system": "secmaster",
            "task_id": task_id,
            "kind": "comment",
            "params": {"comment": key},
            "status": status,
            "idempotency_key": key,
            "created_at": old,
            "updated_at": finished or old,
            "next_attempt_at": old,
            "finished_at": finished,
        }

    async with store.engine.begin() as conn:
        await conn.execute(
            tasks.insert(),
            [
                task("kept", 3),  # tracked; all three snapshots are old
                task("fresh", 2),  # tracked; old seq 1, new seq 2
                task("gone", 1, tracked=False, untracked_at=old),
                task("gone-open", 1, tracked=False, untracked_at=old),  # has a pending action
                task("recent", 1, tracked=False, untracked_at=new),
                task("by-sql", 1, tracked=False, untracked_at=None),  # untracked with SQL
            ],
        )
        await conn.execute(
            task_snapshots.insert(),
            [
                snap("kept", 1, old),  # snapshots: goes
                snap("kept", 2, old),  # snapshots: goes
                snap("kept", 3, old),  # newest: never
                snap("fresh", 1, old),  # snapshots: goes
                snap("fresh", 2, new),
                snap("gone", 1, old),  # untracked (and it is its newest)
                snap("gone-open", 1, old),  # newest of a task with an open action: kept
                snap("recent", 1, new),
                snap("by-sql", 1, new),
            ],
        )
        await conn.execute(
            task_events.insert(),
            [
                event("kept", "e-old", old),  # events: goes
                event("kept", "e-new", new),
                event("gone", "e-gone", new),  # untracked: goes (however new)
                event("gone-open", "e-open", old),  # events: goes; untracked: kept
            ],
        )
        await conn.execute(
            actions.insert(),
            [
                action("kept", "a-succeeded-old", "succeeded", old),  # actions: goes
                action("kept", "a-failed-old", "failed", old),  # actions: goes
                action("kept", "a-canceled-old", "canceled", old),  # actions: goes
                action("kept", "a-succeeded-new", "succeeded", new),
                action("kept", "a-pending-old", "pending", None),  # never
                action("kept", "a-running-old", "running", None),  # never
                action("gone", "a-gone", "succeeded", new),  # untracked: goes
                action("gone-open", "a-open", "pending", None),  # never; keeps its task
            ],
        )
        ids = {
            key: int(i)
            for key, i in (
                await conn.execute(sa.select(actions.c.idempotency_key, actions.c.id))
            ).all()
        }
        await conn.execute(
            action_attempts.insert(),
            [
                {"action_id": ids[k], "started_at": old, "worker": "w", "outcome": "retry"}
                for k in (
                    "a-succeeded-old",
                    "a-succeeded-old",
                    "a-pending-old",
                    "a-running-old",
                    "a-gone",
                    "a-succeeded-new",
                )
            ],
        )
        await conn.execute(
            sync_runs.insert(),
            [
                {"worker": "w", "started_at": old, "finished_at": old},  # sync_runs: goes
                {"worker": "w", "started_at": new, "finished_at": new},
            ],
        )


async def _world(store: Store) -> dict[str, set[str]]:
    """What is left, as readable keys."""
    async with store.engine.connect() as conn:
        snaps = (
            await conn.execute(sa.select(task_snapshots.c.task_id, task_snapshots.c.seq))
        ).all()
        events = (await conn.scalars(sa.select(task_events.c.dedup_key))).all()
        acts = (await conn.scalars(sa.select(actions.c.idempotency_key))).all()
        attempts = (
            await conn.scalars(
                sa.select(actions.c.idempotency_key).select_from(
                    action_attempts.join(actions, actions.c.id == action_attempts.c.action_id)
                )
            )
        ).all()
        runs = (await conn.scalars(sa.select(sync_runs.c.started_at))).all()
        task_rows = (await conn.scalars(sa.select(tasks.c.task_id))).all()
    return {
        "task_snapshots": {f"{t}/{s}" for t, s in snaps},
        "task_events": set(events),
        "actions": {str(a) for a in acts},
        "action_attempts": {f"{a}#{i}" for i, a in enumerate(sorted(str(a) for a in attempts))},
        "sync_runs": {"old" if r < utcnow() - timedelta(days=50) else "new" for r in runs},
        "tasks": set(task_rows),
    }


ALL_SNAPSHOTS = {
    "kept/1",
    "kept/2",
    "kept/3",
    "fresh/1",
    "fresh/2",
    "gone/1",
    "gone-open/1",
    "recent/1",
    "by-sql/1",
}
ALL_EVENTS = {"e-old", "e-new", "e-gone", "e-open"}
ALL_ACTIONS = {
    "a-succeeded-old",
    "a-failed-old",
    "a-canceled-old",
    "a-succeeded-new",
    "a-pending-old",
    "a-running-old",
    "a-gone",
    "a-open",
}
ALL_TASKS = {"kept", "fresh", "gone", "gone-open", "recent", "by-sql"}

# key -> what goes, per table (attempts are counted below: one action has two)
EXPECTED: dict[str, dict[str, set[str]]] = {
    "snapshots": {"task_snapshots": {"kept/1", "kept/2", "fresh/1"}},
    "events": {"task_events": {"e-old", "e-open"}},
    "actions": {"actions": {"a-succeeded-old", "a-failed-old", "a-canceled-old"}},
    "sync_runs": {"sync_runs": {"old"}},
    "untracked": {
        "tasks": {"gone"},
        "task_snapshots": {"gone/1"},
        "task_events": {"e-gone"},
        "actions": {"a-gone"},
    },
}
ATTEMPTS_GONE = {"actions": 2, "untracked": 1}  # a-succeeded-old's two, a-gone's one
TABLES = ("task_snapshots", "task_events", "actions", "action_attempts", "sync_runs", "tasks")


def _expected_counts(keys: list[str]) -> dict[str, int]:
    counts = {t: len(set().union(*(EXPECTED[k].get(t, set()) for k in keys))) for t in TABLES}
    counts["action_attempts"] = sum(ATTEMPTS_GONE.get(k, 0) for k in keys)
    return counts


@pytest.mark.parametrize(
    "keys", [["snapshots"], ["events"], ["actions"], ["sync_runs"], ["untracked"], list(EXPECTED)]
)
async def test_each_key_removes_exactly_its_rows(store: Store, keys: list[str]) -> None:
    now = utcnow()
    await _seed(store, now)
    before = await _world(store)
    assert before["task_snapshots"] == ALL_SNAPSHOTS and before["actions"] == ALL_ACTIONS
    policy = RetentionPolicy(**{k: 90 * DAY for k in keys}, batch_size=2)  # type: ignore[arg-type]

    dry = await store.prune(policy, "w", dry_run=True, now=now)
    assert await _world(store) == before  # a dry run changes nothing
    assert await count(store, "prune_runs") == 0  # and is not recorded

    removed = await store.prune(policy, "w", now=now)
    assert removed == dry == _expected_counts(keys)
    after = await _world(store)
    for table in ("task_snapshots", "task_events", "actions", "sync_runs", "tasks"):
        gone = set().union(*(EXPECTED[k].get(table, set()) for k in keys))
        assert before[table] - after[table] == gone, table
    # never: a task's newest snapshot, an open action or its attempts
    assert {"kept/3", "fresh/2", "gone-open/1"} <= after["task_snapshots"]
    assert {"a-pending-old", "a-running-old", "a-open"} <= after["actions"]
    assert {a.split("#")[0] for a in after["action_attempts"]} >= {"a-pending-old", "a-running-old"}
    # a second prune finds nothing left
    assert set((await store.prune(policy, "w", now=now)).values()) == {0}

    async with store.engine.connect() as conn:
        run = (await conn.execute(sa.select(prune_runs).order_by(prune_runs.c.id))).first()
        by_sql = await conn.scalar(
            sa.select(tasks.c.untracked_at).where(tasks.c.task_id == "by-sql")
        )
    assert run is not None and run.finished_at is not None and run.deleted == removed
    # a task untracked by hand gets its clock started by the first prune that sees it
    assert (by_sql is not None) == ("untracked" in keys)


async def test_untrack_starts_the_clock_and_track_stops_it(store: Store) -> None:
    await store.track("aicc", ["a", "b"])
    assert await store.untrack("aicc", ["a"]) == 1
    policy = RetentionPolicy(untracked=DAY)
    assert (await store.prune(policy, "w", dry_run=True))["tasks"] == 0  # untracked just now
    later = utcnow() + timedelta(days=2)
    assert (await store.prune(policy, "w", dry_run=True, now=later))["tasks"] == 1
    await store.track("aicc", ["a"])  # tracked again: no longer a candidate
    assert (await store.prune(policy, "w", now=later))["tasks"] == 0
    assert await count(store, "tasks", "tracked") == 2


# -- big prunes --------------------------------------------------------------------------------


def _bulk_rows(database: Database) -> int:
    # PostgreSQL inserts half a million rows in a few seconds; SQLite's one writer makes the
    # prune itself slower, so it gets a tenth (the batching is the same code).
    return 500_000 if database.kind == "postgres" else 50_000


async def _bulk_insert(store: Store, rows: int) -> None:
    """Old snapshots and events of tasks nobody tracks (so none of them is a newest snapshot),
    inserted with one set-based statement each."""
    half = rows // 2
    if store.is_postgres:
        series = f"generate_series(1, {half}) AS g(n)"
        when = "now() - interval '400 days'"
        payload = "'{}'::jsonb"
    else:
        series = f"(WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < {half}) SELECT n FROM c) AS g"
        when = "datetime('now', '-400 days')"
        payload = "'{}'"
    async with store.engine.begin() as conn:
        await conn.execute(
            sa.text(
                "INSERT INTO task_snapshots (system, task_id, seq, fetched_at, content_hash, "
                f"status, state, payload) SELECT 'aicc', 'bulk-' || (n / 10), n, {when}, 'h', "
                f"'x', 'done', {payload} FROM {series}"
            )
        )
        await conn.execute(
            sa.text(
                "INSERT INTO task_events (system, task_id, kind, dedup_key, observed_at, data) "
                f"SELECT 'aicc', 'bulk-' || (n / 10), 'trace', 'k' || n, {when}, {payload} "
                f"FROM {series}"
            )
        )


async def test_big_prune_beside_a_sync_cycle_and_an_apply_pass(
    database: Database, store: Store
) -> None:
    rows = _bulk_rows(database)
    await _bulk_insert(store, rows)
    assert await count(store, "task_snapshots") + await count(store, "task_events") == rows
    async with Sandbox(seed=41, tasks_per_system=10) as sb:
        settings = settings_for(sb, database.url, batch_size=5)
        await track_all(store, sb)
        targets = sb.task_ids("secmaster")
        for i, task_id in enumerate(targets):
            await store.enqueue("secmaster", task_id, "comment", {"comment": f"beside {i}"})
        policy = RetentionPolicy(snapshots=30 * DAY, events=30 * DAY, batch_size=2000)
        removed: dict[str, int] = {}
        finished: dict[str, float] = {}
        async with clients(settings) as upstreams:

            async def prune() -> None:
                removed.update(await store.prune(policy, "pruner"))
                finished["prune"] = anyio.current_time()

            async def sync() -> None:
                stats = await SyncCycle(store, upstreams, settings, "syncer").run()
                # a task the apply pass holds (reading it back) is left to it, as in the daemon
                assert stats.polled >= 30 - len(targets) and stats.failed == 0
                finished["sync"] = anyio.current_time()

            async def apply() -> None:
                runner = ActionRunner(store, upstreams, settings, "applier")
                with anyio.fail_after(120):
                    while await count(store, "actions", "status IN ('pending', 'running')"):
                        await runner.run_until_idle()
                finished["apply"] = anyio.current_time()

            with anyio.fail_after(300):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(prune)
                    await anyio.sleep(0.2)  # the prune is under way when the others start
                    tg.start_soon(sync)
                    tg.start_soon(apply)
            # no newest snapshot went: each task stored has it, and a cycle now diffs against
            # it (a task the first cycle left to the apply pass is polled here)
            assert await count(store, "latest_snapshots") == await count(
                store, "tasks", "snapshot_seq > 0"
            )
            again = await SyncCycle(store, upstreams, settings, "syncer").run(all_tasks=True)
            assert (again.polled, again.failed) == (30, 0)
    assert removed["task_snapshots"] == removed["task_events"] == rows // 2
    assert await count(store, "task_snapshots", "task_id LIKE 'bulk-%'") == 0
    assert await count(store, "task_events", "task_id LIKE 'bulk-%'") == 0
    assert await count(store, "latest_snapshots") == 30
    assert await count(store, "actions", "status = 'succeeded'") == len(targets)
    for i, task_id in enumerate(targets):
        assert [e.params["comment"] for e in sb.applied("secmaster", task_id)] == [f"beside {i}"]
    # the sync cycle and the apply pass did not wait for the whole prune to end
    assert finished["sync"] < finished["prune"] or database.kind == "sqlite"


async def test_two_pruners_on_postgresql_split_the_rows(database: Database) -> None:
    if database.kind != "postgres":
        pytest.skip("SQLite has one writer: concurrent pruners are a PostgreSQL matter")
    rows = 200_000
    stores = [Store.open(database.url), Store.open(database.url)]
    try:
        await _bulk_insert(stores[0], rows)
        policy = RetentionPolicy(snapshots=DAY, events=DAY, batch_size=1000)
        with anyio.fail_after(240):
            results: list[dict[str, int]] = []

            async def prune(s: Store) -> None:
                results.append(await s.prune(policy, f"pruner-{len(results)}"))

            async with anyio.create_task_group() as tg:
                for s in stores:
                    tg.start_soon(prune, s)
        for table in ("task_snapshots", "task_events"):
            # every row deleted exactly once between them, and both took part
            assert sum(r[table] for r in results) == rows // 2
            assert all(r[table] > 0 for r in results), results
        assert await count(stores[0], "task_snapshots") == 0
        assert await count(stores[0], "prune_runs", "finished_at IS NOT NULL") == 2
    finally:
        for s in stores:
            await s.aclose()


# -- the command and the daemon ----------------------------------------------------------------


def _config(tmp_path: Path, database: Database, retention: str) -> Path:
    path = tmp_path / "tasksync.toml"
    path.write_text(f'[database]\nurl = "{database.url}"\n\n[retention]\n{retention}\n')
    return path


async def test_prune_command_prints_rows_per_table(
    database: Database, store: Store, tmp_path: Path
) -> None:
    now = utcnow()
    await _seed(store, now)
    config = _config(tmp_path, database, 'snapshots = "90d"\nsync_runs = "30d"')
    dry = await anyio.to_thread.run_sync(
        lambda: run_cli("--config", str(config), "prune", "--dry-run")
    )
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert lines[0].split() == ["TABLE", "WOULD", "REMOVE"]
    assert dict(line.split() for line in lines[1:]) == {
        "task_snapshots": "3",
        "task_events": "0",
        "actions": "0",
        "action_attempts": "0",
        "sync_runs": "1",
        "tasks": "0",
    }
    assert await count(store, "task_snapshots") == len(ALL_SNAPSHOTS)
    done = await anyio.to_thread.run_sync(
        lambda: run_cli("--config", str(config), "prune", "--vacuum")
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].split() == ["TABLE", "REMOVED"]
    assert "task_snapshots   3" in done.stdout and "vacuum:" in done.stdout
    assert await count(store, "task_snapshots") == len(ALL_SNAPSHOTS) - 3
    status = await anyio.to_thread.run_sync(
        lambda: run_cli("--config", str(config), "status", "--json")
    )
    import json

    report = json.loads(status.stdout)
    assert report["rows"]["task_snapshots"] == len(ALL_SNAPSHOTS) - 3
    assert report["last_prune"]["deleted"]["task_snapshots"] == 3
    text = await anyio.to_thread.run_sync(lambda: run_cli("--config", str(config), "status"))
    assert "Last prune: " in text.stdout and "removed 3 task_snapshots, 1 sync_runs" in text.stdout


@pytest.mark.parametrize(
    ("retention", "key"),
    [
        ('snapshots = "soon"', "retention.snapshots"),
        ('events = "0d"', "retention.events"),
        ('schedule = "61 * * * *"', "retention.schedule"),
        ("forever = true", "retention.forever"),
    ],
)
def test_bad_retention_config_exits_78_naming_the_key(
    tmp_path: Path, retention: str, key: str
) -> None:
    config = tmp_path / "tasksync.toml"
    config.write_text(f'[database]\nurl = "sqlite:///{tmp_path}/x.db"\n[retention]\n{retention}\n')
    result = run_cli("--config", str(config), "prune")
    assert result.returncode == 78
    assert result.stderr.startswith(f"tasksync: configuration error: {key}")
    assert len(result.stderr.splitlines()) == 1


def test_prune_without_retention_deletes_nothing(tmp_path: Path) -> None:
    config = tmp_path / "tasksync.toml"
    config.write_text(f'[database]\nurl = "sqlite:///{tmp_path}/x.db"\n')
    result = run_cli("--config", str(config), "prune")
    assert result.returncode == 0 and "nothing to prune" in result.stdout


async def test_daemon_prunes_on_its_schedule(
    database: Database, store: Store, tmp_path: Path
) -> None:
    now = utcnow()
    await _seed(store, now)
    with socket.socket() as probe:  # a free port for the metrics listener
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = _config(tmp_path, database, 'sync_runs = "30d"\nschedule = "1s"')
    config.write_text(config.read_text() + f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKSYNC_")}
    async with await anyio.open_process(
        [sys.executable, "-m", "worker", "--config", str(config), "run"], env=env
    ) as proc:
        try:
            with anyio.fail_after(30):
                while not await count(store, "prune_runs", "finished_at IS NOT NULL"):
                    await anyio.sleep(0.2)
            # the rows it removed, as a metric
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{port}/metrics") as answer,
            ):
                text = await answer.text()
            [run] = await rows(
                store, "SELECT deleted FROM prune_runs WHERE finished_at IS NOT NULL"
            )
            deleted = run["deleted"]
            removed = (json.loads(deleted) if isinstance(deleted, str) else deleted)["sync_runs"]
            wanted = f'tasksync_pruned_rows_total{{table="sync_runs"}} {float(removed)}'
            assert removed > 0 and wanted in text, [
                line for line in text.splitlines() if "pruned" in line
            ]
        finally:
            proc.send_signal(signal.SIGTERM)
            with anyio.fail_after(30):
                code = await proc.wait()
    assert code == 0
    assert "old" not in (await _world(store))["sync_runs"]
    assert await count(store, "task_snapshots") == len(ALL_SNAPSHOTS)  # no key: kept


async def test_vacuum_gives_the_space_back_on_sqlite(database: Database, store: Store) -> None:
    await _bulk_insert(store, 20_000)
    before = await store.database_size()
    removed = await store.prune(RetentionPolicy(snapshots=DAY, events=DAY), "w")
    assert removed["task_snapshots"] == removed["task_events"] == 10_000
    if database.kind == "sqlite":
        assert await store.database_size() == before  # deleting leaves the pages allocated
    await store.vacuum()
    after = await store.database_size()
    if database.kind == "sqlite":
        assert after < before / 2
    else:  # PostgreSQL: VACUUM makes the space reusable; the files keep their size
        assert after <= before


async def test_track_racing_a_prune_of_the_same_task_recreates_it(
    database: Database, store: Store
) -> None:
    """The prune's batch holds the untracked task's row; `track` waits, finds it deleted, and
    inserts it anew (it updates before it inserts)."""
    if database.kind != "postgres":
        pytest.skip("SQLite runs one write transaction at a time: no interleaving")
    await store.track("aicc", ["raced"])
    await store.untrack("aicc", ["raced"])
    other = Store.open(database.url)
    try:
        async with other.engine.connect() as conn:
            await conn.begin()
            await conn.execute(  # what a prune batch does first: lock the task row
                sa.select(tasks.c.id).where(tasks.c.task_id == "raced").with_for_update()
            )
            async with anyio.create_task_group() as tg:
                tg.start_soon(store.track, "aicc", ["raced"])
                await anyio.sleep(0.5)
                await conn.execute(tasks.delete().where(tasks.c.task_id == "raced"))
                await conn.commit()
    finally:
        await other.aclose()
    assert await count(store, "tasks", "task_id = 'raced' AND tracked") == 1


async def test_a_prune_asked_to_stop_ends_between_batches_and_says_so(store: Store) -> None:
    await _bulk_insert(store, 4_000)
    batches = 0

    def beat() -> None:
        nonlocal batches
        batches += 1

    removed = await store.prune(
        RetentionPolicy(snapshots=DAY, events=DAY, batch_size=500),
        "w",
        progress=beat,
        should_stop=lambda: batches >= 2,
    )
    assert batches == 2 and removed["task_snapshots"] == 1000 and removed["task_events"] == 0
    async with store.engine.connect() as conn:
        run = (await conn.execute(sa.select(prune_runs))).one()
    assert run.finished_at is None and run.deleted["task_snapshots"] == 1000
