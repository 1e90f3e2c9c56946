"""One pass over due actions: claim, validate, verify, apply, classify, record.

Exactly-once rests on three rules:
1. An attempt row is committed *before* the request goes out, so a crash at any point leaves
   evidence: an attempt without an outcome.
2. Before the first attempt the action's *baseline* is recorded: how often its effect is already
   visible on the task (a comment with the same text, a trace entry with the same title and
   description); for state-like kinds (terminate, delete-*) the effect is a state, baseline 0.
3. After an unknown outcome (the answer was lost, or the worker died mid-call) nothing is sent
   again until the task has been read back: the effect count above the baseline, or the state
   holding, means the action took effect.
Writes go over connections that are never reused (upstreams/http.py), so the HTTP layer never
re-sends on its own either.
"""

from __future__ import annotations

import logging
import os
import random
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import anyio
import orjson
from anyio.abc import TaskGroup

from worker.backoff import action_delay
from worker.catalog import InvalidInput, validate_action
from worker.config import Settings
from worker.logs import log_context
from worker.metrics import observe_action, observe_actions
from worker.model import JSON, System
from worker.store import ClaimedAction, Finish, Store, utcnow
from worker.upstreams.base import ErrorKind, Upstream, UpstreamError, effect_count

log = logging.getLogger("worker.actions")

# Test-only: the crash tests SIGKILL this process at a named point of an attempt
# ("after-attempt": recorded but not sent; "after-answer": applied upstream, not yet recorded).
_CRASH_AT = os.environ.get("TASKSYNC_TEST_CRASH_AT")


def _crash_point(name: str) -> None:
    if name == _CRASH_AT:
        os.kill(os.getpid(), signal.SIGKILL)


ADDITIVE = frozenset({"process", "comment"})  # effect = one more matching item


@dataclass(frozen=True, slots=True)
class _Ready:
    """A validated action and what sending it needs."""

    action: ClaimedAction
    params: dict[str, str]
    upstream: Upstream
    max_attempts: int


@dataclass
class ApplyStats:
    claimed: int = 0
    succeeded: int = 0
    retried: int = 0
    failed: int = 0
    unknown: int = 0
    verified: int = 0

    def __str__(self) -> str:
        return (
            f"{self.claimed} claimed: {self.succeeded} succeeded, {self.failed} failed, "
            f"{self.retried} to retry, {self.unknown} unknown outcome(s) "
            f"({self.verified} resolved by read-back)"
        )


@dataclass
class ActionRunner:
    store: Store
    upstreams: Mapping[System, Upstream]
    settings: Settings
    worker: str
    rng: random.Random = field(default_factory=random.Random)
    in_flight: set[int] = field(default_factory=set)
    _completions: int = 0
    _wake: anyio.Event = field(default_factory=anyio.Event)

    async def run_until_idle(self, stop: anyio.Event | None = None) -> ApplyStats:
        """Apply due actions until none is due (or `stop` is set, after which nothing new is
        claimed and the actions in flight are finished). Actions on different tasks run
        concurrently; the claim hands out at most one open action per task at a time."""
        stats = ApplyStats()
        slots = self.settings.worker.concurrency
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._renew_leases)
            while not (stop and stop.is_set()):
                seen = self._completions
                free = slots - len(self.in_flight)
                claimed = []
                if free > 0:
                    claimed = await self.store.claim_actions(
                        self.worker, limit=free, lease=self.settings.worker.lease
                    )
                # An action of ours whose lease ran out while the database was locked or slow
                # is claimed again by our own next claim: it is still being worked on here, and
                # handing it out twice would send it twice.
                claimed = [a for a in claimed if a.id not in self.in_flight]
                if claimed:
                    self.in_flight.update(a.id for a in claimed)
                    stats.claimed += len(claimed)
                    tg.start_soon(self._guarded_batch, claimed, stats, tg)
                if claimed and len(self.in_flight) < slots:
                    continue  # there may be more due right now
                if seen != self._completions:
                    continue  # one finished meanwhile: it may have unblocked its task's next
                if not self.in_flight:
                    break
                # wait until an action finishes: it may unblock the next one on its task
                self._wake = anyio.Event()
                with anyio.move_on_after(1.0):
                    await self._wake.wait()
            while self.in_flight:
                self._wake = anyio.Event()
                with anyio.move_on_after(1.0):
                    await self._wake.wait()
            tg.cancel_scope.cancel()
        return stats

    async def _guarded(self, action: ClaimedAction, stats: ApplyStats) -> None:
        try:
            with log_context(system=action.system, task=action.task_id, action=str(action.id)):
                await self.process(action, stats)
        except Exception:
            # A database failure mid-action: the lease expires and the next claimer, seeing an
            # attempt without outcome, verifies before sending. Nothing is lost.
            log.exception(
                "action %s interrupted; it will be taken over when its lease expires", action.id
            )
        finally:
            self.in_flight.discard(action.id)
            self._completions += 1
            self._wake.set()

    async def _guarded_batch(
        self, batch: list[ClaimedAction], stats: ApplyStats, tg: TaskGroup
    ) -> None:
        handed_off: set[int] = set()
        try:
            await self.process_batch(batch, stats, tg, handed_off)
        except Exception:
            # as in _guarded: leases expire, attempts without outcome are verified first
            log.exception(
                "a batch of %s actions was interrupted; it will be taken over", len(batch)
            )
        finally:
            self.in_flight.difference_update(a.id for a in batch if a.id not in handed_off)
            self._completions += 1
            self._wake.set()

    async def process_batch(
        self, batch: list[ClaimedAction], stats: ApplyStats, tg: TaskGroup, handed_off: set[int]
    ) -> None:
        """The common path, one transaction per step for the whole claimed set: validate,
        baselines, record every attempt, send them all, record every outcome. An action that
        needs a read-back first (unknown outcome, or a worker that died mid-call) takes the
        one-at-a-time path instead."""
        finishes: list[tuple[int, Finish, int | None, tuple[str, str] | None]] = []
        ready: list[_Ready] = []
        for action in batch:
            if action.last_outcome in (None, "unknown"):
                handed_off.add(action.id)
                tg.start_soon(self._guarded, action, stats)
                continue
            prepared = self._prepare(action)
            if isinstance(prepared, str):
                stats.failed += 1
                log.warning("action %s failed: %s", action.id, prepared)
                finishes.append((action.id, Finish("failed", "failed", error=prepared), None, None))
            else:
                ready.append(prepared)
        baselines = await self._baselines(ready, finishes, stats)
        attempt_ids = await self.store.start_attempts(self.worker, baselines)
        _crash_point("after-attempt")
        sending = [r for r in ready if r.action.id in attempt_ids]
        for r in ready:
            if r.action.id in baselines and r.action.id not in attempt_ids:
                log.warning("lost the lease on action %s before sending", r.action.id)

        async def send(r: _Ready) -> None:
            action = r.action
            attempt_id = attempt_ids[action.id]
            with log_context(system=action.system, task=action.task_id, action=str(action.id)):
                try:
                    answer = await r.upstream.apply(action.task_id, action.kind, r.params)
                except UpstreamError as exc:
                    finish = self._decide(
                        action, exc, stats, r.max_attempts, action.attempts + 1, attempt_id
                    )
                    finishes.append((action.id, finish, attempt_id, None))
                    return
            stats.succeeded += 1
            finish = Finish("succeeded", "succeeded", result=_jsonable(answer), http_status=200)
            finishes.append((action.id, finish, attempt_id, (action.system, action.task_id)))

        async with anyio.create_task_group() as senders:
            for r in sending:
                senders.start_soon(send, r)
        _crash_point("after-answer")
        await self.store.finish_many(self.worker, finishes)
        observe_actions(batch, finishes)

    def _prepare(self, action: ClaimedAction) -> _Ready | str:
        """Validate a claimed action; the reason it fails, or what sending it needs."""
        try:
            spec, params = validate_action(
                action.system, action.kind, _decode_params(action.params_text)
            )
        except InvalidInput as exc:
            return f"invalid action: {exc}"
        upstream = self.upstreams.get(spec.system)
        if upstream is None:
            return f"{spec.system} is not configured (no [systems.{spec.system}] section)"
        max_attempts = action.max_attempts or self.settings.retry.max_attempts
        if action.attempts >= max_attempts:
            return f"gave up after {action.attempts} attempts"
        return _Ready(action, params, upstream, max_attempts)

    async def _baselines(
        self,
        ready: list[_Ready],
        finishes: list[tuple[int, Finish, int | None, tuple[str, str] | None]],
        stats: ApplyStats,
    ) -> dict[int, int | None]:
        """The baseline of every ready action (see the module docstring), from the stored
        snapshots in one query; a task never synced is read from the upstream."""
        out: dict[int, int | None] = {}
        unknown = [r for r in ready if r.action.baseline is None and r.action.kind in ADDITIVE]
        inputs = await self.store.baseline_inputs_many(
            [(r.action.system, r.action.task_id) for r in unknown]
        )
        to_read: list[_Ready] = []
        for r in ready:
            action = r.action
            if action.baseline is not None or action.kind not in ADDITIVE:
                out[action.id] = action.baseline if action.baseline is not None else 0
                continue
            found = inputs.get((action.system, action.task_id))
            if found is None or not isinstance(found[1], Mapping):
                to_read.append(r)
                continue
            _, payload, done = found
            seen = effect_count(action.kind, r.params, r.upstream.observe(payload))
            out[action.id] = seen + sum(
                1 for kind, p, _ in done if kind == action.kind and _same_effect(kind, p, r.params)
            )

        async def read(r: _Ready) -> None:
            try:
                fetched = await r.upstream.fetch(r.action.task_id)
            except UpstreamError as exc:
                attempts = r.action.attempts + 1  # a failed read uses up an attempt
                finishes.append(
                    (
                        r.action.id,
                        self._decide(r.action, exc, stats, r.max_attempts, attempts, None),
                        None,
                        None,
                    )
                )
                return
            out[r.action.id] = effect_count(r.action.kind, r.params, fetched.observation)

        async with anyio.create_task_group() as readers:
            for r in to_read:
                readers.start_soon(read, r)
        return out

    async def _renew_leases(self) -> None:
        interval = max(self.settings.worker.lease / 3, 0.5)
        while True:
            await anyio.sleep(interval)
            if self.in_flight:
                await self.store.renew_action_leases(
                    self.worker, sorted(self.in_flight), self.settings.worker.lease
                )

    # --- one action -----------------------------------------------------------------------

    async def process(self, action: ClaimedAction, stats: ApplyStats) -> None:
        try:
            params = _decode_params(action.params_text)
            spec, params = validate_action(action.system, action.kind, params)
        except InvalidInput as exc:
            await self._fail(action, f"invalid action: {exc}", stats)
            return
        upstream = self.upstreams.get(spec.system)
        if upstream is None:
            await self._fail(
                action,
                f"{spec.system} is not configured (no [systems.{spec.system}] section)",
                stats,
            )
            return
        max_attempts = action.max_attempts or self.settings.retry.max_attempts

        last = action.last_outcome
        if last is None:  # an attempt started and never recorded its outcome: the worker died
            await self.store.close_dangling_attempts(
                action.id, "the worker stopped before recording the outcome"
            )
            last = "unknown"
        if last == "unknown":
            verdict = await self._verify(action, upstream, params, stats)
            if verdict is not False:  # applied (done) or could not tell (rescheduled)
                return

        if action.attempts >= max_attempts:
            await self._fail(action, f"gave up after {action.attempts} attempts", stats)
            return
        baseline = action.baseline
        if baseline is None:
            try:
                baseline = await self._baseline(action, upstream, params)
            except UpstreamError as exc:
                # a read that keeps failing (a refused credential, a task that cannot be read)
                # uses up attempts like a send would, so max_attempts ends it
                await self._reschedule(
                    action, None, exc, stats, max_attempts, attempts=action.attempts + 1
                )
                return
        attempt_id = await self.store.start_attempt(action.id, self.worker, baseline)
        if attempt_id is None:
            log.warning(
                "lost the lease on action %s before sending; another worker has it", action.id
            )
            return
        attempts = action.attempts + 1
        _crash_point("after-attempt")
        try:
            answer = await upstream.apply(action.task_id, action.kind, params)
        except UpstreamError as exc:
            await self._reschedule(action, attempt_id, exc, stats, max_attempts, attempts=attempts)
            return
        _crash_point("after-answer")
        await self.store.finish(
            action.id,
            self.worker,
            Finish("succeeded", "succeeded", result=_jsonable(answer), http_status=200),
            attempt_id,
            repoll=(action.system, action.task_id),
        )
        observe_action(action.system, action.kind, "succeeded")
        stats.succeeded += 1
        log.info(
            "action %s %s on %s task %s succeeded",
            action.id,
            action.kind,
            action.system,
            action.task_id,
        )

    async def _verify(
        self,
        action: ClaimedAction,
        upstream: Upstream,
        params: Mapping[str, str],
        stats: ApplyStats,
    ) -> bool | None:
        """Read the task back after an unknown outcome. True: it took effect (recorded);
        False: it did not (send again); None: the read failed (rescheduled)."""
        try:
            fetched = await upstream.fetch(action.task_id)
        except UpstreamError as exc:
            max_attempts = action.max_attempts or self.settings.retry.max_attempts
            attempts = action.attempts + 1  # a failed read-back counts, or it could loop forever
            if attempts >= max_attempts:
                await self._fail(
                    action,
                    f"outcome unknown after {action.attempts} attempts and the task cannot be read back: {exc}",
                    stats,
                )
            else:
                delay = action_delay(
                    attempts,
                    self.settings.retry.base_delay,
                    self.settings.retry.max_delay,
                    exc.retry_after,
                    self.rng,
                )
                await self.store.finish(
                    action.id,
                    self.worker,
                    Finish(
                        "unknown",
                        "pending",
                        error=f"outcome unknown; read-back failed: {exc}",
                        next_attempt_at=utcnow() + timedelta(seconds=delay),
                        attempts=attempts,
                    ),
                )
                observe_action(action.system, action.kind, "unknown")
            return None
        count = effect_count(action.kind, params, fetched.observation)
        baseline = action.baseline if action.kind in ADDITIVE else 0
        applied = count > baseline if baseline is not None else count > 0
        if applied:
            stats.verified += 1
            stats.succeeded += 1
            await self.store.finish(
                action.id,
                self.worker,
                Finish(
                    "succeeded",
                    "succeeded",
                    result={
                        "verified": "the answer was lost; reading the task back showed the effect",
                        "status": fetched.observation.status,
                    },
                ),
                repoll=(action.system, action.task_id),
            )
            observe_action(action.system, action.kind, "succeeded")
            log.info(
                "action %s: the answer was lost but the read-back shows it took effect", action.id
            )
            return True
        log.info("action %s: the read-back shows no effect; sending again", action.id)
        return False

    async def _baseline(
        self, action: ClaimedAction, upstream: Upstream, params: Mapping[str, str]
    ) -> int:
        """How often the effect is visible before the first attempt (additive kinds only)."""
        if action.kind not in ADDITIVE:
            return 0
        _fetched_at, payload, done = await self.store.effect_baseline_inputs(
            action.system, action.task_id, action.kind
        )
        if isinstance(payload, Mapping):
            seen = effect_count(action.kind, params, upstream.observe(payload))
            # our own earlier actions with the same text, applied after that snapshot was taken
            since = sum(1 for p, _ in done if _same_effect(action.kind, p, params))
            return seen + since
        fetched = await upstream.fetch(action.task_id)  # never synced: ask the upstream
        return effect_count(action.kind, params, fetched.observation)

    async def _reschedule(
        self,
        action: ClaimedAction,
        attempt_id: int | None,
        exc: UpstreamError,
        stats: ApplyStats,
        max_attempts: int,
        *,
        attempts: int,
    ) -> None:
        finish = self._decide(action, exc, stats, max_attempts, attempts, attempt_id)
        await self.store.finish(action.id, self.worker, finish, attempt_id)
        observe_action(action.system, action.kind, finish.outcome)

    def _decide(
        self,
        action: ClaimedAction,
        exc: UpstreamError,
        stats: ApplyStats,
        max_attempts: int,
        attempts: int,
        attempt_id: int | None,
    ) -> Finish:
        """What a failed attempt (or a failed read before one) makes of the action."""
        # without an attempt row (a failed read before sending) the count is stored here
        counted = attempts if attempt_id is None else None
        if exc.deferred:
            # Nothing was sent (circuit open, or the gateway's window is spent): not a try of
            # the upstream, so it uses up no attempt; come back when the system takes requests.
            stats.retried += 1
            delay = max(exc.retry_after or 0.0, self.settings.retry.base_delay)
            log.info("action %s: %s; next attempt in %.1fs", action.id, exc, delay)
            return Finish(
                "retry",
                "pending",
                error=str(exc),
                next_attempt_at=utcnow() + timedelta(seconds=delay),
                attempts=action.attempts,
            )
        if exc.kind in (ErrorKind.PERMANENT, ErrorKind.NOT_FOUND):
            stats.failed += 1
            log.warning("action %s failed: %s", action.id, exc)
            return Finish(
                "failed", "failed", error=str(exc), http_status=exc.http_status, attempts=counted
            )
        outcome = "unknown" if exc.kind is ErrorKind.UNKNOWN else "retry"
        if outcome == "unknown":
            stats.unknown += 1
        if outcome == "retry" and attempts >= max_attempts:
            stats.failed += 1
            log.warning("action %s failed after %s attempts: %s", action.id, attempts, exc)
            return Finish(
                "retry",
                "failed",
                error=f"gave up after {attempts} attempts: {exc}",
                http_status=exc.http_status,
                attempts=counted,
            )
        # An unknown outcome is always followed by a read-back (even past max_attempts): the
        # action may have taken effect, and failing it blindly would misreport it.
        delay = action_delay(
            attempts,
            self.settings.retry.base_delay,
            self.settings.retry.max_delay,
            exc.retry_after,
            self.rng,
        )
        stats.retried += 1
        log.info("action %s: %s; next attempt in %.1fs", action.id, exc, delay)
        return Finish(
            outcome,
            "pending",
            error=str(exc),
            http_status=exc.http_status,
            next_attempt_at=utcnow() + timedelta(seconds=delay),
            attempts=counted,
        )

    async def _fail(self, action: ClaimedAction, reason: str, stats: ApplyStats) -> None:
        stats.failed += 1
        await self.store.finish(action.id, self.worker, Finish("failed", "failed", error=reason))
        observe_action(action.system, action.kind, "failed")
        log.warning("action %s failed: %s", action.id, reason)


def _decode_params(text: str | None) -> Any:
    if text is None:
        raise InvalidInput("params is missing (NULL)")
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"params is not valid JSON ({exc})") from None


def _same_effect(kind: str, stored: Any, params: Mapping[str, str]) -> bool:
    if isinstance(stored, str):
        try:
            stored = orjson.loads(stored)
        except orjson.JSONDecodeError:
            return False
    if not isinstance(stored, Mapping):
        return False
    if kind == "comment":
        return stored.get("comment") == params.get("comment")
    return stored.get("title") == params.get("title") and stored.get("description") == params.get(
        "description"
    )


def _jsonable(answer: Mapping[str, JSON]) -> JSON:
    return orjson.loads(orjson.dumps(answer, option=orjson.OPT_NON_STR_KEYS))
