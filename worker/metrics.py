"""Prometheus metrics of `tasksync run` (the `[metrics]` listener serves them: worker/observe.py).

Recording is off until `enable()` is called, which the daemon does when a listener is
configured: one-shot commands (`sync`, `apply`, ...) export nothing, so they neither import
prometheus-client (about 20 ms of start-up) nor pay for a single counter increment. Every
hot-path function below is then one global lookup and a None check.

Enabled, the hot path stays cheap: labelled children are bound once per label set and kept in
plain dicts, and upstream requests are counted in plain integers (the event loop is one
thread) that become metric families at scrape time: about 0.5 µs per request, against
aiohttp's ~100 µs. Poll results are counted per written batch (deferred ones, which sent
nothing, are not polls). No label ever carries a task id or an action id: the label sets are
bounded by systems × statuses × kinds.

The database-derived gauges (`tasksync_tasks`, ...) are not updated by the loops: the
listener reads them at scrape time (`DatabaseView`), with a short cache.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from worker import __version__

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

SYSTEMS = ("aicc", "secmaster", "koodrive")
POLL_OUTCOMES = ("unchanged", "changed", "failed", "not_found")
ATTEMPT_OUTCOMES = ("succeeded", "retry", "failed", "unknown")
CYCLE_KINDS = ("sync", "discover")
TASK_STATES = ("open", "in_progress", "done", "failed", "canceled", "unknown")
ACTION_STATUSES = ("pending", "running", "succeeded", "failed", "canceled")
EVENT_KINDS = (
    "status_changed",
    "trace",
    "comment_added",
    "comment_removed",
    "attachment_added",
    "attachment_removed",
)
# Upstream calls: 30 s is the default timeout; most answers take milliseconds.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Cycles: from an idle cycle (milliseconds) to a 100,000-task one (minutes).
CYCLE_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


class _Inc(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class _PollResult(Protocol):
    """What `observe_polls` reads of a worker.store.PollResult (kept structural: no import)."""

    @property
    def error(self) -> str | None: ...
    @property
    def not_found(self) -> bool: ...
    @property
    def changed(self) -> bool: ...
    @property
    def deferred(self) -> bool: ...
    @property
    def task(self) -> Any: ...
    @property
    def events(self) -> Sequence[Any]: ...


@dataclass
class DatabaseView:
    """The database-derived gauges as of `read_at` (time.monotonic()); filled by the store."""

    tasks: dict[tuple[str, str], int] = field(default_factory=dict)  # (system, state) -> n
    failing: dict[str, int] = field(default_factory=dict)
    poll_lag: dict[str, float] = field(default_factory=dict)
    actions: dict[str, int] = field(default_factory=dict)
    queue_age: float = 0.0
    read_at: float | None = None


class Recorder:
    """Every metric object, in its own registry (nothing global of prometheus-client's)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        import prometheus_client as pc
        from prometheus_client import CollectorRegistry

        # `_created` series double every counter for no use of ours (and are off by default in
        # OpenMetrics scrapes of other exporters); this process has no other metric users.
        pc.disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry or CollectorRegistry()
        r = self.registry
        pc.ProcessCollector(registry=r)
        pc.PlatformCollector(registry=r)
        info = pc.Gauge(
            "tasksync_build_info", "tasksync version (always 1)", ["version"], registry=r
        )
        info.labels(__version__).set(1)
        self.polls = pc.Counter(
            "tasksync_polls_total", "task polls by outcome", ["system", "outcome"], registry=r
        )
        # upstream requests: plain integers on the hot path, turned into metric families at
        # scrape time (_RequestCollector)
        self._requests: dict[str, _Requests] = {}
        r.register(_RequestCollector(self._requests))
        self.snapshots = pc.Counter(
            "tasksync_snapshots_stored_total", "task snapshots stored", ["system"], registry=r
        )
        self.events = pc.Counter(
            "tasksync_events_stored_total", "history events stored", ["system", "kind"], registry=r
        )
        self.attempts = pc.Counter(
            "tasksync_action_attempts_total",
            "outcomes recorded for actions (an attempt, a read-back, or a refusal)",
            ["system", "kind", "outcome"],
            registry=r,
        )
        self.cycles = pc.Histogram(
            "tasksync_cycle_duration_seconds",
            "sync and discovery cycles of this process",
            ["kind"],
            buckets=CYCLE_BUCKETS,
            registry=r,
        )
        self.cycle_end = pc.Gauge(
            "tasksync_last_cycle_end_timestamp_seconds",
            "Unix time the newest cycle of this process ended",
            ["kind"],
            registry=r,
        )
        self.pruned = pc.Counter(
            "tasksync_pruned_rows_total",
            "rows deleted by retention, per table",
            ["table"],
            registry=r,
        )
        self.database_up = pc.Gauge(
            "tasksync_database_up", "1 when the last database call succeeded", registry=r
        )
        self.database_up.set(1)
        self.view = DatabaseView()
        r.register(_ViewCollector(self))
        self._polls: dict[tuple[str, str], _Inc] = {}
        self._events: dict[tuple[str, str], _Inc] = {}
        self._snapshots: dict[str, _Inc] = {}
        for system in SYSTEMS:
            self._bind_system(system)
        for kind in CYCLE_KINDS:
            self.cycles.labels(kind)

    def _bind_system(self, system: str) -> None:
        # Series that exist from the start, at 0: rate() and the alerts need them before the
        # first event (a counter born at 1 loses that first increment to rate()).
        for outcome in POLL_OUTCOMES:
            self._polls[system, outcome] = self.polls.labels(system, outcome)
        for kind in EVENT_KINDS:
            self._events[system, kind] = self.events.labels(system, kind)
        self._snapshots[system] = self.snapshots.labels(system)
        self._requests.setdefault(system, _Requests())

    # -- the hot path ----------------------------------------------------------------------

    def request(self, system: str, code: int | str, seconds: float) -> None:
        # Not prometheus-client's Counter/Histogram here: each of their updates takes a lock
        # (about 1 µs apiece, 4 µs per request in all); the event loop is one thread, so plain
        # integers need none (0.4 µs).
        stats = self._requests.get(system)
        if stats is None:
            self._bind_system(system)
            stats = self._requests[system]
        codes = stats.codes
        codes[code] = codes.get(code, 0) + 1
        stats.buckets[bisect_left(REQUEST_BUCKETS, seconds)] += 1
        stats.sum += seconds
        if code == 429:
            stats.throttled += 1

    def polls_written(self, results: Iterable[_PollResult]) -> None:
        polls: Tally[tuple[str, str]] = Tally()
        events: Tally[tuple[str, str]] = Tally()
        snapshots: Tally[str] = Tally()
        for r in results:
            if r.deferred:  # nothing was sent (circuit open, gateway window spent): no poll
                continue
            system = r.task.system
            if r.not_found:
                polls[system, "not_found"] += 1
            elif r.error is not None:
                polls[system, "failed"] += 1
            elif r.changed:
                polls[system, "changed"] += 1
                snapshots[system] += 1
                for event in r.events:
                    events[system, str(event.kind)] += 1
            else:
                polls[system, "unchanged"] += 1
        for key, n in polls.items():
            self._child(self._polls, key, self.polls).inc(n)
        for key, n in events.items():
            self._child(self._events, key, self.events).inc(n)
        for system, n in snapshots.items():
            counter = self._snapshots.get(system) or self.snapshots.labels(system)
            counter.inc(n)

    @staticmethod
    def _child(cache: dict[tuple[str, str], _Inc], key: tuple[str, str], parent: Any) -> _Inc:
        child = cache.get(key)
        if child is None:
            child = cache[key] = parent.labels(*key)
        return child

    def action_finished(self, system: str, kind: str, outcome: str) -> None:
        self.attempts.labels(system, kind, outcome).inc()

    def cycle_ended(self, kind: str, seconds: float) -> None:
        self.cycles.labels(kind).observe(seconds)
        self.cycle_end.labels(kind).set(time.time())

    def database(self, up: bool) -> None:
        self.database_up.set(1 if up else 0)

    # -- exposition ------------------------------------------------------------------------

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The scrape body in the format the scraper asked for (OpenMetrics or text 0.0.4)."""
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class _Requests:
    """One system's upstream requests: counts by status, a histogram, 429s."""

    __slots__ = ("buckets", "codes", "sum", "throttled")

    def __init__(self) -> None:
        self.codes: dict[int | str, int] = {}
        self.buckets = [0] * (len(REQUEST_BUCKETS) + 1)  # per bucket, the last one is +Inf
        self.sum = 0.0
        self.throttled = 0


class _RequestCollector:
    def __init__(self, requests: Mapping[str, _Requests]) -> None:
        self._requests = requests

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        sent = CounterMetricFamily(
            "tasksync_upstream_requests",
            "upstream HTTP requests sent, by status (or `error`: transport failure)",
            labels=["system", "code"],
        )
        duration = HistogramMetricFamily(
            "tasksync_upstream_request_duration_seconds",
            "time from sending an upstream request to its whole answer",
            labels=["system"],
        )
        throttled = CounterMetricFamily(
            "tasksync_upstream_throttled", "HTTP 429 answers", labels=["system"]
        )
        for system, stats in list(self._requests.items()):
            for code, n in sorted(stats.codes.items(), key=lambda item: str(item[0])):
                sent.add_metric([system, str(code)], n)
            cumulative, buckets = 0, []
            for bound, n in zip((*REQUEST_BUCKETS, float("inf")), stats.buckets, strict=True):
                cumulative += n
                buckets.append((_le(bound), cumulative))
            duration.add_metric([system], buckets, sum_value=stats.sum)
            throttled.add_metric([system], stats.throttled)
        yield from (sent, duration, throttled)

    def describe(self) -> list[Any]:
        return []


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


class _ViewCollector:
    """The database-derived gauges, from the newest DatabaseView (read at scrape time)."""

    def __init__(self, recorder: Recorder) -> None:
        self._recorder = recorder

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        view = self._recorder.view
        tasks = GaugeMetricFamily(
            "tasksync_tasks",
            "tracked tasks by state (from the database)",
            labels=["system", "state"],
        )
        states = dict.fromkeys((s, st) for s in view.poll_lag for st in TASK_STATES)
        for system, state in sorted({**states, **dict.fromkeys(view.tasks)}):
            tasks.add_metric([system, state], view.tasks.get((system, state), 0))
        failing = GaugeMetricFamily(
            "tasksync_tasks_failing",
            "tracked tasks whose newest polls failed (consecutive_failures > 0)",
            labels=["system"],
        )
        lag = GaugeMetricFamily(
            "tasksync_poll_lag_seconds",
            "how long the most overdue tracked task has been due (0 when none)",
            labels=["system"],
        )
        for system in sorted(view.poll_lag):
            failing.add_metric([system], view.failing.get(system, 0))
            lag.add_metric([system], view.poll_lag[system])
        actions = GaugeMetricFamily(
            "tasksync_actions", "actions by status (from the database)", labels=["status"]
        )
        for status in ACTION_STATUSES:
            actions.add_metric([status], view.actions.get(status, 0))
        age = GaugeMetricFamily(
            "tasksync_action_queue_age_seconds",
            "how long the oldest due pending action has been due (0 when none)",
            value=view.queue_age,
        )
        yield from (tasks, failing, lag, actions, age)

    def describe(self) -> list[Any]:
        return []  # dynamic: collected at every scrape, never at registration


# -- the module-level switch ------------------------------------------------------------------

_recorder: Recorder | None = None


def enable(systems: Sequence[str] = SYSTEMS) -> Recorder:
    """Start recording (idempotent); the daemon calls it when it serves /metrics."""
    global _recorder
    if _recorder is None:
        _recorder = Recorder()
    for system in systems:
        if system not in _recorder._requests:
            _recorder._bind_system(system)  # its series exist (at 0) from the start
    return _recorder


def recorder() -> Recorder | None:
    return _recorder


def observe_request(system: str, code: int | str, seconds: float) -> None:
    """One upstream request sent: its HTTP status (or "error" for a transport failure)."""
    if _recorder is not None:
        _recorder.request(system, code, seconds)


def observe_polls(results: Iterable[_PollResult]) -> None:
    """One batch of poll results written."""
    if _recorder is not None:
        _recorder.polls_written(results)


def observe_actions(actions: Iterable[Any], finishes: Iterable[Any]) -> None:
    """The outcomes of a batch (worker.actions: the claimed actions and their `Finish`es)."""
    if _recorder is not None:
        by_id: Mapping[int, Any] = {a.id: a for a in actions}
        for finish in finishes:
            action = by_id.get(finish.action_id)
            if action is not None:
                _recorder.action_finished(action.system, action.kind, str(finish.outcome))


def observe_cycle(kind: str, started: float) -> None:
    """A cycle that began at `started` (time.monotonic()) has ended."""
    if _recorder is not None:
        _recorder.cycle_ended(kind, time.monotonic() - started)


def observe_pruned(rows: Mapping[str, int]) -> None:
    """What one prune of this process deleted, per table."""
    if _recorder is not None:
        for table, count in rows.items():
            _recorder.pruned.labels(table).inc(count)


def observe_database(up: bool) -> None:
    if _recorder is not None:
        _recorder.database(up)
