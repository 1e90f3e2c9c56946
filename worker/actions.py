"""One pass over due actions: claim, validate, read back, apply, classify, record.

Exactly-once rests on three rules:
1. An attempt row is committed *before* the request goes out, so a crash at any point leaves
   evidence: an attempt without an outcome.
2. Before the first attempt the action's *baseline* is recorded: how often its effect is already
   visible on the task (its catalogue entry says how the effect shows; for a state, such as a
   terminated task or a deleted comment, the baseline is 0).
3. After an unknown outcome (the answer was lost, or the worker died mid-call) nothing is sent
   again until the task has been read back: the effect count above the baseline means the
   action took effect.
Writes go over connections that are never reused (upstreams/http.py), so the HTTP layer never
re-sends on its own either.

There is one pipeline, over a claimed batch, one transaction per step for the whole set (one
statement per action would cost more than its request): validate; read back those whose last
outcome is unknown; baselines; record every attempt; send; record every outcome.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import anyio
import orjson

from worker.backoff import action_delay
from worker.catalog import ActionSpec, Adds, InvalidInput, configured_defaults, validate_action
from worker.config import Settings
from worker.hooks import Hooks
from worker.logs import log_context
from worker.metrics import observe_actions
from worker.model import JSON, ActionStatus, AttemptOutcome, System
from worker.store import ClaimedAction, Finish, Store, utcnow
from worker.upstreams.base import ErrorKind, Upstream, UpstreamError

log = logging.getLogger("worker.actions")

DANGLING = "the worker stopped before recording the outcome"


@dataclass(frozen=True, slots=True)
class _Ready:
    """A validated action and what sending it needs."""

    action: ClaimedAction
    spec: ActionSpec
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
    hooks: Hooks = field(default_factory=Hooks)
    in_flight: set[int] = field(default_factory=set)
    _completions: int = 0
    _wake: anyio.Event = field(default_factory=anyio.Event)

    async def run_until_idle(self) -> ApplyStats:
        """Apply due actions until none is due. Batches on different tasks run concurrently;
        the claim hands out at most one open action per task at a time."""
        stats = ApplyStats()
        slots = self.settings.worker.concurrency
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._renew_leases)
            while True:
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
                    tg.start_soon(self._guarded_batch, claimed, stats)
                if claimed and len(self.in_flight) < slots:
                    continue  # there may be more due right now
                if seen != self._completions:
                    continue  # one finished meanwhile: it may have unblocked its task's next
                if not self.in_flight:
                    break
                # wait until a batch finishes: it may unblock the next action on its task
                self._wake = anyio.Event()
                with anyio.move_on_after(1.0):
                    await self._wake.wait()
            tg.cancel_scope.cancel()
        return stats

    async def _guarded_batch(self, batch: list[ClaimedAction], stats: ApplyStats) -> None:
        try:
            await self.process_batch(batch, stats)
        except Exception:
            # A database failure mid-batch: the leases expire and the next claimer, seeing an
            # attempt without outcome, reads the task back before sending. Nothing is lost.
            log.exception(
                "a batch of %s actions was interrupted; it will be taken over", len(batch)
            )
        finally:
            self.in_flight.difference_update(a.id for a in batch)
            self._completions += 1
            self._wake.set()

    async def process_batch(self, batch: list[ClaimedAction], stats: ApplyStats) -> None:
        """The one path of a claimed set of actions, one transaction per step: validate; read
        the tasks back after an unknown outcome and take baselines before a first attempt (the
        two reads run side by side, on disjoint actions); record the attempts; send; record
        every outcome."""
        finishes: list[Finish] = []
        await self.store.close_dangling_attempts([a.id for a in batch if a.interrupted], DANGLING)
        ready: list[_Ready] = []
        for action in batch:
            prepared = self._prepare(action)
            if isinstance(prepared, str):
                finishes.append(self._fail(action, prepared, stats))
            else:
                ready.append(prepared)
        doubtful = [r for r in ready if r.action.outcome_unknown]
        fresh = [
            r
            for r in ready
            if not r.action.outcome_unknown and not self._gave_up(r, finishes, stats)
        ]
        baselines: dict[int, int | None] = {}  # action id -> baseline: the actions to send
        async with anyio.create_task_group() as reads:
            reads.start_soon(self._read_back, doubtful, baselines, finishes, stats)
            reads.start_soon(self._baselines, fresh, baselines, finishes, stats)
        attempt_ids = await self.store.start_attempts(self.worker, baselines)
        self.hooks.crash_point("after-attempt")
        for action_id in baselines.keys() - attempt_ids.keys():
            log.warning("lost the lease on action %s before sending", action_id)

        async def send(r: _Ready, attempt_id: int) -> None:
            action = r.action
            with log_context(system=action.system, task=action.task_id, action=str(action.id)):
                try:
                    answer = await r.upstream.apply(action.task_id, action.kind, r.params)
                except UpstreamError as exc:
                    attempts = action.attempts + 1
                    finishes.append(self._decide(r, exc, stats, attempts, attempt_id))
                    return
            stats.succeeded += 1
            finishes.append(
                Finish(
                    action.id,
                    AttemptOutcome.SUCCEEDED,
                    ActionStatus.SUCCEEDED,
                    attempt_id,
                    result=_jsonable(answer),
                    http_status=200,
                    repoll=(action.system, action.task_id),
                )
            )

        async with anyio.create_task_group() as senders:
            for r in ready:
                if r.action.id in attempt_ids:
                    senders.start_soon(send, r, attempt_ids[r.action.id])
        self.hooks.crash_point("after-answer")
        await self.store.finish(self.worker, finishes)
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
        # a row inserted with SQL skipped enqueue, which fills these in
        params = configured_defaults(spec, getattr(self.settings.systems, spec.system)) | params
        max_attempts = action.max_attempts or self.settings.retry.max_attempts
        return _Ready(action, spec, params, upstream, max_attempts)

    async def _read_back(
        self,
        doubtful: list[_Ready],
        baselines: dict[int, int | None],
        finishes: list[Finish],
        stats: ApplyStats,
    ) -> None:
        """Read back the tasks of actions whose last outcome is unknown. One that took effect
        succeeds; one whose task cannot be read is rescheduled (or fails, out of attempts);
        one that did not take effect is sent again, with its baseline."""

        async def check(r: _Ready) -> None:
            action = r.action
            with log_context(system=action.system, task=action.task_id, action=str(action.id)):
                try:
                    fetched = await r.upstream.fetch(action.task_id)
                except UpstreamError as exc:
                    finishes.append(self._unreadable(r, exc, stats))
                    return
                count = r.spec.effect.count(r.params, fetched.observation)
                baseline = action.baseline if isinstance(r.spec.effect, Adds) else 0
                if count <= (baseline or 0):
                    log.info("action %s: the read-back shows no effect; sending again", action.id)
                    if not self._gave_up(r, finishes, stats):
                        # none stored (a row written by hand): the count just read is it
                        baselines[action.id] = (
                            action.baseline if action.baseline is not None else count
                        )
                    return
                stats.verified += 1
                stats.succeeded += 1
                log.info(
                    "action %s: the answer was lost but the read-back shows it took effect",
                    action.id,
                )
                finishes.append(
                    Finish(
                        action.id,
                        AttemptOutcome.SUCCEEDED,
                        ActionStatus.SUCCEEDED,
                        result={
                            "verified": "the answer was lost; reading the task back showed the effect",
                            "status": fetched.observation.status,
                        },
                        repoll=(action.system, action.task_id),
                    )
                )

        async with anyio.create_task_group() as readers:
            for r in doubtful:
                readers.start_soon(check, r)

    def _gave_up(self, r: _Ready, finishes: list[Finish], stats: ApplyStats) -> bool:
        """Whether the action has used up its attempts (then it fails)."""
        if r.action.attempts < r.max_attempts:
            return False
        finishes.append(self._fail(r.action, f"gave up after {r.action.attempts} attempts", stats))
        return True

    def _unreadable(self, r: _Ready, exc: UpstreamError, stats: ApplyStats) -> Finish:
        """A read-back that failed counts as an attempt, or it could loop for ever."""
        action = r.action
        attempts = action.attempts + 1
        if attempts >= r.max_attempts:
            reason = (
                f"outcome unknown after {action.attempts} attempts and the task cannot be read "
                f"back: {exc}"
            )
            return self._fail(action, reason, stats)
        return Finish(
            action.id,
            AttemptOutcome.UNKNOWN,
            ActionStatus.PENDING,
            error=f"outcome unknown; read-back failed: {exc}",
            next_attempt_at=utcnow() + timedelta(seconds=self._delay(attempts, exc)),
            attempts=attempts,
        )

    async def _baselines(
        self,
        ready: list[_Ready],
        out: dict[int, int | None],
        finishes: list[Finish],
        stats: ApplyStats,
    ) -> None:
        """The baseline of every ready action (see the module docstring), from the stored
        snapshots in one query; a task never synced is read from the upstream."""
        unknown = [
            r for r in ready if r.action.baseline is None and isinstance(r.spec.effect, Adds)
        ]
        inputs = await self.store.baseline_inputs([r.action.id for r in unknown])
        to_read: list[_Ready] = []
        for r in ready:
            action, effect = r.action, r.spec.effect
            if action.baseline is not None or not isinstance(effect, Adds):
                out[action.id] = action.baseline if action.baseline is not None else 0
                continue
            found = inputs.get(action.id)
            if found is None or not isinstance(found.payload, Mapping):
                to_read.append(r)
                continue
            seen = effect.count(r.params, r.upstream.observe(found.payload))
            # our own earlier actions with the same effect, applied after that snapshot
            out[action.id] = seen + sum(1 for done in found.done if effect.same(done, r.params))

        async def read(r: _Ready) -> None:
            try:
                fetched = await r.upstream.fetch(r.action.task_id)
            except UpstreamError as exc:
                attempts = r.action.attempts + 1  # a failed read uses up an attempt
                finishes.append(self._decide(r, exc, stats, attempts, None))
                return
            out[r.action.id] = r.spec.effect.count(r.params, fetched.observation)

        async with anyio.create_task_group() as readers:
            for r in to_read:
                readers.start_soon(read, r)

    async def _renew_leases(self) -> None:
        interval = max(self.settings.worker.lease / 3, 0.5)
        while True:
            await anyio.sleep(interval)
            if self.in_flight:
                await self.store.renew_action_leases(
                    self.worker, sorted(self.in_flight), self.settings.worker.lease
                )

    def _decide(
        self,
        r: _Ready,
        exc: UpstreamError,
        stats: ApplyStats,
        attempts: int,
        attempt_id: int | None,
    ) -> Finish:
        """What a failed attempt (or a failed read before one) makes of the action."""
        action = r.action
        # without an attempt row (a failed read before sending) the count is stored here
        counted = attempts if attempt_id is None else None
        unknown = exc.kind is ErrorKind.UNKNOWN
        outcome = AttemptOutcome.UNKNOWN if unknown else AttemptOutcome.RETRY
        next_attempt_at = None
        if exc.deferred:
            # Nothing was sent (circuit open, or the gateway's window is spent): not a try of
            # the upstream, so it uses up no attempt; come back when the system takes requests.
            status, error = ActionStatus.PENDING, str(exc)
            delay = max(exc.retry_after or 0.0, self.settings.retry.base_delay)
            next_attempt_at = utcnow() + timedelta(seconds=delay)
            counted = action.attempts
            stats.retried += 1
            log.info("action %s: %s; next attempt in %.1fs", action.id, exc, delay)
        elif exc.kind in (ErrorKind.PERMANENT, ErrorKind.NOT_FOUND):
            outcome, status, error = AttemptOutcome.FAILED, ActionStatus.FAILED, str(exc)
            stats.failed += 1
            log.warning("action %s failed: %s", action.id, exc)
        elif not unknown and attempts >= r.max_attempts:
            status, error = ActionStatus.FAILED, f"gave up after {attempts} attempts: {exc}"
            stats.failed += 1
            log.warning("action %s failed after %s attempts: %s", action.id, attempts, exc)
        else:
            # An unknown outcome is always followed by a read-back (even past max_attempts):
            # the action may have taken effect, and failing it blindly would misreport it.
            status, error = ActionStatus.PENDING, str(exc)
            delay = self._delay(attempts, exc)
            next_attempt_at = utcnow() + timedelta(seconds=delay)
            stats.retried += 1
            if unknown:
                stats.unknown += 1
            log.info("action %s: %s; next attempt in %.1fs", action.id, exc, delay)
        return Finish(
            action.id,
            outcome,
            status,
            attempt_id,
            error=error,
            http_status=exc.http_status,
            next_attempt_at=next_attempt_at,
            attempts=counted,
        )

    def _delay(self, attempts: int, exc: UpstreamError) -> float:
        retry = self.settings.retry
        return action_delay(attempts, retry.base_delay, retry.max_delay, exc.retry_after, self.rng)

    def _fail(self, action: ClaimedAction, reason: str, stats: ApplyStats) -> Finish:
        stats.failed += 1
        log.warning("action %s failed: %s", action.id, reason)
        return Finish(action.id, AttemptOutcome.FAILED, ActionStatus.FAILED, error=reason)


def _decode_params(text: str | None) -> Any:
    if text is None:
        raise InvalidInput("params is missing (NULL)")
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"params is not valid JSON ({exc})") from None


def _jsonable(answer: Mapping[str, JSON]) -> JSON:
    return orjson.loads(orjson.dumps(answer, option=orjson.OPT_NON_STR_KEYS))
