"""`tasksync events`: history events in id order, printed once or followed as they are stored.

Following wakes on PostgreSQL's `NOTIFY tasksync_events` (the store sends one per transaction
that stored events, and hands ids out in commit order, so reading "after the last id" never
skips one) and polls on SQLite, or while the LISTEN connection is down. A notification only
means "look": the query after it decides what is new, so a lost or doubled one costs nothing.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import stat
import sys
from collections.abc import Callable, Sequence
from typing import Any

import anyio
from anyio import CancelScope
from anyio.abc import TaskStatus

from worker.store import Store
from worker.store.events import EVENTS_CHANNEL, PAGE
from worker.store.listen import ActionListener

log = logging.getLogger("worker.changes")

POLL = 1.0  # SQLite, or PostgreSQL while LISTEN is down: well within the 2 s promised
SAFETY_POLL = 15.0  # with LISTEN up, look anyway this often

Emit = Callable[[list[dict[str, Any]]], None]


async def stream_events(
    store: Store,
    url: str,
    *,
    since: int | None,
    follow: bool,
    systems: Sequence[str],
    kinds: Sequence[str],
    emit: Emit,
) -> bool:
    """Print what was asked. Returns False when the reader went away (a closed pipe)."""
    if not follow:
        await _backlog(store, since, systems, kinds, emit)
        return True
    wake = anyio.Event()

    def notified() -> None:
        wake.set()

    async with anyio.create_task_group() as tg:
        await tg.start(_stop_on_signal, tg.cancel_scope)
        listener: ActionListener | None = None
        if store.is_postgres:
            listener = ActionListener(url, notified, channel=EVENTS_CHANNEL, what="new events")
            # before the backlog is read: an event stored in between wakes us, not lost
            await tg.start(listener.run)
        try:
            cursor = await _backlog(store, since, systems, kinds, emit)
            log.info("following events after id %d", cursor)
            looked = anyio.current_time()
            # wake every POLL seconds at least: to poll, and to notice a reader that went away
            while not _reader_gone():
                with anyio.move_on_after(POLL):
                    await wake.wait()
                listening = listener is not None and listener.connected
                now = anyio.current_time()
                if wake.is_set() or not listening or now - looked >= SAFETY_POLL:
                    wake, looked = anyio.Event(), now
                    cursor = await _after(store, cursor, systems, kinds, emit)
        except BrokenPipeError:
            pass
        tg.cancel_scope.cancel()  # not reached on a signal: that cancels the scope itself
        return False
    return True  # a signal ended it


async def _backlog(
    store: Store, since: int | None, systems: Sequence[str], kinds: Sequence[str], emit: Emit
) -> int:
    if since is None:
        events, high = await store.latest_events(systems=systems, kinds=kinds)
        emit(events)
        return high
    return await _after(store, since, systems, kinds, emit)


async def _after(
    store: Store, cursor: int, systems: Sequence[str], kinds: Sequence[str], emit: Emit
) -> int:
    """Everything after `cursor`, page by page; the new cursor."""
    while True:
        events = await store.events_after(cursor, systems=systems, kinds=kinds)
        if events:
            emit(events)
            cursor = int(events[-1]["id"])
        if len(events) < PAGE:
            return cursor


async def _stop_on_signal(
    scope: CancelScope, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for _signum in signals:
            scope.cancel()
            return


def _reader_gone() -> bool:
    """Whether stdout is a pipe or socket nobody reads any more (POLLERR/POLLHUP on the write
    end), so a quiet `--follow | head -3` ends without waiting for the next event to fail."""
    try:
        fd = sys.stdout.fileno()
        mode = os.fstat(fd).st_mode
    except (OSError, ValueError):
        return False
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
        return False
    poller = select.poll()
    poller.register(fd, select.POLLERR | select.POLLHUP)
    return any(ev & (select.POLLERR | select.POLLHUP) for _fd, ev in poller.poll(0))
