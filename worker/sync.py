"""One poll cycle: claim due tasks in batches, fetch them concurrently, diff, store.

Batches are claimed by keyset (id order) with a lease, so several workers on one PostgreSQL
split the due tasks and a cycle always ends. Two batches are in flight at once: while one is
being written, the next one's fetches keep every connection slot busy.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import anyio

from worker.backoff import poll_delay
from worker.config import Settings
from worker.diff import diff
from worker.model import Fetched, System
from worker.store import ClaimedTask, PollResult, Store, utcnow
from worker.upstreams.base import ErrorKind, Upstream, UpstreamError

log = logging.getLogger("worker.sync")

BATCHES_IN_FLIGHT = 2


@dataclass
class CycleStats:
    polled: int = 0
    changed: int = 0
    failed: int = 0
    run_id: int | None = None
    errors: dict[str, int] = field(default_factory=dict)

    def add(self, results: Sequence[PollResult]) -> None:
        self.polled += len(results)
        for r in results:
            if r.error is not None:
                self.failed += 1
                system = r.task.system
                self.errors[system] = self.errors.get(system, 0) + 1
            elif r.changed:
                self.changed += 1


Progress = Callable[[int], None]


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
        wanted = [s for s in (systems or self.upstreams) if s in self.upstreams]
        stats = CycleStats()
        stats.run_id = await self.store.start_run(self.worker, "sync")
        cfg = self.settings.worker
        due_before = None if all_tasks else utcnow()
        fetch_slots = anyio.CapacityLimiter(cfg.concurrency)
        batch_slots = anyio.Semaphore(BATCHES_IN_FLIGHT)
        in_flight: set[int] = set()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._renew_leases, in_flight)
                after = 0
                while wanted and not (stop and stop.is_set()):
                    await batch_slots.acquire()
                    batch = await self.store.claim_tasks(
                        self.worker,
                        after_id=after,
                        limit=cfg.batch_size,
                        lease=cfg.lease,
                        due_before=due_before,
                        systems=wanted,
                    )
                    if not batch:
                        batch_slots.release()
                        break
                    after = batch[-1].id
                    in_flight.update(t.id for t in batch)
                    tg.start_soon(
                        self._batch, batch, fetch_slots, batch_slots, in_flight, stats, progress
                    )
                # wait for the batches, then stop the lease renewer
                for _ in range(BATCHES_IN_FLIGHT):
                    await batch_slots.acquire()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.store.finish_run(
                    stats.run_id, polled=stats.polled, changed=stats.changed, failed=stats.failed
                )
        return stats

    async def _batch(
        self,
        batch: list[ClaimedTask],
        fetch_slots: anyio.CapacityLimiter,
        batch_slots: anyio.Semaphore,
        in_flight: set[int],
        stats: CycleStats,
        progress: Progress | None,
    ) -> None:
        try:
            fetched: dict[int, Fetched | UpstreamError] = {}

            async def one(task: ClaimedTask) -> None:
                async with fetch_slots:
                    fetched[task.id] = await self._fetch(task)
                if progress is not None:
                    progress(1)

            async with anyio.create_task_group() as tg:
                for task in batch:
                    tg.start_soon(one, task)
            results = await self._results(batch, fetched)
            await self.store.write_results(self.worker, results)
            stats.add(results)
        finally:
            in_flight.difference_update(t.id for t in batch)
            batch_slots.release()

    async def _fetch(self, task: ClaimedTask) -> Fetched | UpstreamError:
        upstream = self.upstreams[task.system]  # type: ignore[index]
        try:
            return await upstream.fetch(task.task_id)
        except UpstreamError as exc:
            return exc
        except Exception as exc:  # a client bug must cost one task, never the cycle
            log.exception("unexpected error fetching %s task %s", task.system, task.task_id)
            return UpstreamError(
                ErrorKind.RETRY,
                f"internal error: {type(exc).__name__}: {exc}",
                system=task.system,  # type: ignore[arg-type]
                task_id=task.task_id,
            )

    async def _results(
        self, batch: Sequence[ClaimedTask], fetched: Mapping[int, Fetched | UpstreamError]
    ) -> list[PollResult]:
        now = utcnow()
        changed = [
            t
            for t in batch
            if isinstance(fetched[t.id], Fetched) and fetched[t.id].content_hash != t.content_hash  # type: ignore[union-attr]
        ]
        previous = await self.store.latest_payloads(changed) if changed else {}
        return [self._result(t, fetched[t.id], previous.get(t.id), now) for t in batch]

    def _result(
        self,
        task: ClaimedTask,
        answer: Fetched | UpstreamError,
        previous_payload: object,
        now: datetime,
    ) -> PollResult:
        cfg = self.settings.worker
        if isinstance(answer, UpstreamError):
            failures = task.consecutive_failures + 1
            if answer.kind is ErrorKind.NOT_FOUND:
                delay = cfg.terminal_poll_interval
            else:
                delay = poll_delay(failures, cfg.poll_interval, cfg.max_poll_backoff, self.rng)
            log.warning("%s", answer)
            return PollResult(
                task,
                now,
                now + timedelta(seconds=delay),
                error=str(answer),
                not_found=answer.kind is ErrorKind.NOT_FOUND,
            )
        observation = answer.observation
        interval = cfg.terminal_poll_interval if observation.state.terminal else cfg.poll_interval
        result = PollResult(task, now, now + timedelta(seconds=interval))
        if answer.content_hash == task.content_hash:
            return result
        upstream = self.upstreams[task.system]  # type: ignore[index]
        before = None
        if isinstance(previous_payload, Mapping):
            before = upstream.observe(previous_payload)
        result.payload = answer.payload
        result.content_hash = answer.content_hash
        result.status = observation.status
        result.state = str(observation.state)
        result.title = observation.title
        result.changed_at = observation.changed_at or now
        result.events = diff(before, observation, task.snapshot_seq + 1)
        return result

    async def _renew_leases(self, in_flight: set[int]) -> None:
        """A batch slowed by rate limits or timeouts must not lose its lease to another worker."""
        interval = max(self.settings.worker.lease / 3, 0.5)
        while True:
            await anyio.sleep(interval)
            if in_flight:
                await self.store.renew_task_leases(
                    self.worker, sorted(in_flight), self.settings.worker.lease
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
    """Page through each system's list endpoint and track the tasks not tracked yet."""
    stats = DiscoverStats()
    run_id = await store.start_run(worker, "discover")
    try:
        for system, upstream in upstreams.items():
            if systems and system not in systems:
                continue
            pending: list[tuple[str, str]] = []
            try:
                async for task_id in upstream.discover():
                    pending.append((system, task_id))
                    stats.seen += 1
                    if progress is not None:
                        progress(1)
                    if len(pending) >= batch:
                        stats.new += await store.track_many(pending)
                        pending = []
            except UpstreamError as exc:
                log.error("discovery of %s stopped: %s", system, exc)
                stats.failed.append(str(exc))
            finally:
                stats.new += await store.track_many(pending)
    finally:
        with anyio.CancelScope(shield=True):
            await store.finish_run(
                run_id, polled=stats.seen, changed=0, failed=len(stats.failed), discovered=stats.new
            )
    return stats
