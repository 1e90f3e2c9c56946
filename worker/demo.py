"""`tasksync demo`: the whole life of tasksync in a few seconds, on SQLite, against the sandbox.

Track the sandbox's tasks, sync, queue one action of every kind, apply them, let "someone else"
change a few tasks upstream, sync again, then show what the database now holds. Everything goes
through the same code as the real commands (SyncCycle, ActionRunner, Store); only the upstreams
are simulated. The database is kept afterwards so that the printed queries can be tried on it.
"""

from __future__ import annotations

import tempfile
import tomllib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from worker.catalog import validate_action
from worker.config import Settings
from worker.model import SYSTEMS, ActionStatus, System
from worker.store import Store, worker_name

TASKS_PER_SYSTEM = 12
RULE = "-" * 72


@dataclass(frozen=True)
class Planned:
    system: System
    task_id: str
    kind: str
    params: Mapping[str, str]


def run_demo() -> int:
    from worker.store.migrate import upgrade

    directory = Path(tempfile.mkdtemp(prefix="tasksync-demo-"))
    url = f"sqlite:///{directory / 'demo.db'}"
    upgrade(url)  # Alembic runs its own event loop: before ours starts
    return anyio.run(_demo, url, directory, backend="asyncio")


async def _demo(url: str, directory: Path) -> int:
    from worker.actions import ActionRunner
    from worker.sandbox import Sandbox
    from worker.sync import SyncCycle
    from worker.upstreams import build_upstreams

    async with Sandbox(seed=7, tasks_per_system=TASKS_PER_SYSTEM) as sb:
        data: dict[str, Any] = tomllib.loads(sb.config_toml())
        data["database"] = {"url": url}
        settings = Settings.model_validate(data)
        store = Store.open(url)
        upstreams = build_upstreams(settings)
        worker = worker_name()
        try:
            print(f"tasksync demo: sandbox at {sb.base_url}, database {directory / 'demo.db'}")
            print(RULE)
            for system in SYSTEMS:
                await store.track(system, sb.task_ids(system))
            print(f"1. tracked {TASKS_PER_SYSTEM} tasks in each of {', '.join(SYSTEMS)}")

            cycle = SyncCycle(store, upstreams, settings, worker)
            stats = await cycle.run(all_tasks=True)
            print(
                f"2. first sync: {stats.polled} polled, {stats.changed} stored, {stats.failed} failed"
            )

            plan = await _plan(store, sb.task_ids("aicc"), sb.task_ids("secmaster"))
            for item in plan:
                spec, params = validate_action(item.system, item.kind, dict(item.params))
                await store.enqueue(spec.system, item.task_id, spec.kind, params)
            kinds = ", ".join(f"{p.system} {p.kind}" for p in plan)
            print(f"3. queued {len(plan)} actions: {kinds}")

            applied = await ActionRunner(store, upstreams, settings, worker).run_until_idle()
            print(f"4. applied them: {applied}")

            changed = sb.mutate_random(5)
            print(f"5. changed {len(changed)} tasks upstream, as another user would:")
            for effect in changed:
                what = ", ".join(f"{k}={v}" for k, v in effect.params.items() if v is not None)
                print(f"     {effect.system} {effect.task_id}: {effect.kind} ({what})")

            stats = await cycle.run(all_tasks=True)
            print(
                f"6. second sync: {stats.polled} polled, {stats.changed} changed, "
                f"{stats.failed} failed"
            )
            print(RULE)
            tracked = {system: sb.task_ids(system) for system in SYSTEMS}
            ok = await _report(store, tracked, directory / "demo.db")
        finally:
            for client in upstreams.values():
                await client.aclose()
            await store.aclose()
    return 0 if ok else 1


async def _plan(store: Store, aicc: list[str], secmaster: list[str]) -> list[Planned]:
    """One action of every kind, each on a task where it succeeds: chosen from the snapshots
    the first sync stored (open tasks to act on; an existing comment and attachment to delete)."""
    shown = {t: await store.show_task("secmaster", t) for t in secmaster}
    waiting = [t for t, info in shown.items() if info and info["task"]["status"] == "waiting"]
    commented = [t for t in waiting if _payload(shown[t]).get("comments")]
    attached = [t for t in waiting if _payload(shown[t]).get("attachment_id_list")]
    open_aicc = []
    for task_id in aicc:
        info = await store.show_task("aicc", task_id)
        if info and info["task"]["state"] in ("open", "in_progress"):
            open_aicc.append(task_id)
    if not (open_aicc and commented and attached and len(waiting) >= 4):
        raise RuntimeError("the sandbox's seed has no suitable tasks for every action kind")

    comment_task, attachment_task = commented[0], attached[0]
    others = [t for t in waiting if t not in (comment_task, attachment_task)]
    comment_id = str(_payload(shown[comment_task])["comments"][0]["id"])
    attachment_id = str(_payload(shown[attachment_task])["attachment_id_list"][0])
    return [
        Planned(
            "aicc",
            open_aicc[0],
            "process",
            {"title": "Checked by tasksync", "description": "Handled in the tasksync demo."},
        ),
        Planned("secmaster", others[0], "comment", {"comment": "Looked at this in the demo."}),
        Planned("secmaster", comment_task, "delete-comment", {"comment_id": comment_id}),
        Planned(
            "secmaster", others[1], "add-attachment", {"attachment_id": "demo-report-0001.pdf"}
        ),
        Planned(
            "secmaster", attachment_task, "delete-attachment", {"attachment_id": attachment_id}
        ),
        Planned("secmaster", others[2], "terminate", {}),
        Planned("secmaster", others[3], "continue", {}),
    ]


def _payload(info: Mapping[str, Any] | None) -> Mapping[str, Any]:
    snapshot = info.get("snapshot") if info else None
    payload = snapshot.get("payload") if snapshot else None
    return payload if isinstance(payload, Mapping) else {}


async def _report(store: Store, tracked: Mapping[System, list[str]], db_file: Path) -> bool:
    snapshots: Counter[str] = Counter()
    events: Counter[str] = Counter()
    for system, task_ids in tracked.items():
        for task_id in task_ids:
            info = await store.show_task(system, task_id)
            if info is None:
                continue
            snapshots[system] += int(info["task"]["snapshot_seq"])
            events.update(str(e["kind"]) for e in info["events"])

    print("Snapshots stored per system (one per distinct content of a task):")
    for system in SYSTEMS:
        print(f"  {system:<10} {snapshots[system]:>4}")
    print("Events by kind (history derived from the differences):")
    for kind, count in sorted(events.items()):
        print(f"  {kind:<20} {count:>4}")
    print("Actions:")
    print(f"  {'id':>3}  {'system':<10} {'kind':<18} {'task':<38} status")
    actions = await store.list_actions()
    for a in actions:
        print(f"  {a['id']:>3}  {a['system']:<10} {a['kind']:<18} {a['task_id']:<38} {a['status']}")
    print(RULE)
    print(f"The database is kept at {db_file}. Try:")
    print(f'  sqlite3 {db_file} "SELECT system, kind, status, finished_at FROM actions"')
    print(
        f'  sqlite3 {db_file} "SELECT system, task_id, kind, observed_at FROM task_events '
        "WHERE kind <> 'trace' ORDER BY id DESC LIMIT 10\""
    )
    print(f'  sqlite3 {db_file} "SELECT system, state, count(*) FROM tasks GROUP BY system, state"')
    print(f"  TASKSYNC_DATABASE__URL=sqlite:///{db_file} tasksync status")
    return all(a["status"] == ActionStatus.SUCCEEDED for a in actions)
