"""`tasksync run`: the daemon. One anyio task group; every loop is started with `tg.start`.

    signals    first SIGTERM/SIGINT: stop claiming, drain within worker.shutdown_timeout;
               a second one exits at once
    scheduler  APScheduler triggers (cron or interval) that only *wake* the sync and discovery
               loops: the work stays inside our task group, a slow cycle never stacks (a wake
               that arrives during a cycle runs one more cycle after it, never several)
    sync       SyncCycle.run at start-up and whenever woken
    discover   discovery of the systems with `discover = true`, at start-up and when woken
    actions    ActionRunner passes, then sleep until the next action is due or until woken
               (PostgreSQL: LISTEN tasksync_actions; SQLite: every worker.action_poll_interval)
    listen     (PostgreSQL) the LISTEN connection, reconnecting on its own
    prune      (when [retention] sets an age) Store.prune on retention.schedule, batch by batch
    status     STATUS= for systemd, and WATCHDOG=1 only while every loop shows progress

Cross-worker coordination is the database's (leases); nothing here assumes it is alone, except
on SQLite, where the worker lock makes it so. A lost database is waited out in every loop with a
capped backoff: leases left behind are handed back once it is back, or expire.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import anyio
from anyio.abc import TaskStatus
from sqlalchemy.ext.asyncio import AsyncEngine

from worker.actions import ActionRunner
from worker.config import LoadedConfig, Schedule, Settings
from worker.hooks import WEDGE_ENV, Hooks
from worker.logs import log_context
from worker.metrics import observe_database
from worker.model import System
from worker.notify import Liveness, Notifier, ping_if_healthy, watchdog_interval
from worker.runner import register_secrets, worker_lock
from worker.startup import LOOP_OPTIONS
from worker.store import ClaimedAction, Finish, Store, create_engine, utcnow, worker_name
from worker.store.listen import ActionListener, describe_outage, is_outage, leased_ids, queue_depth
from worker.sync import CycleStats, SyncCycle, discover
from worker.upstreams import build_upstreams
from worker.upstreams.base import Upstream

log = logging.getLogger("worker.service")

BEAT_SLICE_CAP = 5.0  # idle loops beat at least this often
DB_BACKOFF = (1.0, 30.0)  # a loop that lost the database retries after 1 s, 2 s, ... 30 s
LISTEN_SAFETY_POLL = 30.0  # with LISTEN up, look anyway this often (a notification can be lost)
CLEANUP_BUDGET = 8.0  # releasing leases and closing sessions after the drain (TimeoutStopSec=30)


def run_daemon(loaded: LoadedConfig, hooks: Hooks | None = None) -> int:
    """Run until SIGTERM/SIGINT. 0 after a clean shutdown, 1 when a loop failed."""
    register_secrets(loaded)
    url = loaded.settings.database.url
    with worker_lock(url):  # SQLite: a second worker is refused (WorkerLockError, exit 1)
        http = _bind_metrics(loaded.settings)  # before anything starts: an address in use
        daemon = Daemon(
            loaded.settings, GatedStore(create_engine(url)), hooks or Hooks(), http=http
        )
        try:
            anyio.run(daemon.serve, backend="asyncio", backend_options=LOOP_OPTIONS)
        except Exception as exc:
            # Not a traceback per task: one record, then a non-zero exit so systemd restarts us.
            log.critical("tasksync run: a loop failed; exiting", exc_info=exc)
            return 1
    return 0


class Wake:
    """A resettable wake-up: set by triggers and notifications, consumed by one loop."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        await self._event.wait()

    def consume(self) -> bool:
        """Whether it was set; it is not any more."""
        if not self._event.is_set():
            return False
        self._event = anyio.Event()
        return True


@dataclass
class Pulse:
    """One loop's heartbeat for the watchdog gate (worker.notify.Liveness).

    Idle, a loop beats between short sleeps. Busy (a cycle, a pass over the actions), it beats
    on progress (a task fetched, an action claimed or finished), and the status loop keeps it
    alive between two such events for up to `stall_limit` seconds: no single upstream call or
    statement may take longer, so silence beyond that is a wedged await, not slow work.
    """

    name: str
    liveness: Liveness
    busy_since: float | None = None
    last_progress: float = field(default_factory=time.monotonic)
    failures: int = 0  # consecutive database failures, for the backoff
    interrupted: bool = False  # its last unit of work died on the database (read by sync)

    def __post_init__(self) -> None:
        self.liveness.register(self.name)

    def beat(self) -> None:
        self.last_progress = time.monotonic()
        self.liveness.beat(self.name, self.last_progress)

    @contextmanager
    def busy(self) -> Iterator[None]:
        self.busy_since = time.monotonic()
        self.beat()
        try:
            yield
        finally:
            self.busy_since = None
            self.beat()

    def refresh(self, now: float, stall_limit: float) -> None:
        if self.busy_since is not None and now - self.last_progress <= stall_limit:
            self.liveness.beat(self.name, now)


class GatedStore(Store):
    """The store as the daemon's action runner sees it: claims stop on shutdown (so in-flight
    actions finish instead of being cancelled), and each transition of a batch is progress:
    its claim, its attempts recorded, its outcomes recorded. Between two of them the runner
    waits on one round of requests at most, which the stall limit allows for."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self.claiming = True
        self.on_progress: Callable[[], None] = lambda: None

    async def claim_actions(
        self, worker: str, *, limit: int, lease: float, now: datetime | None = None
    ) -> list[ClaimedAction]:
        if not self.claiming:
            return []
        claimed = await super().claim_actions(worker, limit=limit, lease=lease, now=now)
        self.on_progress()
        return claimed

    async def start_attempts(
        self, worker: str, baselines: Mapping[int, int | None], now: datetime | None = None
    ) -> dict[int, int]:
        started = await super().start_attempts(worker, baselines, now)
        self.on_progress()
        return started

    async def finish(
        self, worker: str, items: Sequence[Finish], now: datetime | None = None
    ) -> None:
        await super().finish(worker, items, now)
        self.on_progress()


@dataclass
class Health:
    """What STATUS= says."""

    last_cycle: CycleStats | None = None
    last_cycle_at: datetime | None = None
    queue: dict[str, int] = field(default_factory=dict)
    db_down_since: datetime | None = None
    listening: bool | None = None  # None: SQLite (polling by design)
    stopping: bool = False

    def text(self) -> str:
        parts = []
        if self.stopping:
            parts.append("stopping: finishing in-flight work")
        if self.last_cycle is None or self.last_cycle_at is None:
            parts.append("first sync cycle running")
        else:
            c = self.last_cycle
            parts.append(
                f"last sync {self.last_cycle_at:%H:%M:%S}Z: {c.polled} polled, "
                f"{c.changed} changed, {c.failed} failed"
            )
        parts.append(
            f"actions: {self.queue.get('pending', 0)} pending, {self.queue.get('running', 0)} running"
        )
        if self.db_down_since is not None:
            parts.append(f"database unavailable since {self.db_down_since:%Y-%m-%d %H:%M:%S}Z")
        elif self.listening is False:
            parts.append("LISTEN reconnecting: polling for actions")
        return "; ".join(parts)


WorkFn = Callable[[Pulse], Awaitable[None]]


class Daemon:
    def __init__(
        self,
        settings: Settings,
        store: GatedStore,
        hooks: Hooks | None = None,
        *,
        http: socket.socket | None = None,
    ) -> None:
        self.settings = settings
        self.http = http  # the bound [metrics] listener socket, served by worker/observe.py
        self.worker = worker_name()
        self.store = store
        self.upstreams: dict[System, Upstream] = build_upstreams(settings)
        self.notifier = Notifier()
        self.liveness = Liveness()
        self.health = Health(listening=False if self.store.is_postgres else None)
        self.watchdog = watchdog_interval()
        # A loop silent for a whole WatchdogSec withholds the ping; idle loops beat 4x as often.
        self.max_silence = max(2 * self.watchdog, 1.0) if self.watchdog else 60.0
        self.slice = min(BEAT_SLICE_CAP, self.max_silence / 4)
        timeouts = [getattr(settings.systems, s).timeout for s in self.upstreams]
        self.stall_limit = max(timeouts, default=30.0) + 30.0  # + a slow statement
        self.discoverable: dict[System, Upstream] = {
            name: client
            for name, client in self.upstreams.items()
            if getattr(getattr(settings.systems, name), "discover", False)
        }
        self.hooks = hooks or Hooks()
        self.runner = ActionRunner(
            self.store, self.upstreams, settings, self.worker, hooks=self.hooks
        )
        self.cycle = SyncCycle(self.store, self.upstreams, settings, self.worker)
        self.listener: ActionListener | None = None
        self._born = time.monotonic()
        self.pulses: dict[str, Pulse] = {}
        self.done: dict[str, anyio.Event] = {}
        self.abandoned: set[int] = set()  # actions still in flight when the drain ran out
        self._scheduler: Any = None

    # --- lifecycle ------------------------------------------------------------------------

    def arm(self) -> None:
        """Create the events (they belong to the running event loop)."""
        self.stop = anyio.Event()
        self.stop_wake = Wake()
        self.sync_wake, self.discover_wake, self.action_wake = Wake(), Wake(), Wake()
        self.prune_wake = Wake()  # only the schedule wakes it: no prune at start-up
        self.sync_wake.set()  # a daemon that just started does not wait for the schedule
        self.discover_wake.set()
        self.action_wake.set()

    async def serve(self) -> None:
        self.arm()
        self.store.on_progress = lambda: self._pulse("actions").beat()
        try:
            async with anyio.create_task_group() as tg:
                if self.http is not None:
                    await tg.start(self._http_loop)
                await tg.start(self._signal_loop)
                await tg.start(self._scheduler_loop)
                await tg.start(self._work_loop, "sync", self.sync_wake, self._sync_once)
                if self.discoverable:
                    await tg.start(
                        self._work_loop, "discover", self.discover_wake, self._discover_once
                    )
                if self.settings.retention.configured:
                    await tg.start(self._work_loop, "prune", self.prune_wake, self._prune_once)
                if self.store.is_postgres:
                    self.listener = ActionListener(self.settings.database.url, self.action_wake.set)
                    await tg.start(self.listener.run)
                await tg.start(self._action_loop)
                await tg.start(self._status_loop)
                self._announce_ready()
                await self.stop.wait()
                await self._drain()
                tg.cancel_scope.cancel()
        finally:
            with anyio.move_on_after(CLEANUP_BUDGET, shield=True):
                await self._cleanup()
            self.notifier.close()
        log.info("tasksync run: stopped")

    def _announce_ready(self) -> None:
        cfg = self.settings.worker
        found = ", ".join(self.discoverable)
        log.info(
            "tasksync run: ready as %s; systems: %s; sync %s; discovery: %s; actions: %s",
            self.worker,
            ", ".join(self.upstreams) or "none (add a [systems.*] section)",
            cfg.sync_schedule,
            f"{found} ({cfg.discover_schedule})" if found else "off",
            "LISTEN" if self.store.is_postgres else f"polled every {cfg.action_poll_interval:g}s",
        )
        self.notifier.ready(self.health.text())

    def request_stop(self, why: str) -> None:
        budget = self.settings.worker.shutdown_timeout
        log.info("%s: stopping; in-flight work has %gs to finish", why, budget)
        self.stop.set()
        self._stop_scheduler()
        self.store.claiming = False
        for wake in (
            self.stop_wake,
            self.sync_wake,
            self.discover_wake,
            self.action_wake,
            self.prune_wake,
        ):
            wake.set()
        self.health.stopping = True
        self.notifier.stopping(self.health.text())

    async def _drain(self) -> None:
        budget = self.settings.worker.shutdown_timeout
        with anyio.move_on_after(budget) as scope:
            for done in self.done.values():
                await done.wait()
        if scope.cancelled_caught:
            self.abandoned = set(self.runner.in_flight)  # emptied as their tasks are cancelled
            unfinished = [name for name, done in self.done.items() if not done.is_set()]
            log.warning(
                "%s did not finish within %gs: cancelling; leases are handed back",
                ", ".join(unfinished),
                budget,
            )

    async def _cleanup(self) -> None:
        """Hand back what this worker still holds, then close the sessions and the engine."""
        try:
            task_ids, action_ids = await leased_ids(self.store, self.worker)
            await self.store.release_tasks(self.worker, task_ids)
            await self.store.release_actions(self.worker, sorted(self.abandoned | set(action_ids)))
            if task_ids or action_ids:
                log.info(
                    "handed back %d task and %d action lease(s)", len(task_ids), len(action_ids)
                )
        except Exception as exc:
            if not is_outage(exc):
                raise
            log.warning(
                "could not hand leases back (%s): they expire by themselves", describe_outage(exc)
            )
        finally:
            for client in self.upstreams.values():
                await client.aclose()
            await self.store.aclose()

    async def _signal_loop(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                if not self.stop.is_set():
                    self.request_stop(name)
                    continue
                log.warning("%s again: exiting at once, without finishing in-flight work", name)
                sys.stderr.flush()
                os._exit(1)  # leases expire; an unknown outcome is verified by the next claimer

    # --- the loops ------------------------------------------------------------------------

    async def _http_loop(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        from worker import metrics, observe

        assert self.http is not None
        probe = observe.Probe(
            self.store,
            self.liveness,
            self.max_silence,
            list(self.upstreams),
            lambda: self.stop.is_set(),
        )
        endpoint = observe.Endpoint(probe, metrics.enable(list(self.upstreams)))
        await observe.serve(self.http, endpoint, task_status=task_status)

    def _pulse(self, name: str) -> Pulse:
        if name not in self.pulses:
            self.pulses[name] = Pulse(name, self.liveness)
        return self.pulses[name]

    @contextmanager
    def _loop(self, name: str) -> Iterator[Pulse]:
        """A work loop's bookkeeping: its pulse, and its `done` event for the drain."""
        pulse = self._pulse(name)
        self.done[name] = anyio.Event()
        try:
            yield pulse
        finally:
            self.liveness.unregister(name)  # finished on purpose: not a wedged loop
            self.done[name].set()

    async def _scheduler_loop(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        scheduler = AsyncIOScheduler(timezone="UTC")
        cfg = self.settings.worker
        # The jobs are coroutines so that APScheduler runs them on our loop, not in a thread.
        # coalesce + max_instances=1: a backlog of fire times (a suspended machine) is one wake;
        # no misfire grace limit: a late wake is still wanted, the work it asks for is due.
        options: dict[str, Any] = {"coalesce": True, "max_instances": 1, "misfire_grace_time": None}
        scheduler.add_job(
            _fire, _trigger(cfg.sync_schedule), args=(self.sync_wake,), id="sync", **options
        )
        if self.discoverable:
            scheduler.add_job(
                _fire,
                _trigger(cfg.discover_schedule),
                args=(self.discover_wake,),
                id="discover",
                **options,
            )
        if self.settings.retention.configured:
            retention = self.settings.retention.schedule
            scheduler.add_job(
                _fire, _trigger(retention), args=(self.prune_wake,), id="prune", **options
            )
        scheduler.start()
        self._scheduler = scheduler
        pulse = self._pulse("scheduler")
        task_status.started()
        try:
            while self._scheduler is not None:
                await anyio.sleep(self.slice)
                await self._maybe_wedge("scheduler")
                # The scheduler turns on event-loop timers: it is alive while no job is overdue.
                now = utcnow()
                overdue = [
                    job.id
                    for job in scheduler.get_jobs()
                    if job.next_run_time is not None
                    and (now - job.next_run_time).total_seconds() > self.max_silence + 5
                ]
                if not overdue:
                    pulse.beat()
        finally:
            self._stop_scheduler()
            self.liveness.unregister("scheduler")

    def _stop_scheduler(self) -> None:
        """At the first signal: no job may fire while the loop winds down (it would be
        cancelled half-way, and APScheduler logs that as an error)."""
        scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None:
            scheduler.shutdown(wait=False)

    async def _work_loop(
        self,
        name: str,
        wake: Wake,
        work: WorkFn,
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run `work` whenever woken; a unit cut short by a lost database runs again."""
        with self._loop(name) as pulse:
            task_status.started()
            while True:
                await self._idle(pulse, wake)
                if self.stop.is_set():
                    return
                wake.consume()
                if not await self._attempt(pulse, work):
                    wake.set()

    async def _sync_once(self, pulse: Pulse) -> None:
        if pulse.interrupted:  # the cut-short cycle's claims are still ours: hand them back
            task_ids, _ = await leased_ids(self.store, self.worker)
            await self.store.release_tasks(self.worker, task_ids)
        started = time.monotonic()
        stats = await self.cycle.run(stop=self.stop, progress=lambda _n: pulse.beat())
        self.health.last_cycle, self.health.last_cycle_at = stats, utcnow()
        log.info(
            "sync: %d polled, %d changed, %d failed in %.1fs",
            stats.polled,
            stats.changed,
            stats.failed,
            time.monotonic() - started,
        )

    async def _discover_once(self, pulse: Pulse) -> None:
        for system, client in self.discoverable.items():
            if self.stop.is_set():
                return
            with log_context(system=system):
                stats = await discover(
                    self.store, {system: client}, self.worker, progress=lambda _n: pulse.beat()
                )
                log.info("discovery: %d listed, %d new", stats.seen, stats.new)

    async def _prune_once(self, pulse: Pulse) -> None:
        from worker.retention import prune_once  # logs what it removed

        await prune_once(
            self.store,
            self.settings.retention,
            self.worker,
            progress=pulse.beat,
            should_stop=self.stop.is_set,
        )

    async def _action_loop(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Apply what is due, then sleep until the next action is due or a notification comes.

        A notification only means "look": the trigger fires on every claim, even an empty one,
        so a pass starts only when `next_action_due()` says something is due. When a pass
        claims nothing although something is due (another worker holds its task's earlier
        action), the next try waits `action_poll_interval`, so workers cannot wake each other
        in a loop. Every `lease` seconds a pass runs regardless: it takes over actions whose
        worker died (their lease expired; they are `running`, not due).
        """
        cfg = self.settings.worker
        with self._loop("actions") as pulse:
            task_status.started()
            last_pass = blocked_at = -float("inf")
            cut_short = False  # a pass died on the database: its claims are still ours
            while not self.stop.is_set():
                self.action_wake.consume()
                due: datetime | None = None

                async def look(_pulse: Pulse) -> None:
                    nonlocal due
                    due = await self.store.next_action_due()
                    # here rather than in the status loop: every change to the queue ends in
                    # a look (a notification or the poll), and the watchdog never waits on SQL
                    self.health.queue = await queue_depth(self.store)

                if not await self._attempt(pulse, look):
                    continue
                now, mono = utcnow(), time.monotonic()
                is_due = due is not None and due <= now
                sweep = mono - last_pass >= cfg.lease
                if (is_due and mono - blocked_at >= cfg.action_poll_interval) or sweep:
                    claimed = 0

                    async def apply(_pulse: Pulse) -> None:
                        nonlocal claimed, cut_short
                        if cut_short:  # hand them back: retaken now, not when leases expire
                            _, ids = await leased_ids(self.store, self.worker)
                            await self.store.release_actions(self.worker, ids)
                            cut_short = False
                        claimed = (await self.runner.run_until_idle()).claimed

                    cut_short = not await self._attempt(pulse, apply)
                    if not cut_short:
                        last_pass = time.monotonic()
                        if is_due and not claimed:
                            blocked_at = last_pass
                    continue
                await self._idle(
                    pulse, self.action_wake, self._action_sleep(due, now, last_pass, blocked_at)
                )

    def _action_sleep(
        self, due: datetime | None, now: datetime, last_pass: float, blocked_at: float
    ) -> float:
        cfg = self.settings.worker
        mono = time.monotonic()
        listening = self.listener is not None and self.listener.connected
        timeout = LISTEN_SAFETY_POLL if listening else cfg.action_poll_interval
        timeout = min(timeout, cfg.lease - (mono - last_pass))
        if due is not None:
            if due > now:
                timeout = min(timeout, (due - now).total_seconds())
            else:
                timeout = min(timeout, cfg.action_poll_interval - (mono - blocked_at))
        return max(timeout, 0.05)

    async def _status_loop(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """STATUS= when it changes; WATCHDOG=1 every watchdog interval while all loops are live."""
        tick = min(self.watchdog or 1.0, 1.0)
        next_ping = 0.0
        shown = ""
        task_status.started()
        while True:
            now = time.monotonic()
            for pulse in self.pulses.values():
                pulse.refresh(now, self.stall_limit)
            if self.watchdog and now >= next_ping:
                ping_if_healthy(self.notifier, self.liveness, now, self.max_silence)
                next_ping = now + self.watchdog
            if self.listener is not None:
                self.health.listening = self.listener.connected
            text = self.health.text()
            if text != shown:
                self.notifier.status(text)
                shown = text
            await anyio.sleep(tick)

    # --- shared helpers -------------------------------------------------------------------

    async def _idle(self, pulse: Pulse, wake: Wake, seconds: float | None = None) -> None:
        """Sleep until woken, `seconds` pass or stop is requested, beating in short slices."""
        deadline = anyio.current_time() + (seconds if seconds is not None else float("inf"))
        while not wake.is_set() and not self.stop.is_set():
            await self._maybe_wedge(pulse.name)
            left = deadline - anyio.current_time()
            if left <= 0:
                return
            with anyio.move_on_after(min(left, self.slice)):
                await wake.wait()
            pulse.beat()

    async def _attempt(self, pulse: Pulse, work: WorkFn) -> bool:
        """Run one unit of work; on a lost database log one line, back off and return False.
        Anything else is a bug: it propagates and takes the process down."""
        try:
            with pulse.busy():
                await work(pulse)
        except Exception as exc:
            if not is_outage(exc):
                raise
            failure: BaseException = exc
        else:
            if pulse.failures:
                log.info("%s: the database is back", pulse.name)
                self.health.db_down_since = None
            pulse.failures, pulse.interrupted = 0, False
            observe_database(True)
            return True
        observe_database(False)
        delay = min(DB_BACKOFF[1], DB_BACKOFF[0] * 2.0 ** min(pulse.failures, 10))
        pulse.failures += 1
        pulse.interrupted = True
        if self.health.db_down_since is None:
            self.health.db_down_since = utcnow()
        log.warning(
            "%s: database unavailable (%s); retrying in %.0fs",
            pulse.name,
            describe_outage(failure),
            delay,
        )
        await self._idle(pulse, self.stop_wake, delay)
        return False

    async def _maybe_wedge(self, name: str) -> None:
        """Test-only (worker.hooks): the wedged loop blocks without beating, for ever (or for
        the hook's length, once), so tests can see the watchdog pings stop and /livez recover."""
        wedge = self.hooks.wedge
        if wedge is None or wedge[0] != name or time.monotonic() - self._born < wedge[1]:
            return
        log.warning("%s: wedging the %s loop (test hook)", WEDGE_ENV, name)
        length = wedge[2]
        if length is None:
            await anyio.sleep_forever()
            return
        self.hooks = replace(self.hooks, wedge=None)
        await anyio.sleep(length)


async def _fire(wake: Wake) -> None:
    wake.set()


def _trigger(schedule: Schedule) -> Any:
    if schedule.cron is not None:
        from apscheduler.triggers.cron import CronTrigger

        return CronTrigger.from_crontab(schedule.cron, timezone="UTC")
    from apscheduler.triggers.interval import IntervalTrigger

    return IntervalTrigger(seconds=schedule.interval, timezone="UTC")


def _bind_metrics(settings: Settings) -> socket.socket | None:
    if settings.metrics.listen is None:
        return None
    from worker import metrics, observe

    metrics.enable()  # recorded from the first request on, not from the first scrape
    return observe.bind(settings.metrics.listen)
