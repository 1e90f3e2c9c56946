"""One poll cycle: claim due tasks in batches, fetch them concurrently, diff, store.

Each system runs side by side with its own claims, queue and fetchers, so a throttled, slow or
down system never holds back the others: a cycle takes as long as its slowest system. (The
in-flight requests of all systems together are still bounded by `worker.concurrency`, in the
HTTP layer, where a request waiting for its system's rate holds no slot.)

Batches are claimed by keyset (id order) with a lease, so several workers on one PostgreSQL
split the due tasks and a cycle always ends. Per system, a pool of `worker.concurrency`
fetchers pulls tasks from one queue, and the next batch is claimed while the queue still holds a batch's
worth of work: writing one batch and claiming the next (each a database round trip that waits
behind every HTTP callback on a busy event loop) never leaves a connection slot idle. At most
`BATCHES_IN_FLIGHT` batches are claimed and not yet written, which bounds memory.

Why a pool and not a task per fetch: spawning a task and passing a capacity limiter per fetch
cost about 20 µs of CPU, a fifth of aiohttp's own per-request cost (bench/README.md).
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import anyio
from anyio.abc import TaskGroup

from worker.backoff import poll_delay
from worker.config import Settings
from worker.diff import diff
from worker.metrics import observe_cycle, observe_polls
from worker.model import TERMINAL_STATES, Fetched, System
from worker.store import ClaimedTask, HealthRow, PollResult, Store, WalkRow, utcnow
from worker.upstreams.base import ErrorKind, Health, Upstream, UpstreamError, Walk

log = logging.getLogger("worker.sync")

BATCHES_IN_FLIGHT = 4  # per system, claimed and not yet written: queued, fetching, writing
THROTTLED_TRIES = 5  # a task throttled this often in one cycle counts as failed


@dataclass
class CycleStats:
    polled: int = 0
    changed: int = 0
    failed: int = 0
    deferred: int = 0
    run_id: int | None = None
    # (system, error class) -> (count, one example): one log line each at the end of a cycle
    problems: dict[tuple[str, str], tuple[int, str]] = field(default_factory=dict)

    def add(self, results: Sequence[PollResult]) -> None:
        for r in results:
            if r.deferred:
                self.deferred += 1
                continue
            self.polled += 1
            if r.error is not None:
                self.failed += 1
            elif r.changed:
                self.changed += 1

    def note(self, system: str, problem: str, error: UpstreamError) -> None:
        count, example = self.problems.get((system, problem), (0, str(error)))
        self.problems[(system, problem)] = (count + 1, example)

    def log_summary(self) -> None:
        """At most one WARNING per system and error class; each task's own error is on its
        row (`last_error`) and was logged at DEBUG."""
        for (system, problem), (count, example) in sorted(self.problems.items()):
            log.warning("%s: %d task(s) %s; for example: %s", system, count, problem, example)


Progress = Callable[[int], None]


@dataclass(eq=False)
class _Batch:
    """One claimed batch: its tasks in id order and, as they arrive, their answers."""

    tasks: list[ClaimedTask]
    fetched: dict[int, Fetched | UpstreamError] = field(default_factory=dict)
    throttled: dict[int, int] = field(default_factory=dict)  # task id -> 429s this cycle


@dataclass(eq=False)
class _Leases:
    """The tasks this cycle holds leases on and renews until their batch is written.

    A batch leaves the set *before* its write, under the same lock the renewer holds for its
    UPDATE: the renewal and a batch write then never lock the same rows at the same time. (They
    used to, on two connections of one process, each locking rows in its own order: PostgreSQL
    found a deadlock between them in the 100,000-task benchmark.) The lease renewed at most
    lease/3 ago outlives the write by far.
    """

    ids: set[int] = field(default_factory=set)
    lock: anyio.Lock = field(default_factory=anyio.Lock)

    async def release(self, ids: Sequence[int]) -> None:
        async with self.lock:
            self.ids.difference_update(ids)


@dataclass(eq=False)
class _Queue:
    """Claimed tasks waiting for a fetcher. `wake` is set (and replaced) whenever tasks arrive
    or claiming ends; `hungry` whenever a fetcher took a task, so the claimer can look again."""

    items: deque[tuple[ClaimedTask, _Batch]] = field(default_factory=deque)
    done: bool = False
    deferring: bool = False  # the system turned requests away: claim no more of its tasks
    wake: anyio.Event = field(default_factory=anyio.Event)
    hungry: anyio.Event = field(default_factory=anyio.Event)

    def put(self, batch: _Batch) -> None:
        self.items.extend((task, batch) for task in batch.tasks)
        self._wake()

    def close(self) -> None:
        self.done = True
        self._wake()

    def _wake(self) -> None:
        self.wake.set()
        self.wake = anyio.Event()


@dataclass
class SyncCycle:
    store: Store
    upstreams: Mapping[System, Upstream]
    settings: Settings
    worker: str
    rng: random.Random = field(default_factory=random.Random)

    async def run(
        self,
        *,
        all_tasks: bool = False,
        systems: Sequence[str] = (),
        progress: Progress | None = None,
        stop: anyio.Event | None = None,
    ) -> CycleStats:
        """Poll every due task (or every tracked one) of the chosen systems once."""
        wanted: list[System] = [s for s in self.upstreams if not systems or s in systems]
        stats = CycleStats()
        started = time.monotonic()
        stats.run_id = await self.store.start_run(self.worker, "sync")
        due_before = None if all_tasks else utcnow()
        before = {s: self.upstreams[s].health() for s in wanted}
        in_flight = _Leases()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._renew_leases, in_flight)
                async with anyio.create_task_group() as side_by_side:
                    for system in wanted:
                        side_by_side.start_soon(
                            self._run_system, system, due_before, in_flight, stats, progress, stop
                        )
                # every batch is written: stop the lease renewer
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.store.finish_run(
                    stats.run_id, polled=stats.polled, changed=stats.changed, failed=stats.failed
                )
                await self._record_health(before)
            stats.log_summary()
            observe_cycle("sync", started)
        return stats

    async def _run_system(
        self,
        system: System,
        due_before: datetime | None,
        in_flight: _Leases,
        stats: CycleStats,
        progress: Progress | None,
        stop: anyio.Event | None,
    ) -> None:
        cfg = self.settings.worker
        batch_slots = anyio.Semaphore(BATCHES_IN_FLIGHT)
        queue = _Queue()
        async with anyio.create_task_group() as work:
            for _ in range(cfg.concurrency):
                work.start_soon(self._fetcher, queue, work, batch_slots, in_flight, stats, progress)
            try:
                after = 0
                while not (stop and stop.is_set()) and not queue.deferring:
                    # Claim ahead: once the queue holds less than a batch, so the
                    # fetchers never wait for the database.
                    while len(queue.items) >= cfg.batch_size:
                        queue.hungry = anyio.Event()
                        await queue.hungry.wait()
                    await batch_slots.acquire()
                    if (stop and stop.is_set()) or queue.deferring:
                        batch_slots.release()
                        break
                    claimed = await self.store.claim_tasks(
                        self.worker,
                        after_id=after,
                        limit=cfg.batch_size,
                        lease=cfg.lease,
                        due_before=due_before,
                        system=system,
                    )
                    if not claimed:
                        batch_slots.release()
                        break
                    after = claimed[-1].id
                    in_flight.ids.update(t.id for t in claimed)
                    queue.put(_Batch(claimed))
            finally:
                queue.close()

    async def _record_health(self, before: Mapping[System, Health]) -> None:
        rows = []
        for system, then in before.items():
            now = self.upstreams[system].health()
            rows.append(
                HealthRow(
                    system=system,
                    requests=now.requests - then.requests,
                    throttled=now.throttled - then.throttled,
                    rate=now.rate,
                    ceiling=now.ceiling,
                    policy=now.policy,
                    circuit=now.circuit,
                )
            )
        try:
            await self.store.record_health(self.worker, rows)
        except Exception as exc:  # status information: never worth failing a cycle over
            log.warning("could not record upstream health: %s", exc)

    async def _fetcher(
        self,
        queue: _Queue,
        work: TaskGroup,
        batch_slots: anyio.Semaphore,
        in_flight: _Leases,
        stats: CycleStats,
        progress: Progress | None,
    ) -> None:
        """Fetch queued tasks until the queue is closed and empty; the fetcher that completes
        a batch starts its write."""
        items = queue.items
        while True:
            if not items:
                if queue.done:
                    return
                await queue.wake.wait()
                continue
            task, batch = items.popleft()
            queue.hungry.set()
            answer = await self._fetch(task)
            if isinstance(answer, UpstreamError):
                if answer.throttled and not answer.deferred:
                    tries = batch.throttled[task.id] = batch.throttled.get(task.id, 0) + 1
                    if tries < THROTTLED_TRIES:
                        # Not a failure: the gateway paused this system; try again in this
                        # cycle, at the pace the rate control now keeps.
                        items.append((task, batch))
                        continue
                if answer.deferred:
                    queue.deferring = True
            batch.fetched[task.id] = answer
            if progress is not None:
                progress(1)
            if len(batch.fetched) == len(batch.tasks):
                work.start_soon(self._write, batch, batch_slots, in_flight, stats)

    async def _write(
        self,
        batch: _Batch,
        batch_slots: anyio.Semaphore,
        in_flight: _Leases,
        stats: CycleStats,
    ) -> None:
        try:
            await in_flight.release([t.id for t in batch.tasks])
            results = await self._results(batch.tasks, batch.fetched, stats)
            await self.store.write_results(self.worker, results)
            stats.add(results)
            observe_polls(results)
        finally:
            batch_slots.release()

    async def _fetch(self, task: ClaimedTask) -> Fetched | UpstreamError:
        upstream = self.upstreams[task.system]
        try:
            return await upstream.fetch(task.task_id)
        except UpstreamError as exc:
            return exc
        except Exception as exc:  # a client bug must cost one task, never the cycle
            log.exception("unexpected error fetching %s task %s", task.system, task.task_id)
            return UpstreamError(
                ErrorKind.RETRY,
                f"internal error: {type(exc).__name__}: {exc}",
                system=task.system,
                task_id=task.task_id,
            )

    async def _results(
        self,
        batch: Sequence[ClaimedTask],
        fetched: Mapping[int, Fetched | UpstreamError],
        stats: CycleStats,
    ) -> list[PollResult]:
        now = utcnow()
        changed = [
            t
            for t in batch
            if isinstance(f := fetched[t.id], Fetched) and f.content_hash != t.content_hash
        ]
        previous = await self.store.latest_payloads(changed) if changed else {}
        return [self._result(t, fetched[t.id], previous.get(t.id), now, stats) for t in batch]

    def _result(
        self,
        task: ClaimedTask,
        answer: Fetched | UpstreamError,
        previous_payload: object,
        now: datetime,
        stats: CycleStats,
    ) -> PollResult:
        cfg = self.settings.worker
        if isinstance(answer, UpstreamError):
            log.debug("%s", answer)
            if answer.deferred:
                stats.note(task.system, "left due (nothing sent)", answer)
                return PollResult(task, now, task.seen_next_poll_at, deferred=True)
            stats.note(task.system, f"failed ({answer.kind})", answer)
            failures = task.consecutive_failures + 1
            if answer.kind is ErrorKind.NOT_FOUND:
                delay = cfg.terminal_poll_interval
            else:
                delay = poll_delay(failures, cfg.poll_interval, cfg.max_poll_backoff, self.rng)
            return PollResult(
                task,
                now,
                now + timedelta(seconds=delay),
                error=str(answer),
                not_found=answer.kind is ErrorKind.NOT_FOUND,
            )
        if answer.content_hash == task.content_hash:
            # unchanged: the stored state says how soon to look again (no observation needed)
            interval = (
                cfg.terminal_poll_interval if task.state in TERMINAL_STATES else cfg.poll_interval
            )
            return PollResult(task, now, now + timedelta(seconds=interval))
        observation = answer.observation
        interval = cfg.terminal_poll_interval if observation.state.terminal else cfg.poll_interval
        result = PollResult(task, now, now + timedelta(seconds=interval))
        upstream = self.upstreams[task.system]
        before = None
        if isinstance(previous_payload, Mapping):
            before = upstream.observe(previous_payload)
        result.payload = answer.payload
        result.payload_json = answer.canonical.decode() if answer.canonical else None
        result.content_hash = answer.content_hash
        result.status = observation.status
        result.state = str(observation.state)
        result.title = observation.title
        result.events = diff(before, observation, task.snapshot_seq + 1)
        return result

    async def _renew_leases(self, in_flight: _Leases) -> None:
        """A batch slowed by rate limits or timeouts must not lose its lease to another worker."""
        interval = max(self.settings.worker.lease / 3, 0.5)
        while True:
            await anyio.sleep(interval)
            async with in_flight.lock:
                if in_flight.ids:
                    await self.store.renew_task_leases(
                        self.worker, sorted(in_flight.ids), self.settings.worker.lease
                    )


@dataclass
class DiscoverStats:
    seen: int = 0
    new: int = 0
    failed: list[str] = field(default_factory=list)


async def discover(
    store: Store,
    upstreams: Mapping[System, Upstream],
    worker: str,
    systems: Sequence[str] = (),
    progress: Progress | None = None,
    batch: int = 500,
) -> DiscoverStats:
    """Walk each system's list endpoint and track the tasks not tracked yet.

    The systems are walked side by side. A page that fails transiently is retried inside the
    client (paging.read_page); what ends a walk early is logged in one line naming the system,
    the page and the cause, and what it found before that is kept."""
    stats = DiscoverStats()
    started = time.monotonic()
    run_id = await store.start_run(worker, "discover")
    walks: list[WalkRow] = []
    try:
        async with anyio.create_task_group() as tg:
            for system, upstream in upstreams.items():
                if not systems or system in systems:
                    tg.start_soon(_walk, store, system, upstream, stats, walks, progress, batch)
    finally:
        with anyio.CancelScope(shield=True):
            await store.finish_run(
                run_id, polled=stats.seen, changed=0, failed=len(stats.failed), discovered=stats.new
            )
            await store.record_walks(run_id, worker, walks)
        observe_cycle("discover", started)
    return stats


async def _walk(
    store: Store,
    system: System,
    upstream: Upstream,
    stats: DiscoverStats,
    walks: list[WalkRow],
    progress: Progress | None,
    batch: int,
) -> None:
    started = utcnow()
    walk = Walk()
    found = new = 0
    error: str | None = None
    pending: list[tuple[str, str]] = []
    try:
        async for task_id in upstream.discover(walk):
            pending.append((system, task_id))
            found += 1
            stats.seen += 1
            if progress is not None:
                progress(1)
            if len(pending) >= batch:
                new += await store.track_many(pending)
                pending = []
    except UpstreamError as exc:
        error = str(exc)
        log.error("discovery of %s stopped: %s", system, exc)
        stats.failed.append(error)
    finally:
        with anyio.CancelScope(shield=True):
            new += await store.track_many(pending)
        stats.new += new
        walks.append(WalkRow(system, started, walk.pages, found, new, error is None, error))
