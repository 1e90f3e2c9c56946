"""The chaos scenario: real `tasksync run` processes against a faulty sandbox, killed with
SIGKILL at random moments, a database outage, upstream changes and queued actions, and then
the checks that nothing was lost or duplicated. Used by tests/test_chaos.py.

Every effect of a queued action is identifiable in the sandbox's effect log: comments carry
distinct texts, AICC process actions distinct titles, attachments distinct ids, and
terminate/continue go to tasks reserved for them (nobody else changes their status).
Upstream changes made "by someone else" are only additive (trace entries, comments,
attachments) or status moves, so every one of them stays visible to a poller: a change that
is undone before the next poll could not be in anyone's history.
"""

from __future__ import annotations

import itertools
import json
import random
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import anyio
import orjson
import sqlalchemy as sa
from anyio.abc import Process

from tests.support.cli import clean_env, tasksync_argv
from tests.support.db import Database, rows
from worker.model import SYSTEMS, System
from worker.sandbox import Sandbox
from worker.sandbox.state import Effect
from worker.store import Store

FAULTS = "500=0.1,429=0.05,slow=0.05,slow-seconds=3,drop=0.03,malformed=0.02,expire=120"
PG_CLUSTER = ("15", "main")

# Short schedules: every task is due again a second after each poll, leases expire in 2 s.
CHAOS_ENV = {
    "TASKSYNC_WORKER__SYNC_SCHEDULE": "1s",
    "TASKSYNC_WORKER__LEASE": "2s",
    "TASKSYNC_WORKER__POLL_INTERVAL": "1s",
    "TASKSYNC_WORKER__TERMINAL_POLL_INTERVAL": "1s",
    "TASKSYNC_WORKER__MAX_POLL_BACKOFF": "2s",
    "TASKSYNC_WORKER__ACTION_POLL_INTERVAL": "0.2s",
    "TASKSYNC_WORKER__SHUTDOWN_TIMEOUT": "5s",
    "TASKSYNC_WORKER__CONCURRENCY": "8",
    "TASKSYNC_RETRY__BASE_DELAY": "0.05",
    "TASKSYNC_RETRY__MAX_DELAY": "0.5",
    "TASKSYNC_RETRY__MAX_ATTEMPTS": "50",
}


def base_env(database_url: str) -> dict[str, str]:
    return clean_env(CHAOS_ENV | {"TASKSYNC_DATABASE__URL": database_url})


def chaos_config(sb: Sandbox, path: Path, timeout: float = 1.0) -> Path:
    """The sandbox's configuration with a short timeout on every system (below slow-seconds)."""
    text = sb.config_toml()
    for system in SYSTEMS:
        text = text.replace(f"[systems.{system}]\n", f"[systems.{system}]\ntimeout = {timeout}\n")
    path.write_text(text)
    path.chmod(0o600)
    return path


def decode(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


# -- the plan: what is queued, and how each effect is recognised ----------------------------------


@dataclass(frozen=True)
class Planned:
    system: System
    task_id: str
    kind: str
    params: dict[str, str]
    via: str  # "cli" or "sql"

    @property
    def identity(self) -> tuple[str, ...]:
        return identity(self.system, self.task_id, self.kind, self.params)


def identity(system: str, task_id: str, kind: str, params: Any) -> tuple[str, ...]:
    """What makes an action's effect recognisable in the sandbox's effect log."""
    params = decode(params) if params is not None else {}
    if kind == "comment":
        return ("comment", str(params.get("comment")))
    if kind == "process":
        return ("process", str(params.get("title")))
    if kind == "add-attachment":
        return ("add-attachment", str(params.get("attachment_id")))
    return (kind, system, task_id)


def effect_identity(effect: Effect) -> tuple[str, ...]:
    return identity(effect.system, effect.task_id, effect.kind, dict(effect.params))


def make_plan(sb: Sandbox, rng: random.Random, total: int, cli_share: int) -> list[Planned]:
    """`total` actions over every secmaster and aicc task; `cli_share` of them by the CLI."""
    sec = sb.task_ids("secmaster")
    waiting = [t for t in sec if sb.payload("secmaster", t)["status"] == "waiting"]
    reserved = {waiting[0]: "terminate", waiting[1]: "continue", waiting[2]: "terminate"}
    aicc = sb.task_ids("aicc")
    plan: list[Planned] = []
    n = 0
    while len(plan) < total - len(reserved):
        n += 1
        pick = n % 10
        if pick < 5:
            task = sec[n % len(sec)]
            plan.append(
                Planned("secmaster", task, "comment", {"comment": f"chaos note {n:03d}"}, "sql")
            )
        elif pick < 9:
            task = aicc[n % len(aicc)]
            params = {"title": f"chaos step {n:03d}", "description": f"handled in step {n}"}
            plan.append(Planned("aicc", task, "process", params, "sql"))
        else:
            task = sec[n % len(sec)]
            params = {"attachment_id": f"chaos-att-{n:03d}"}
            plan.append(Planned("secmaster", task, "add-attachment", params, "sql"))
    rng.shuffle(plan)
    # terminate/continue go last on their tasks' queues, somewhere in the second half
    for task, kind in reserved.items():
        plan.insert(
            rng.randrange(len(plan) // 2, len(plan)), Planned("secmaster", task, kind, {}, "sql")
        )
    for index in rng.sample(range(len(plan)), cli_share):
        plan[index] = Planned(
            plan[index].system, plan[index].task_id, plan[index].kind, plan[index].params, "cli"
        )
    return plan


def cli_options(planned: Planned) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in planned.params.items()]


class Mutator:
    """Changes tasks as other users would: additive changes and forward status moves only,
    never on the tasks reserved for terminate/continue."""

    def __init__(self, sb: Sandbox, rng: random.Random, reserved: set[str]) -> None:
        self.sb = sb
        self.rng = rng
        self.reserved = reserved
        self.effects: list[Effect] = []
        self.n = 0

    def some(self, count: int) -> None:
        for _ in range(count * 5):
            if count <= 0:
                return
            self.n += 1
            system: System = self.rng.choice(SYSTEMS)
            task = self.rng.choice(self.sb.task_ids(system))
            try:
                if system == "aicc":
                    if self.rng.random() < 0.7:
                        effect = self.sb.mutate(
                            "aicc",
                            task,
                            "trace",
                            title=f"other user {self.n}",
                            description=f"note {self.n}",
                        )
                    else:
                        effect = self.sb.mutate("aicc", task, "status")
                elif system == "secmaster":
                    roll = self.rng.random()
                    if roll < 0.5:
                        effect = self.sb.mutate(
                            "secmaster", task, "comment", comment=f"someone else {self.n}"
                        )
                    elif roll < 0.8:
                        effect = self.sb.mutate(
                            "secmaster", task, "add-attachment", attachment_id=f"other-{self.n}"
                        )
                    elif task not in self.reserved:
                        effect = self.sb.mutate("secmaster", task, "status")
                    else:
                        continue
                else:
                    effect = self.sb.mutate("koodrive", task, "status")
            except ValueError:  # e.g. already Completed / ended: pick another
                continue
            self.effects.append(effect)
            count -= 1


# -- processes -------------------------------------------------------------------------------------


@dataclass
class Slot:
    process: Process | None = None
    log: IO[bytes] | None = None
    started: int = 0


@dataclass
class Workers:
    """`tasksync run` processes: started, SIGKILLed, restarted, stopped; every exit accounted."""

    cmd: list[str]
    env: dict[str, str]
    logdir: Path
    count: int
    slots: list[Slot] = field(default_factory=list)
    kills: int = 0
    unexpected: list[str] = field(default_factory=list)
    stop_codes: list[int | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.slots = [Slot() for _ in range(self.count)]

    def log_path(self, i: int, n: int) -> Path:
        return self.logdir / f"worker{i}-run{n}.log"

    async def start(self, i: int) -> None:
        slot = self.slots[i]
        slot.started += 1
        slot.log = self.log_path(i, slot.started).open("wb")
        slot.process = await anyio.open_process(
            [*self.cmd, "run"], env=self.env, stdout=slot.log, stderr=slot.log
        )

    async def _reap(self, i: int) -> None:
        slot = self.slots[i]
        if slot.process is not None:
            await slot.process.wait()
            await slot.process.aclose()
        if slot.log is not None:
            slot.log.close()
        slot.process, slot.log = None, None

    async def check(self) -> None:
        """A worker that exited by itself is a finding: record it and start it again."""
        for i, slot in enumerate(self.slots):
            process = slot.process
            if process is not None and process.returncode is not None:
                tail = self.log_path(i, slot.started).read_text(errors="replace")[-1500:]
                self.unexpected.append(
                    f"worker {i} run {slot.started} exited {process.returncode}: {tail}"
                )
                await self._reap(i)
                await self.start(i)

    async def kill(self, i: int) -> None:
        await self.check()
        slot = self.slots[i]
        assert slot.process is not None
        slot.process.send_signal(signal.SIGKILL)
        self.kills += 1
        await self._reap(i)

    async def stop_all(self, budget: float = 30) -> None:
        await self.check()
        for slot in self.slots:
            if slot.process is not None:
                slot.process.send_signal(signal.SIGTERM)
        with anyio.fail_after(budget):
            for i, slot in enumerate(self.slots):
                process = slot.process
                if process is not None:
                    self.stop_codes.append(await process.wait())
                await self._reap(i)

    async def aclose(self) -> None:
        """Whatever happened: no process outlives the test."""
        with anyio.CancelScope(shield=True):
            for i, slot in enumerate(self.slots):
                if slot.process is not None and slot.process.returncode is None:
                    slot.process.kill()
                await self._reap(i)

    def tracebacks(self) -> int:
        return sum(
            p.read_text(errors="replace").count("Traceback")
            for p in self.logdir.glob("worker*.log")
        )


# -- database outages --------------------------------------------------------------------------


def pg_ready() -> bool:
    return subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1"], check=False).returncode == 0


async def wait_pg_ready(limit: float = 60) -> None:
    with anyio.fail_after(limit):
        while not await anyio.to_thread.run_sync(pg_ready):
            await anyio.sleep(0.2)


async def restart_postgres() -> float:
    """Restart the server (every connection drops); seconds until it accepts connections."""
    started = time.monotonic()
    with anyio.fail_after(60):
        await anyio.run_process(
            ["pg_ctlcluster", "--skip-systemctl-redirect", *PG_CLUSTER, "restart"], check=True
        )
    await wait_pg_ready()
    return time.monotonic() - started


async def ensure_postgres_running() -> None:
    """After the test, whatever happened: the server must be up for everyone else."""
    with anyio.CancelScope(shield=True):
        if await anyio.to_thread.run_sync(pg_ready):
            return
        with anyio.move_on_after(60):
            await anyio.run_process(
                ["pg_ctlcluster", "--skip-systemctl-redirect", *PG_CLUSTER, "start"], check=False
            )
            await wait_pg_ready()


async def hold_sqlite_lock(path: str, seconds: float) -> float:
    """Hold an exclusive transaction on the file from another connection for `seconds`."""

    def hold() -> float:
        conn = sqlite3.connect(path, timeout=30, isolation_level=None)
        try:
            begun = time.monotonic()
            conn.execute("BEGIN EXCLUSIVE")
            waited = time.monotonic() - begun
            time.sleep(seconds)
            conn.execute("ROLLBACK")
            return waited
        finally:
            conn.close()

    with anyio.fail_after(seconds + 40):
        return await anyio.to_thread.run_sync(hold)


# -- queueing --------------------------------------------------------------------------------------


async def enqueue_sql(store: Store, database: Database, batch: list[Planned]) -> None:
    cast = "CAST(:p AS JSONB)" if database.kind == "postgres" else ":p"
    statement = sa.text(
        f"INSERT INTO actions (system, task_id, kind, params) VALUES (:s, :t, :k, {cast})"
    )
    rows = [
        {"s": p.system, "t": p.task_id, "k": p.kind, "p": orjson.dumps(p.params).decode()}
        for p in batch
    ]
    with anyio.fail_after(40):
        while True:
            try:
                async with store.engine.begin() as conn:
                    for row in rows:
                        await conn.execute(statement, row)
                return
            except sa.exc.DBAPIError as exc:
                # the server was restarted under a pooled connection (like any SQL client
                # would, the test side retries; the transaction was rolled back as a whole)
                if not exc.connection_invalidated:
                    raise
                await anyio.sleep(0.2)


async def enqueue_cli(cmd: list[str], env: dict[str, str], planned: Planned, key: str) -> int:
    with anyio.fail_after(60):
        result = await anyio.run_process(
            [
                *cmd,
                "enqueue",
                planned.system,
                planned.task_id,
                planned.kind,
                *cli_options(planned),
                "--key",
                key,
            ],
            env=env,
            check=False,
        )
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    return int(result.stdout.decode().strip())


# -- the scenario ----------------------------------------------------------------------------------


@dataclass
class Outcome:
    figures: dict[str, Any]
    problems: list[str]


async def run_chaos(
    *,
    database: Database,
    store: Store,
    tmp_path: Path,
    workers: int,
    seed: int,
    tasks_per_system: int = 10,
    actions: int = 60,
    cli_share: int = 10,
    waves: int = 5,
    kills: int = 4,
    emit: Callable[[str], None] = print,
) -> Outcome:
    rng = random.Random(seed)
    began = time.monotonic()
    problems: list[str] = []
    figures: dict[str, Any] = {"database": database.kind, "workers": workers, "seed": seed}
    async with Sandbox(seed=seed, tasks_per_system=tasks_per_system) as sb:
        config = chaos_config(sb, tmp_path / "tasksync.toml")
        env = base_env(database.url)
        cmd = tasksync_argv("--config", str(config))
        for system in SYSTEMS:
            await store.track(system, sb.task_ids(system))
        plan = make_plan(sb, rng, actions, cli_share)
        reserved = {p.task_id for p in plan if p.kind in ("terminate", "continue")}
        mutator = Mutator(sb, rng, reserved)
        pool = Workers(cmd, env, tmp_path, workers)
        waves_of = [plan[i::waves] for i in range(waves)]
        outage = waves // 2
        figures["outage"] = None
        cli_ids: dict[tuple[str, ...], int] = {}
        phases: dict[str, float] = {}
        figures["phases"] = phases

        def mark(name: str) -> None:
            phases[name] = round(time.monotonic() - began, 1)

        try:
            sb.set_faults(FAULTS)
            for i in range(workers):
                await pool.start(i)
            for wave, batch in enumerate(waves_of):
                # queue this wave: the CLI ones in the background while time passes, the rest
                # in one SQL transaction; other users change tasks meanwhile
                async with anyio.create_task_group() as tg:
                    for planned in (p for p in batch if p.via == "cli"):

                        async def one(p: Planned = planned) -> None:
                            key = "chaos-" + "-".join(p.identity)
                            cli_ids[p.identity] = await enqueue_cli(cmd, env, p, key)

                        tg.start_soon(one)
                    await enqueue_sql(store, database, [p for p in batch if p.via == "sql"])
                    mutator.some(rng.randint(4, 8))
                    await anyio.sleep(rng.uniform(0.8, 2.5))
                mark(f"wave {wave}")
                await pool.check()
                if wave == outage:
                    if database.kind == "postgres":
                        seconds = await restart_postgres()
                        figures["outage"] = (
                            f"PostgreSQL restarted ({seconds:.1f} s until it accepted connections again)"
                        )
                    else:
                        path = database.url.removeprefix("sqlite:///")
                        waited = await hold_sqlite_lock(path, 3.0)
                        figures["outage"] = (
                            f"SQLite file held under BEGIN EXCLUSIVE for 3.0 s (after waiting {waited:.1f} s for it)"
                        )
                    mark("outage over")
                    mutator.some(3)
                    await anyio.sleep(rng.uniform(0.5, 1.5))
                if pool.kills < kills:
                    victim = rng.randrange(workers)
                    await pool.kill(victim)
                    if rng.random() < 0.5:
                        await anyio.sleep(rng.uniform(0.1, 1.0))  # sometimes nobody is running
                    await pool.start(victim)
            # idempotency: the first CLI-queued action, queued again with its key
            again = next(p for p in plan if p.via == "cli")
            again_id = await enqueue_cli(cmd, env, again, "chaos-" + "-".join(again.identity))
            if again_id != cli_ids[again.identity]:
                problems.append(
                    f"enqueue with a used key made action {again_id}, not {cli_ids[again.identity]}"
                )
            while pool.kills < kills:  # in case there were fewer waves than kills
                await anyio.sleep(rng.uniform(0.5, 1.5))
                victim = rng.randrange(workers)
                await pool.kill(victim)
                await pool.start(victim)
            mark("waves done")
            await anyio.sleep(3)  # a few more seconds under fire
            figures["faults"] = dict(sb.faults.injected)
            figures["requests"] = sb.requests.total
            sb.set_faults(None)
            # faults off: the queue drains (bounded)
            drained_at = time.monotonic()
            with anyio.move_on_after(40):
                while True:
                    open_actions = await rows(
                        store,
                        "SELECT count(*) AS n FROM actions WHERE status IN ('pending', 'running')",
                    )
                    if open_actions[0]["n"] == 0:
                        break
                    await pool.check()
                    await anyio.sleep(0.3)
            figures["drain_seconds"] = round(time.monotonic() - drained_at, 1)
            mark("drained")
            await pool.stop_all()
            mark("stopped")
        finally:
            await pool.aclose()
        # one final cycle, faults off: a real `tasksync sync --all`
        with anyio.fail_after(60):
            final = await anyio.run_process(
                [*cmd, "sync", "--all", "--quiet"], env=env, check=False
            )
        if final.returncode != 0:
            problems.append(
                f"final sync exited {final.returncode}: {final.stderr.decode()[-1500:]}"
            )
        mark("final sync")
        figures["kills"] = pool.kills
        figures["restarts"] = sum(s.started for s in pool.slots) - workers
        figures["unexpected_exits"] = len(pool.unexpected)
        figures["stop_codes"] = pool.stop_codes
        figures["daemon_tracebacks"] = pool.tracebacks()
        problems += [f"unexpected exit: {u}" for u in pool.unexpected]
        if any(code != 0 for code in pool.stop_codes):
            problems.append(f"SIGTERM exit codes {pool.stop_codes}")
        await verify(sb, store, plan, mutator.effects, figures, problems)
    figures["seconds"] = round(time.monotonic() - began, 1)
    emit(summary(figures, problems))
    (tmp_path / "chaos-summary.json").write_text(
        json.dumps({"figures": figures, "problems": problems}, indent=2, default=str)
    )
    return Outcome(figures, problems)


# -- the checks ------------------------------------------------------------------------------------


async def verify(
    sb: Sandbox,
    store: Store,
    plan: list[Planned],
    mutations: list[Effect],
    figures: dict[str, Any],
    problems: list[str],
) -> None:
    # 1. actions: all there, all finished, failures explained
    db_actions = await rows(
        store,
        "SELECT id, system, task_id, kind, params, status, attempts, last_error FROM actions ORDER BY id",
    )
    by_identity: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for a in db_actions:
        by_identity.setdefault(
            identity(a["system"], a["task_id"], a["kind"], a["params"]), []
        ).append(a)
    statuses = Counter(a["status"] for a in db_actions)
    planned_ids = {p.identity for p in plan}
    missing = [p for p in plan if p.identity not in by_identity]
    extra = [k for k, v in by_identity.items() if k not in planned_ids or len(v) > 1]
    unfinished = [a for a in db_actions if a["status"] not in ("succeeded", "failed")]
    unexplained = [a for a in db_actions if a["status"] == "failed" and not a["last_error"]]
    for label, found in (
        ("missing", missing),
        ("extra or doubled", extra),
        ("unfinished", unfinished),
        ("failed without a reason", unexplained),
    ):
        if found:
            problems.append(f"actions {label}: {found[:5]}")

    # 2. effects: each succeeded action's effect exactly once, none for a failed one, in order
    applied = sb.applied()
    effect_counts = Counter(effect_identity(e) for e in applied)
    duplicates = sum(n - 1 for n in effect_counts.values() if n > 1)
    stray = [k for k in effect_counts if k not in planned_ids]
    lost = len(missing) + len(unfinished)
    misreported = 0
    for key, found in by_identity.items():
        status = found[0]["status"]
        n = effect_counts.get(key, 0)
        if status == "succeeded" and n == 0:
            lost += 1
            problems.append(
                f"action {found[0]['id']} {key} succeeded but its effect is not upstream"
            )
        if status == "failed" and n > 0:
            misreported += 1
            problems.append(
                f"action {found[0]['id']} {key} failed ({found[0]['last_error']}) but was applied {n}x"
            )
    if duplicates:
        problems.append(
            f"duplicated effects: {[(k, n) for k, n in effect_counts.items() if n > 1]}"
        )
    if stray:
        problems.append(f"effects of no queued action: {stray}")
    out_of_order = 0
    for task in {(p.system, p.task_id) for p in plan}:
        queued = [
            key
            for key, found in sorted(by_identity.items(), key=lambda kv: kv[1][0]["id"])
            if (found[0]["system"], found[0]["task_id"]) == task
            and found[0]["status"] == "succeeded"
        ]
        seen = [effect_identity(e) for e in sb.applied(task[0], task[1])]
        if [k for k in seen if k in queued] != queued:
            out_of_order += 1
            problems.append(f"{task}: effects {seen} not in queue order {queued}")

    # 3. snapshots: the newest one of every tracked task is the truth
    latest = await rows(store, "SELECT system, task_id, payload FROM latest_snapshots")
    newest = {(r["system"], r["task_id"]): decode(r["payload"]) for r in latest}
    tracked = [(s, t) for s in SYSTEMS for t in sb.task_ids(s)]
    stale = [key for key in tracked if newest.get(key) != sb.payload(*key)]
    if stale:
        problems.append(f"snapshots differing from the truth: {stale[:5]} ({len(stale)} in all)")

    # 4. history: every change upstream exactly once
    events = await rows(
        store, "SELECT system, task_id, kind, data, id FROM task_events ORDER BY id"
    )
    decoded = [(e["system"], e["task_id"], e["kind"], decode(e["data"])) for e in events]
    history_problems = check_history(sb, decoded)
    problems += history_problems
    changes_additive = [
        e
        for e in [*mutations, *applied]
        if e.kind in ("trace", "comment", "add-attachment", "process")
    ]
    status_moves = [
        e for e in [*mutations, *applied] if e.kind in ("status", "terminate", "continue")
    ]

    attempts = await rows(
        store, "SELECT outcome, count(*) AS n FROM action_attempts GROUP BY outcome"
    )
    figures.update(
        {
            "tasks": len(tracked),
            "actions": len(db_actions),
            "actions_by_cli": sum(1 for p in plan if p.via == "cli"),
            "actions_by_sql": sum(1 for p in plan if p.via == "sql"),
            "action_status": dict(statuses),
            "attempts": {r["outcome"] or "none": r["n"] for r in attempts},
            "effects": len(applied),
            "duplicates": duplicates,
            "lost": lost,
            "misreported": misreported,
            "out_of_order": out_of_order,
            "upstream_changes": len(mutations),
            "additive_changes": len(changes_additive),
            "status_moves": len(status_moves),
            "events": len(events),
            "history_problems": len(history_problems),
            "snapshots_equal": len(tracked) - len(stale),
        }
    )


def check_history(sb: Sandbox, events: list[tuple[str, str, str, Any]]) -> list[str]:
    """Every trace entry, comment and attachment the task holds now appears exactly once in its
    history; status changes chain from the first snapshot's status to the current one."""
    problems: list[str] = []
    per_task: dict[tuple[str, str], list[tuple[str, Any]]] = {}
    for system, task, kind, data in events:
        per_task.setdefault((system, task), []).append((kind, data))
    for system in SYSTEMS:
        for task in sb.task_ids(system):
            truth = sb.payload(system, task)
            history = per_task.get((system, task), [])
            counts: Counter[tuple[str, str]] = Counter()
            for kind, data in history:
                if kind == "trace":
                    counts[
                        (
                            "trace",
                            f"{data.get('position')}|{data.get('title')}|{data.get('description')}",
                        )
                    ] += 1
                elif kind == "comment_added":
                    counts[("comment", str(data.get("id")))] += 1
                elif kind == "attachment_added":
                    counts[("attachment", str(data.get("attachment_id")))] += 1
            wanted: list[tuple[str, str]] = []
            if system == "aicc":
                for position, entry in enumerate(truth.get("taskTrace") or []):
                    wanted.append(
                        ("trace", f"{position}|{entry.get('title')}|{entry.get('description')}")
                    )
            if system == "secmaster":
                wanted += [("comment", str(c["id"])) for c in truth.get("comments") or []]
                wanted += [("attachment", str(a)) for a in truth.get("attachment_id_list") or []]
            for key in wanted:
                if counts[key] != 1:
                    problems.append(f"{system} {task}: {key} is in the history {counts[key]} times")
            for key, n in counts.items():
                if key not in wanted:
                    problems.append(f"{system} {task}: history has {key} ({n}x), the task does not")
            changes = [data for kind, data in history if kind == "status_changed"]
            status = truth["taskInfo"]["status"] if system == "aicc" else truth.get("status")
            for before, after in itertools.pairwise(changes):
                if before.get("to") != after.get("from"):
                    problems.append(
                        f"{system} {task}: status history breaks: {before} then {after}"
                    )
            if changes and changes[-1].get("to") != (None if status is None else str(status)):
                problems.append(
                    f"{system} {task}: history ends at {changes[-1].get('to')}, task is {status}"
                )
            if len(changes) != len({json.dumps(c, sort_keys=True) for c in changes}):
                problems.append(f"{system} {task}: a status change is recorded twice: {changes}")
    return problems


def summary(figures: dict[str, Any], problems: list[str]) -> str:
    f = figures
    faults = f.get("faults", {})
    fault_text = ", ".join(f"{name} {n}" for name, n in sorted(faults.items())) or "none"
    status = f.get("action_status", {})
    attempts = f.get("attempts", {})
    lines = [
        "",
        f"=== tasksync chaos: {f['database']}, {f['workers']} worker(s), seed {f['seed']} ===",
        f"run time           {f.get('seconds', '?')} s; {f.get('tasks')} tasks; {f.get('requests')} upstream requests during the faults",
        f"faults injected    {sum(faults.values())}: {fault_text}",
        f"kills              {f.get('kills')} x SIGKILL, {f.get('restarts')} restarts; {f.get('outage')}",
        f"daemon exits       unexpected {f.get('unexpected_exits')}; SIGTERM exit codes {f.get('stop_codes')}; tracebacks in logs {f.get('daemon_tracebacks')}",
        f"actions            {f.get('actions')} queued ({f.get('actions_by_cli')} by `tasksync enqueue`, {f.get('actions_by_sql')} by SQL INSERT): "
        f"{status.get('succeeded', 0)} succeeded, {status.get('failed', 0)} failed, {sum(v for k, v in status.items() if k not in ('succeeded', 'failed'))} unfinished",
        f"attempts           {sum(attempts.values())}: "
        + ", ".join(f"{k} {v}" for k, v in sorted(attempts.items())),
        f"effects counted    {f.get('effects')} upstream; duplicates = {f.get('duplicates')}, lost = {f.get('lost')}, "
        f"misreported = {f.get('misreported')}, out of order = {f.get('out_of_order')}",
        f"upstream changes   {f.get('upstream_changes')} by others + {f.get('effects')} by actions "
        f"({f.get('additive_changes')} additive, {f.get('status_moves')} status moves); {f.get('events')} history events; "
        f"history problems = {f.get('history_problems')}",
        f"snapshots          {f.get('snapshots_equal')}/{f.get('tasks')} newest snapshots equal the sandbox's truth",
        f"queue drained in   {f.get('drain_seconds')} s after the faults were switched off",
        "timeline           " + "; ".join(f"{k} {v}" for k, v in f.get("phases", {}).items()),
        f"problems           {len(problems)}",
    ]
    lines += [f"  - {p[:400]}" for p in problems[:20]]
    return "\n".join(lines)
