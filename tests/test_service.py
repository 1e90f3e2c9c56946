"""`tasksync run`: the real daemon in a subprocess, against the sandbox in the test's event loop,
with a fake systemd notify socket. Plus the pure parts of worker.service in-process."""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, OperationalError

from tests.support.cli import clean_env, run_cli, spawn_cli
from tests.support.db import PG_URL, Database
from tests.support.sandbox import clients, settings_for
from worker.actions import ActionRunner, ApplyStats
from worker.config import Schedule, Settings
from worker.hooks import Hooks
from worker.sandbox import Sandbox
from worker.service import LISTEN_SAFETY_POLL, Daemon, GatedStore, Health, Pulse, _trigger
from worker.store import Store, create_engine
from worker.store.listen import describe_outage, is_outage, listen_dsn

pytestmark = pytest.mark.anyio

WATCHDOG_USEC = 1_000_000  # pings every 0.5 s
COMMENT_TASKS = 6
SQLITE_ONLY = pytest.mark.parametrize("database", ["sqlite"], indirect=True)


# --- a fake systemd ----------------------------------------------------------------------------


class NotifySocket:
    """The receiving end of sd_notify: an abstract AF_UNIX datagram socket (no path length
    limit to worry about), read by a thread as systemd would, at once: a datagram queue left
    to fill up would block the daemon's sends (and with them its event loop)."""

    def __init__(self) -> None:
        self.name = f"@tasksync-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.sock.settimeout(0.1)
        self.received: list[tuple[float, str]] = []  # (monotonic time, one KEY=value field)
        self._closing = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closing.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            now = time.monotonic()
            self.received += [(now, line) for line in data.decode().splitlines()]

    def fields(self, key: str) -> list[tuple[float, str]]:
        return [(t, f) for t, f in list(self.received) if f.startswith(key + "=")]

    async def wait_for(self, key: str, timeout: float, value: str | None = None) -> float:
        """Time the first `KEY=value` (any value when None) arrived."""
        with anyio.fail_after(timeout):
            while True:
                for t, f in self.fields(key):
                    if value is None or f == f"{key}={value}":
                        return t
                await anyio.sleep(0.05)

    def close(self) -> None:
        self._closing.set()
        self._reader.join()
        self.sock.close()


@contextmanager
def notify_socket() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    try:
        yield sock
    finally:
        sock.close()


# --- the daemon --------------------------------------------------------------------------------


class DaemonProcess:
    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    async def wait(self, timeout: float) -> int:
        """The exit status; polls so that the sandbox in this event loop keeps serving."""
        with anyio.fail_after(timeout):
            while (code := self.proc.poll()) is None:
                await anyio.sleep(0.05)
        return code


def daemon_env(db: Database, notify: NotifySocket | None, **extra: str) -> dict[str, str]:
    env = clean_env()
    env.update(
        TASKSYNC_DATABASE__URL=db.url,
        TASKSYNC_WORKER__SYNC_SCHEDULE="2s",
        TASKSYNC_WORKER__ACTION_POLL_INTERVAL="1s",
        TASKSYNC_RETRY__BASE_DELAY="0.2s",
        PYTHONUNBUFFERED="1",
    )
    if notify is not None:
        env.update(NOTIFY_SOCKET=notify.name, WATCHDOG_USEC=str(WATCHDOG_USEC))
    env.update(extra)
    return env


@asynccontextmanager
async def daemon(
    tmp_path: Path, sb: Sandbox, env: dict[str, str], *, name: str = "daemon"
) -> AsyncIterator[DaemonProcess]:
    config = tmp_path / "tasksync.toml"
    config.write_text(sb.config_toml())
    config.chmod(0o600)
    log = tmp_path / f"{name}.log"
    with log.open("wb") as out:
        proc = spawn_cli(
            "--config",
            str(config),
            "run",
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    process = DaemonProcess(proc, log)
    try:
        yield process
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


async def track_all(store: Store, sb: Sandbox) -> None:
    for system in ("aicc", "secmaster", "koodrive"):
        await store.track(system, sb.task_ids(system))


async def scalar(store: Store, sql: str, **params: Any) -> Any:
    async with store.engine.begin() as conn:
        return await conn.scalar(sa.text(sql), params)


async def insert_comment(store: Store, task_id: str, comment: str) -> int:
    """Queue an action the way a user does: a plain SQL insert."""
    async with store.engine.begin() as conn:
        return int(
            await conn.scalar(
                sa.text(
                    "INSERT INTO actions (system, task_id, kind, params) "
                    "VALUES ('secmaster', :task, 'comment', :params) RETURNING id"
                ),
                {"task": task_id, "params": f'{{"comment": "{comment}"}}'},
            )
        )


async def wait_status(store: Store, action_id: int, status: str, timeout: float) -> float:
    """Seconds until the action reached `status`."""
    started = time.monotonic()
    with anyio.fail_after(timeout):
        while True:
            action = await store.get_action(action_id)
            if action is not None and action["status"] == status:
                return time.monotonic() - started
            await anyio.sleep(0.05)


async def finished_cycles(store: Store) -> int:
    return int(
        await scalar(
            store,
            "SELECT count(*) FROM sync_runs WHERE kind = 'sync' AND finished_at IS NOT NULL",
        )
    )


async def held_leases(store: Store) -> tuple[int, int]:
    """Leases still held (owner set and not yet expired) on tasks and on actions."""
    now = datetime.now(UTC)
    out = []
    for table in ("tasks", "actions"):
        async with store.engine.connect() as conn:
            rows = (
                await conn.execute(
                    sa.text(f"SELECT lease_until FROM {table} WHERE lease_owner IS NOT NULL")
                )
            ).all()
        out.append(sum(1 for (until,) in rows if until is not None and _utc(until) > now))
    return out[0], out[1]


def _utc(value: Any) -> datetime:
    if isinstance(value, str):  # SQLite through sa.text: the stored text
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


# --- end to end ----------------------------------------------------------------------------------


async def test_ready_watchdog_fast_actions_and_clean_stop(
    database: Database, store: Store, tmp_path: Path
) -> None:
    async with Sandbox(seed=3, tasks_per_system=COMMENT_TASKS) as sb:
        for system in ("secmaster", "koodrive"):  # AICC's tasks are left for discovery
            await store.track(system, sb.task_ids(system))
        with notify_socket() as notify:
            # long schedules: the start-up cycle and discovery must happen anyway, and actions
            # must not wait for either
            env = daemon_env(
                database,
                notify,
                TASKSYNC_WORKER__SYNC_SCHEDULE="1h",
                TASKSYNC_SYSTEMS__AICC__DISCOVER="true",
            )
            async with daemon(tmp_path, sb, env) as proc:
                ready = await notify.wait_for("READY", 30, "1")
                with anyio.fail_after(20):
                    while await finished_cycles(store) < 1 or await scalar(
                        store, "SELECT count(*) FROM tasks WHERE system = 'aicc'"
                    ) < len(sb.task_ids("aicc")):
                        await anyio.sleep(0.1)
                polled = await scalar(
                    store,
                    "SELECT count(*) FROM tasks WHERE last_polled_at IS NOT NULL "
                    "AND system <> 'aicc'",
                )
                assert polled == 2 * COMMENT_TASKS

                task_id = sb.task_ids("secmaster")[0]
                action_id = await insert_comment(store, task_id, "from the test")
                latency = await wait_status(store, action_id, "succeeded", 15)
                # Woken, not waited for: PostgreSQL's NOTIFY (else the 30 s safety poll) or
                # SQLite's 1 s action poll, never the hour-long sync schedule. A third of the
                # safety poll, so a loaded machine (CI runs two test workers) cannot fail it.
                assert latency < LISTEN_SAFETY_POLL / 3, f"applied after {latency:.2f}s"
                applied = sb.applied("secmaster", task_id)
                assert [e.params["comment"] for e in applied] == ["from the test"]

                await anyio.sleep(2.0)
                pings = [t for t, _ in notify.fields("WATCHDOG") if t > ready]
                assert len(pings) >= 3, proc.output
                assert any("actions:" in f for _, f in notify.fields("STATUS"))

                proc.signal(signal.SIGTERM)
                assert await proc.wait(30) == 0, proc.output
                await notify.wait_for("STOPPING", 1, "1")
                assert await held_leases(store) == (0, 0)
                assert len(sb.applied("secmaster", task_id)) == 1  # applied exactly once
                assert "Traceback" not in proc.output
    print(f"{database.kind}: action applied {latency:.2f}s after the INSERT")


@SQLITE_ONLY  # the watchdog gate does not depend on the database
async def test_wedged_loop_stops_the_watchdog(database: Database, tmp_path: Path) -> None:
    async with Sandbox(seed=3, tasks_per_system=2) as sb:
        with notify_socket() as notify:
            env = daemon_env(
                database,
                notify,
                TASKSYNC_TEST_WEDGE="sync:3",
                TASKSYNC_WORKER__SHUTDOWN_TIMEOUT="1s",
            )
            async with daemon(tmp_path, sb, env) as proc:
                ready = await notify.wait_for("READY", 30, "1")
                # healthy at first: pings come
                with anyio.fail_after(10):
                    while len([t for t, _ in notify.fields("WATCHDOG") if t > ready]) < 2:
                        await anyio.sleep(0.1)
                # then the sync loop wedges: pings stop while the process lives on
                with anyio.fail_after(20):
                    while True:
                        await anyio.sleep(0.25)
                        pings = notify.fields("WATCHDOG")
                        if pings and time.monotonic() - pings[-1][0] > 3.0:
                            break
                assert proc.proc.poll() is None
                assert "from sync: withholding the watchdog ping" in proc.output
                # a wedged loop cannot hold up the shutdown: it is cancelled after the budget
                proc.signal(signal.SIGTERM)
                assert await proc.wait(20) == 0, proc.output


async def test_sigterm_during_slow_sync_releases_leases(
    database: Database, store: Store, tmp_path: Path
) -> None:
    async with Sandbox(seed=5, tasks_per_system=4, faults="slow=1.0,slow-seconds=60") as sb:
        await track_all(store, sb)
        task_id = sb.task_ids("secmaster")[0]
        action_id = await insert_comment(store, task_id, "slow")
        env = daemon_env(database, None, TASKSYNC_WORKER__SHUTDOWN_TIMEOUT="2s")
        async with daemon(tmp_path, sb, env) as proc:
            # wait until the cycle and the action are both stuck in a slow request
            with anyio.fail_after(30):
                while sb.requests.total < 3 * 4:
                    await anyio.sleep(0.1)
            await anyio.sleep(0.5)
            assert await held_leases(store) != (0, 0)
            started = time.monotonic()
            proc.signal(signal.SIGTERM)
            assert await proc.wait(20) == 0, proc.output
            elapsed = time.monotonic() - started
        assert elapsed < 2.0 + 6.0, f"stopped after {elapsed:.1f}s"
        assert "did not finish within 2s" in proc.output
        assert await held_leases(store) == (0, 0)
        # the comment's request went out and its answer never came: the action is left for the
        # next claimer to verify, never pending-and-forgotten
        action = await store.get_action(action_id)
        assert action is not None and action["status"] in ("running", "pending")


@SQLITE_ONLY
async def test_second_signal_exits_at_once(
    database: Database, store: Store, tmp_path: Path
) -> None:
    async with Sandbox(seed=5, tasks_per_system=2, faults="slow=1.0,slow-seconds=60") as sb:
        await track_all(store, sb)
        with notify_socket() as notify:
            async with daemon(tmp_path, sb, daemon_env(database, notify)) as proc:
                await notify.wait_for("READY", 30, "1")
                with anyio.fail_after(30):
                    while sb.requests.total < 2:
                        await anyio.sleep(0.1)
                proc.signal(signal.SIGTERM)  # the drain would wait up to 20 s on the slow calls
                await notify.wait_for("STOPPING", 10, "1")
                started = time.monotonic()
                proc.signal(signal.SIGTERM)
                assert await proc.wait(5) == 1, proc.output
                assert time.monotonic() - started < 2.0
                assert "SIGTERM again: exiting at once" in proc.output


@pytest.mark.parametrize("database", ["postgres"], indirect=True)  # terminates its backends
async def test_survives_a_lost_database(database: Database, store: Store, tmp_path: Path) -> None:
    """Without stopping the shared server: first its connections are killed a few times (the
    pool and the LISTEN connection reconnect), then the database refuses connections for a
    while (every loop sees errors and backs off). Afterwards work resumes and nothing is lost."""
    db_name = database.url.rpartition("/")[2]
    assert PG_URL is not None
    admin_url = PG_URL.rpartition("/")[0] + "/postgres"

    async def admin(sql: str) -> int:
        conn = await asyncpg.connect(admin_url)
        try:
            return len(await conn.fetch(sql))
        finally:
            await conn.close()

    terminate = (
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE datname = '{db_name}' AND pid <> pg_backend_pid()"
    )
    async with Sandbox(seed=9, tasks_per_system=COMMENT_TASKS) as sb:
        await track_all(store, sb)
        task_id = sb.task_ids("secmaster")[1]
        with notify_socket() as notify:
            env = daemon_env(database, notify, TASKSYNC_WORKER__SYNC_SCHEDULE="1s")
            async with daemon(tmp_path, sb, env) as proc:
                await notify.wait_for("READY", 30, "1")
                with anyio.fail_after(20):
                    while await finished_cycles(store) < 1:
                        await anyio.sleep(0.1)
                await store.engine.dispose()
                killed = 0
                for _ in range(3):
                    killed += await admin(terminate)
                    await anyio.sleep(1.0)
                assert killed >= 3  # the daemon's connections were there to kill
                first = await insert_comment(store, task_id, "after the kills")
                await wait_status(store, first, "succeeded", 20)

                await store.engine.dispose()
                listens = proc.output.count("listening for queued actions")
                try:
                    await admin(f"ALTER DATABASE {db_name} ALLOW_CONNECTIONS false")
                    await admin(terminate)
                    with anyio.fail_after(20):
                        while not any(
                            "database unavailable since" in f for _, f in notify.fields("STATUS")
                        ):
                            await anyio.sleep(0.1)
                    await anyio.sleep(2.0)
                    assert proc.proc.poll() is None, proc.output
                finally:
                    await admin(f"ALTER DATABASE {db_name} ALLOW_CONNECTIONS true")

                before = await finished_cycles(store)
                second = await insert_comment(store, task_id, "after the outage")
                await wait_status(store, second, "succeeded", 40)
                with anyio.fail_after(40):
                    while await finished_cycles(store) <= before:
                        await anyio.sleep(0.2)
                # the LISTEN connection is back: a new action is applied at once again
                with anyio.fail_after(40):
                    while proc.output.count("listening for queued actions") <= listens:
                        await anyio.sleep(0.2)
                    while "database unavailable" in notify.fields("STATUS")[-1][1]:
                        await anyio.sleep(0.2)
                third = await insert_comment(store, task_id, "listening again")
                latency = await wait_status(store, third, "succeeded", 20)
                assert latency < 2.0, f"applied after {latency:.2f}s"
                assert proc.proc.poll() is None, proc.output
                proc.signal(signal.SIGTERM)
                assert await proc.wait(30) == 0, proc.output
        output = proc.output
        assert "database unavailable (" in output
        assert "Traceback" not in output
        assert [e.params["comment"] for e in sb.applied("secmaster", task_id)] == [
            "after the kills",
            "after the outage",
            "listening again",
        ]


@SQLITE_ONLY  # PostgreSQL runs several workers
async def test_second_worker_on_sqlite_is_refused(database: Database, tmp_path: Path) -> None:
    async with Sandbox(seed=3, tasks_per_system=2) as sb:
        with notify_socket() as notify:
            async with daemon(tmp_path, sb, daemon_env(database, notify)) as first:
                await notify.wait_for("READY", 30, "1")
                second = await anyio.to_thread.run_sync(
                    lambda: run_cli(
                        "--config",
                        str(tmp_path / "tasksync.toml"),
                        "run",
                        env={"TASKSYNC_DATABASE__URL": database.url},
                    )
                )
                assert second.returncode == 1
                assert "another tasksync worker" in second.stderr
                assert "Traceback" not in second.stderr
                assert first.proc.poll() is None
                first.signal(signal.SIGINT)  # SIGINT stops it like SIGTERM
                assert await first.wait(30) == 0, first.output


def test_bad_schedule_is_a_configuration_error(tmp_path: Path) -> None:
    result = run_cli(
        "run",
        env={
            "TASKSYNC_DATABASE__URL": f"sqlite:///{tmp_path / 'x.db'}",
            "TASKSYNC_WORKER__SYNC_SCHEDULE": "every tuesday",
        },
    )
    assert result.returncode == 78
    assert "worker.sync_schedule" in result.stderr


# --- in-process -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "outage"),
    [
        (ConnectionRefusedError(111, "refused"), True),
        (OperationalError("SELECT 1", {}, Exception("server closed the connection")), True),
        (IntegrityError("INSERT", {}, Exception("duplicate key")), False),
        (ValueError("a bug"), False),
        (ExceptionGroup("g", [OSError("x"), ConnectionResetError()]), True),
        (ExceptionGroup("g", [OSError("x"), KeyError("bug")]), False),
    ],
)
def test_outage_or_bug(exc: BaseException, outage: bool) -> None:
    assert is_outage(exc) is outage


def test_outage_is_described_in_one_line() -> None:
    exc = OperationalError("SELECT 1", {}, Exception("connection refused\nDETAIL: more"))
    assert describe_outage(ExceptionGroup("g", [exc])) == "Exception: connection refused"


def test_listen_dsn_is_plain_postgres() -> None:
    dsn = listen_dsn("postgresql://u:p%40ss@db.example:5433/tasksync")
    assert dsn == "postgresql://u:p%40ss@db.example:5433/tasksync"


def test_triggers_and_test_hooks() -> None:
    assert "cron" in type(_trigger(Schedule(cron="*/5 * * * *"))).__name__.lower()
    assert _trigger(Schedule(interval=30)).interval.total_seconds() == 30
    assert Hooks.from_environ({}).wedge is None
    assert Hooks.from_environ({"TASKSYNC_TEST_WEDGE": "actions:2.5"}).wedge == (
        "actions",
        2.5,
        None,
    )
    assert Hooks.from_environ({"TASKSYNC_TEST_WEDGE": "sync"}).wedge == ("sync", 0.0, None)
    assert Hooks.from_environ({"TASKSYNC_TEST_CRASH_AT": "after-answer"}).crash_at == "after-answer"


async def test_a_slow_batch_beats_when_it_records(database: Database, store: Store) -> None:
    """A batch of slow actions shows progress when its attempts are recorded and again when
    its outcomes are, not only when it is claimed: the watchdog must not take a long batch for
    a wedged loop (recording outcomes used to beat only on a path batching had left)."""
    async with Sandbox(seed=4, tasks_per_system=3, faults="slow=1.0,slow-seconds=0.5") as sb:
        settings = settings_for(sb, database.url)
        for n, task_id in enumerate(sb.task_ids("secmaster")):
            await insert_comment(store, task_id, f"slow {n}")
        gated = GatedStore(create_engine(database.url))
        beats: list[float] = []
        gated.on_progress = lambda: beats.append(time.monotonic())
        try:
            async with clients(settings) as upstreams:
                runner = ActionRunner(gated, upstreams, settings, "w1")
                claimed = await gated.claim_actions("w1", limit=10, lease=60)
                assert len(claimed) == 3 and len(beats) == 1
                stats = ApplyStats()
                with anyio.fail_after(20):
                    await runner.process_batch(claimed, stats)
                answered = time.monotonic()
        finally:
            await gated.aclose()
        assert stats.succeeded == 3, stats
        # the claim, the attempts (before the slow sends), the outcomes (after them)
        assert len(beats) == 3, beats
        # the outcomes' beat comes after the slow answers (a lower bound: no timing to lose)
        assert beats[2] - beats[1] >= 0.5 and answered >= beats[2]
        assert await scalar(store, "SELECT count(*) FROM actions WHERE status = 'succeeded'") == 3


def test_status_line() -> None:
    health = Health(queue={"pending": 3, "running": 1})
    assert health.text() == "first sync cycle running; actions: 3 pending, 1 running"
    health.db_down_since = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert health.text().endswith("database unavailable since 2025-01-02 03:04:05Z")


def test_busy_pulse_counts_as_alive_until_it_stalls() -> None:
    from worker.notify import Liveness

    clock = [100.0]
    liveness = Liveness(clock=lambda: clock[0])
    pulse = Pulse("sync", liveness)
    pulse.busy_since, pulse.last_progress = 100.0, 100.0
    pulse.refresh(150.0, stall_limit=60.0)  # slow work, still within one call's budget
    assert liveness.healthy(150.5, max_silence=1.0)
    pulse.refresh(170.0, stall_limit=60.0)  # 70 s without progress: a wedged await
    assert not liveness.healthy(170.5, max_silence=1.0)


async def test_lost_database_is_waited_out(caplog: pytest.LogCaptureFixture) -> None:
    """A loop whose database is gone logs one line, marks the status and backs off; a bug
    propagates."""
    store = GatedStore(create_engine("postgresql://nobody@127.0.0.1:9/none"))
    daemon = Daemon(Settings(), store)
    daemon.arm()
    pulse = Pulse("sync", daemon.liveness)

    async def query(_pulse: Pulse) -> None:
        await store.next_action_due()

    async def stop_soon() -> None:
        await anyio.sleep(0.3)
        daemon.request_stop("test")

    caplog.set_level(logging.WARNING, "worker.service")
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(stop_soon)
            with anyio.fail_after(10):
                assert await daemon._attempt(pulse, query) is False
        assert daemon.health.db_down_since is not None
        assert "database unavailable" in daemon.health.text()
        assert pulse.failures == 1 and pulse.interrupted
        lines = [r.getMessage() for r in caplog.records if r.name == "worker.service"]
        assert len(lines) == 1 and "sync: database unavailable" in lines[0]

        async def bug(_pulse: Pulse) -> None:
            raise KeyError("a bug")

        with pytest.raises(KeyError):
            await daemon._attempt(pulse, bug)
    finally:
        await store.aclose()
