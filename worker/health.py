"""Health checks: `tasksync healthcheck` runs them all; `/readyz` runs the database one.

Each check is a name and either `ok` or the reason it failed, judged from the database alone,
so it needs no running daemon (cron, monitoring agents, container probes):

    database   the database answers and its schema is at the newest revision
    sync       a sync cycle finished within 3 x the sync schedule's interval
    systems    no configured system whose every poll failed in the newest cycle that polled it
    poll lag   tasksync_poll_lag_seconds below 3 x poll_interval, for every system
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

import anyio

from worker.config import Schedule, Settings
from worker.store.base import StoreBase, utcnow

DATABASE_TIMEOUT = 5.0  # a probe must answer: a database that hangs is as unready as a dead one
FACTOR = 3  # "within 3 x the interval"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str  # "ok", or the reason

    def line(self) -> str:
        return f"{self.name}: {self.detail}"

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _outage(exc: BaseException) -> str:
    from worker.store.listen import describe_outage

    return describe_outage(exc)


async def check_database(store: StoreBase) -> Check:
    """Reachable within DATABASE_TIMEOUT and at the newest schema revision."""
    from worker.store.engine import sqlite_path
    from worker.store.health import schema_revision
    from worker.store.migrate import HEAD_REVISION

    path = sqlite_path(store.engine.url)
    if path is not None and not path.exists():  # connecting would create an empty one
        return Check("database", False, f"no database file {path}: run `tasksync migrate`")
    try:
        with anyio.fail_after(DATABASE_TIMEOUT):
            revision = await schema_revision(store)
    except TimeoutError:
        return Check("database", False, f"no answer within {DATABASE_TIMEOUT:g}s")
    except Exception as exc:
        return Check("database", False, f"unreachable: {_outage(exc)}")
    if revision is None:
        return Check("database", False, "not migrated: run `tasksync migrate`")
    if revision != HEAD_REVISION:
        return Check(
            "database",
            False,
            f"schema at revision {revision}, not {HEAD_REVISION}: run `tasksync migrate`",
        )
    return Check("database", True, "ok")


def schedule_interval(schedule: Schedule, now: datetime | None = None) -> float:
    """Seconds between two runs: the interval, or for a cron expression the gap between its
    next two fire times (exact for regular expressions such as "*/5 * * * *")."""
    if schedule.interval is not None:
        return schedule.interval
    from apscheduler.triggers.cron import CronTrigger

    trigger = CronTrigger.from_crontab(schedule.cron, timezone="UTC")
    now = now or utcnow()
    first = trigger.get_next_fire_time(None, now)
    second = trigger.get_next_fire_time(first, first + timedelta(seconds=1))
    if first is None or second is None:
        return float("inf")
    return float((second - first).total_seconds())


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def configured_systems(settings: Settings) -> list[str]:
    return [s for s in ("aicc", "secmaster", "koodrive") if getattr(settings.systems, s)]


async def run_checks(store: StoreBase, settings: Settings) -> list[Check]:
    """Every check, in order. When the database check fails the others cannot be judged."""
    database = await check_database(store)
    if database.ok:
        try:
            with anyio.fail_after(4 * DATABASE_TIMEOUT):
                return [database, *await _judge(store, settings)]
        except Exception as exc:  # lost between two queries: as unavailable as before them
            detail = "no answer in time" if isinstance(exc, TimeoutError) else _outage(exc)
            database = Check("database", False, f"unreachable: {detail}")
    skipped = "not checked: the database is unavailable"
    return [database, *(Check(n, False, skipped) for n in ("sync", "systems", "poll lag"))]


async def _judge(store: StoreBase, settings: Settings) -> list[Check]:
    from worker.store.health import database_view, last_cycle_end, newest_cycle_polls

    now = utcnow()
    systems = configured_systems(settings)
    checks: list[Check] = []

    interval = schedule_interval(settings.worker.sync_schedule, now)
    ended = await last_cycle_end(store)
    limit = FACTOR * interval
    if ended is None:
        checks.append(Check("sync", False, "no sync cycle has finished yet"))
    elif (now - ended).total_seconds() > limit:
        checks.append(
            Check(
                "sync",
                False,
                f"the newest sync cycle finished {_ago((now - ended).total_seconds())} ago, "
                f"over {FACTOR} x the schedule's {_ago(interval)}",
            )
        )
    else:
        checks.append(Check("sync", True, "ok"))

    broken = [
        c for c in await newest_cycle_polls(store, systems) if c.polled and c.failed == c.polled
    ]
    if broken:
        reasons = [
            f"{c.system}: all {c.polled} polls of its newest cycle failed"
            + (f" ({c.last_error[:160]})" if c.last_error else "")
            for c in broken
        ]
        checks.append(Check("systems", False, "; ".join(reasons)))
    else:
        checks.append(Check("systems", True, "ok"))

    view = await database_view(store, systems, now)
    lag_limit = FACTOR * settings.worker.poll_interval
    late = {s: lag for s, lag in sorted(view.poll_lag.items()) if lag >= lag_limit}
    if late:
        listed = ", ".join(f"{s} {_ago(lag)}" for s, lag in late.items())
        checks.append(
            Check(
                "poll lag",
                False,
                f"tasks overdue: {listed} (limit {FACTOR} x poll_interval = {_ago(lag_limit)})",
            )
        )
    else:
        checks.append(Check("poll lag", True, "ok"))
    return checks


def healthy(checks: Sequence[Check]) -> bool:
    return all(c.ok for c in checks)
