"""Pruning, as `tasksync prune` and the daemon's schedule run it: settings in, counts out.

The counts per table are returned (not only logged) so that a metrics exporter can count rows
pruned per table without another query.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from worker.config import RetentionSettings
from worker.metrics import observe_pruned
from worker.store import RetentionPolicy, Store

log = logging.getLogger("worker.retention")


def policy_from(settings: RetentionSettings) -> RetentionPolicy:
    return RetentionPolicy(
        snapshots=settings.snapshots,
        events=settings.events,
        actions=settings.actions,
        sync_runs=settings.sync_runs,
        untracked=settings.untracked,
        batch_size=settings.batch_size,
    )


@dataclass(frozen=True, slots=True)
class PruneReport:
    rows: dict[str, int]  # per table: removed, or (dry run) would be removed
    dry_run: bool
    seconds: float
    size_before: int | None = None  # bytes, when --vacuum ran
    size_after: int | None = None


async def prune_once(
    store: Store,
    settings: RetentionSettings,
    worker: str,
    *,
    dry_run: bool = False,
    vacuum: bool = False,
    progress: Callable[[], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> PruneReport:
    started = time.monotonic()
    rows = await store.prune(
        policy_from(settings),
        worker,
        dry_run=dry_run,
        progress=progress,
        should_stop=should_stop,
    )
    before = after = None
    if vacuum and not dry_run:
        before = await store.database_size()
        await store.vacuum()
        after = await store.database_size()
    report = PruneReport(rows, dry_run, time.monotonic() - started, before, after)
    if not dry_run:
        observe_pruned(rows)
        removed = ", ".join(f"{n} {table}" for table, n in rows.items() if n) or "nothing"
        log.info("prune: removed %s in %.1fs", removed, report.seconds)
    return report
