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

There is one pipeline, and each of its steps handles a set of actions in one transaction (one
statement per action would cost more than its request): claim; validate, read back those whose
last outcome is unknown, take the baselines of the others; record the attempts; send; record
the outcomes. The steps overlap (ActionRunner._run): the next set is claimed and prepared while
the previous one is being sent, attempts are recorded for a group as soon as that many send
slots are free, and outcomes are written while other sends are still out, so `concurrency`
requests stay in flight instead of waiting for the slowest request of a batch and for the
database steps between batches.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import anyio
import orjson
from anyio.abc import TaskGroup

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


# Attempts are recorded, and outcomes written, for groups of at least this many actions while
# more are in flight (a transaction costs about as much for one action as for a few dozen); a
# group smaller than that waits for a send slot or an outcome, never longer than OUTCOMES_WAIT.
GROUP = 8
OUTCOMES_WAIT = 0.25  # seconds an outcome waits for others before it is written alone
# A claim takes up to this many times `concurrency` (at most worker.batch_size): each claim
# looks at every open action once, so fewer, larger ones cost the database less (5,000 queued
# on PostgreSQL: 18 % less time for the whole apply than claims of `concurrency`).
CLAIM_SETS = 4


@dataclass(eq=False)
class _Pass:
    """The state of one pass: actions move from claimed (preparing) to ready (validated, their
    baselines taken), to sending (attempt recorded), to outcomes (answered, not yet written).
    Each stage wakes the next with an Event it replaces once set."""

    stats: ApplyStats
    slots: int  # sends in flight at most: worker.concurrency
    claim: bool  # claim more (run_until_idle) or only work through what it was given
    # The runner's writes, one at a time on SQLite: it has one writer anyway, and a transaction
    # waiting in SQLite's busy handler sleeps in steps of milliseconds. PostgreSQL runs them
    # side by side: they touch different actions, and the claim and the lease renewal skip
    # locked rows rather than wait for them.
    lock: AbstractAsyncContextManager[Any]
    group: int = 0  # GROUP, or fewer with fewer slots
    claimed: dict[int, ClaimedAction] = field(default_factory=dict)  # not yet written
    preparing: int = 0
    ready: deque[tuple[_Ready, int | None]] = field(default_factory=deque)
    sending: int = 0  # attempts recorded, answer not yet in
    to_send: deque[tuple[_Ready, int]] = field(default_factory=deque)
    outcomes: list[Finish] = field(default_factory=list)
    first_outcome_at: float = 0.0
    closing: bool = False  # nothing more will be claimed
    completions: int = 0  # outcome groups written (or given up): may unblock a task's next
    claimer: anyio.Event = field(default_factory=anyio.Event)
    starter: anyio.Event = field(default_factory=anyio.Event)
    recorder: anyio.Event = field(default_factory=anyio.Event)
    idle_senders: deque[anyio.Event] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.group = max(1, min(GROUP, self.slots))

    def wake(self, name: str) -> None:
        event: anyio.Event = getattr(self, name)
        event.set()
        setattr(self, name, anyio.Event())

    @property
    def drained(self) -> bool:
        return self.closing and not self.claimed


@dataclass
class ActionRunner:
    store: Store
    upstreams: Mapping[System, Upstream]
    settings: Settings
    worker: str
    rng: random.Random = field(default_factory=random.Random)
    hooks: Hooks = field(default_factory=Hooks)
    in_flight: set[int] = field(default_factory=set)  # claimed by this worker, not yet written

    async def run_until_idle(self) -> ApplyStats:
        """Apply due actions until none is due. The claim hands out at most one open action
        per task at a time, so actions on one task go one after the other, in queue order."""
        stats = ApplyStats()
        await self._run(self._pass(stats, claim=True))
        return stats

    async def process_batch(self, batch: list[ClaimedAction], stats: ApplyStats) -> None:
        """Work through an already claimed set of actions, claiming no more."""
        run = self._pass(stats, claim=False)
        self._take(run, batch)
        await self._run(run, batch)

    def _pass(self, stats: ApplyStats, *, claim: bool) -> _Pass:
        lock = nullcontext() if self.store.is_postgres else anyio.Lock()
        return _Pass(stats, self.settings.worker.concurrency, claim, lock)

    async def _run(self, run: _Pass, batch: list[ClaimedAction] | None = None) -> None:
        """One pass as a pipeline (see the module docstring): a claimer, one preparation per
        claimed set, a starter that records attempts, `concurrency` senders and a recorder
        that writes outcomes, over the queues of `run`. The exactly-once rules hold as in a
        batch: an attempt is committed before its request, which then goes out at once (the
        starter records attempts only for free send slots, and hands them over as soon as the
        transaction returns); an action whose last outcome is unknown is read back before
        anything is sent; an outcome is written only after its answer."""
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._renew_leases, run)
                for _ in range(run.slots):
                    tg.start_soon(self._sender, run)
                tg.start_soon(self._starter, run)
                tg.start_soon(self._recorder, run)
                if batch is not None:
                    tg.start_soon(self._prepare_set, run, batch)
                if run.claim:
                    await self._claimer(run, tg)
                run.closing = True
                while not run.drained:
                    await run.claimer.wait()
                tg.cancel_scope.cancel()  # the stages wait for work that will not come
        finally:
            self.in_flight.difference_update(run.claimed)

    def _take(self, run: _Pass, batch: list[ClaimedAction]) -> None:
        self.in_flight.update(a.id for a in batch)
        run.claimed.update((a.id, a) for a in batch)
        run.preparing += len(batch)
        run.stats.claimed += len(batch)

    def _done(self, run: _Pass, action_ids: list[int]) -> None:
        """These actions leave the pass (written, given up, or no longer ours)."""
        for action_id in action_ids:
            run.claimed.pop(action_id, None)
        self.in_flight.difference_update(action_ids)
        run.completions += 1
        run.wake("claimer")

    async def _claimer(self, run: _Pass, tg: TaskGroup) -> None:
        """Claim ahead: a new set as soon as no more than half of `concurrency` is left to
        start. Once a claim comes back empty, the next waits until outcomes were written
        (they may unblock the next action on a task) or a second has passed; with nothing in
        flight, the pass is over."""
        exhausted = False
        while True:
            if run.preparing + len(run.ready) > run.slots // 2:
                await run.claimer.wait()  # the starter takes some
                continue
            if exhausted:
                seen = run.completions
                with anyio.move_on_after(1.0):
                    while run.completions == seen:
                        await run.claimer.wait()
            seen = run.completions
            async with run.lock:
                claimed = await self.store.claim_actions(
                    self.worker, limit=self._claim_size(run), lease=self.settings.worker.lease
                )
            # An action of ours whose lease ran out while the database was locked or slow
            # is claimed again by our own next claim: it is still being worked on here, and
            # handing it out twice would send it twice.
            claimed = [a for a in claimed if a.id not in self.in_flight]
            # (outcomes written meanwhile may have unblocked a task's next: claim again now)
            exhausted = not claimed and seen == run.completions
            if claimed:
                self._take(run, claimed)
                tg.start_soon(self._prepare_set, run, claimed)
            elif exhausted and not run.claimed:
                return

    def _claim_size(self, run: _Pass) -> int:
        return max(run.slots, min(CLAIM_SETS * run.slots, self.settings.worker.batch_size))

    async def _prepare_set(self, run: _Pass, batch: list[ClaimedAction]) -> None:
        """Validate a claimed set; read the tasks back after an unknown outcome and take
        baselines before a first attempt (the two reads run side by side, on disjoint
        actions). What can be sent joins the ready queue; what failed, the outcomes."""
        finishes: list[Finish] = []
        baselines: dict[int, int | None] = {}  # action id -> baseline: the actions to send
        ready: list[_Ready] = []
        try:
            dangling = [a.id for a in batch if a.interrupted]
            if dangling:
                async with run.lock:
                    await self.store.close_dangling_attempts(dangling, DANGLING)
            for action in batch:
                prepared = self._prepare(action)
                if isinstance(prepared, str):
                    finishes.append(self._fail(action, prepared, run.stats))
                else:
                    ready.append(prepared)
            doubtful = [r for r in ready if r.action.outcome_unknown]
            fresh = [
                r
                for r in ready
                if not r.action.outcome_unknown and not self._gave_up(r, finishes, run.stats)
            ]
            async with anyio.create_task_group() as reads:
                reads.start_soon(self._read_back, doubtful, baselines, finishes, run.stats)
                reads.start_soon(self._baselines, fresh, baselines, finishes, run.stats)
        except Exception:
            # A database failure: the leases expire and the next claimer takes the actions
            # over (reading back those whose last outcome is unknown). Nothing is lost.
            log.exception("a set of %s actions was interrupted; it will be taken over", len(batch))
            self._done(run, [a.id for a in batch])
            return
        finally:
            run.preparing -= len(batch)
        run.ready.extend((r, baselines[r.action.id]) for r in ready if r.action.id in baselines)
        self._record(run, finishes)
        run.wake("starter")

    async def _starter(self, run: _Pass) -> None:
        """Record the attempts of ready actions as send slots free up, a group at a time, and
        hand them to the senders at once."""
        while True:
            free = run.slots - run.sending
            waiting = len(run.ready)
            if not waiting or free < min(run.group, waiting):
                await run.starter.wait()
                continue
            group = [run.ready.popleft() for _ in range(min(free, waiting))]
            run.sending += len(group)
            run.wake("claimer")  # room to claim ahead again
            try:
                async with run.lock:
                    attempt_ids = await self.store.start_attempts(
                        self.worker, {r.action.id: baseline for r, baseline in group}
                    )
            except Exception:
                log.exception(
                    "recording %s attempts failed; the actions will be taken over", len(group)
                )
                run.sending -= len(group)
                self._done(run, [r.action.id for r, _ in group])  # nothing was sent
                continue
            self.hooks.crash_point("after-attempt")
            lost = []
            for r, _ in group:
                attempt_id = attempt_ids.get(r.action.id)
                if attempt_id is None:
                    log.warning("lost the lease on action %s before sending", r.action.id)
                    lost.append(r.action.id)
                    continue
                run.to_send.append((r, attempt_id))
                if run.idle_senders:
                    run.idle_senders.popleft().set()
            if lost:
                run.sending -= len(lost)
                self._done(run, lost)

    async def _sender(self, run: _Pass) -> None:
        """One of `concurrency` senders: each sends one recorded attempt at a time."""
        while True:
            if not run.to_send:
                wake = anyio.Event()
                run.idle_senders.append(wake)
                await wake.wait()
                continue
            r, attempt_id = run.to_send.popleft()
            try:
                finish = await self._send(r, attempt_id, run.stats)
            except Exception:
                # a bug, not an answer: the attempt stays without an outcome, so whoever
                # takes the action over reads the task back before sending again
                log.exception("action %s: unexpected error sending it", r.action.id)
                run.sending -= 1
                self._done(run, [r.action.id])
                run.wake("starter")
                continue
            run.sending -= 1
            self._record(run, [finish])
            run.wake("starter")

    async def _send(self, r: _Ready, attempt_id: int, stats: ApplyStats) -> Finish:
        action = r.action
        with log_context(system=action.system, task=action.task_id, action=str(action.id)):
            try:
                answer = await r.upstream.apply(action.task_id, action.kind, r.params)
            except UpstreamError as exc:
                return self._decide(r, exc, stats, action.attempts + 1, attempt_id)
        stats.succeeded += 1
        return Finish(
            action.id,
            AttemptOutcome.SUCCEEDED,
            ActionStatus.SUCCEEDED,
            attempt_id,
            result=_jsonable(answer),
            http_status=200,
            repoll=(action.system, action.task_id),
        )

    def _record(self, run: _Pass, finishes: list[Finish]) -> None:
        if not finishes:
            return
        first = not run.outcomes
        if first:
            run.first_outcome_at = anyio.current_time()
        run.outcomes.extend(finishes)
        if first or len(run.outcomes) >= run.group or run.sending == 0:
            run.wake("recorder")

    async def _recorder(self, run: _Pass) -> None:
        """Write outcomes a group at a time: once GROUP are in, once nothing is being sent, or
        once the first has waited OUTCOMES_WAIT (an outcome written late holds its task's next
        action back, and its lease)."""
        while True:
            if not run.outcomes:
                await run.recorder.wait()
                continue
            if len(run.outcomes) < run.group and run.sending:
                wait = run.first_outcome_at + OUTCOMES_WAIT - anyio.current_time()
                if wait > 0:
                    with anyio.move_on_after(wait):
                        await run.recorder.wait()
                    continue
            group, run.outcomes = run.outcomes, []
            self.hooks.crash_point("after-answer")
            try:
                async with run.lock:
                    await self.store.finish(self.worker, group)
            except Exception:
                # the attempts stay without an outcome: whoever takes the actions over reads
                # their tasks back before sending anything again
                log.exception("recording %s outcomes failed; they will be read back", len(group))
            else:
                observe_actions(
                    [run.claimed[f.action_id] for f in group if f.action_id in run.claimed], group
                )
            self._done(run, [f.action_id for f in group])

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

    async def _renew_leases(self, run: _Pass) -> None:
        interval = max(self.settings.worker.lease / 3, 0.5)
        while True:
            await anyio.sleep(interval)
            if run.claimed:
                async with run.lock:
                    await self.store.renew_action_leases(
                        self.worker, sorted(run.claimed), self.settings.worker.lease
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
