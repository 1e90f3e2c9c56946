"""What only the daemon asks of the database: the LISTEN connection that wakes the action loop,
telling a lost database from a bug, the leases this worker still holds, the queue's depth.

The first migration's trigger runs `pg_notify('tasksync_actions', '')` after every INSERT, and
every UPDATE naming `status` or `next_attempt_at`, on `actions`. It fires per *statement*, so a
claim that found nothing notifies too: the action loop treats a notification as "look again",
never as "there is work" (see worker/service.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import anyio
import sqlalchemy as sa
import sqlalchemy.exc as sa_exc
from anyio.abc import TaskStatus

from worker.model import ActionStatus
from worker.store.actions import OPEN
from worker.store.base import StoreBase
from worker.store.engine import async_url
from worker.store.schema import actions, tasks

log = logging.getLogger("worker.store.listen")

CHANNEL = "tasksync_actions"
CONNECT_TIMEOUT = 10.0
# A connection can die without a word (a NAT or firewall dropping it): a cheap query on this
# period notices, so missed notifications are caught by a reconnect rather than never.
KEEPALIVE = 30.0
MAX_RECONNECT_DELAY = 30.0
RECONNECT_PAUSE = 0.25  # after a connection that worked was lost: no tight loop if it flaps


# -- telling an outage from a bug --------------------------------------------------------------


def _asyncpg_outages() -> tuple[type[BaseException], ...]:
    from asyncpg import exceptions as pg

    # class 08 (connection exception), class 57 (admin shutdown, cannot connect now) and the
    # driver's own "the connection is closed"
    return (pg.PostgresConnectionError, pg.OperatorInterventionError, pg.InterfaceError)


# SQLSTATE classes that say "not now" rather than "wrong": connection exception, insufficient
# resources (too many connections), operator intervention (shutdown, restart, recovery),
# transaction rollback (serialization failure, deadlock: the statement may simply be retried).
_TRANSIENT_SQLSTATE_CLASSES = ("08", "53", "57", "40")


def is_outage(exc: BaseException) -> bool:
    """Whether `exc` means "the database cannot serve us now" (wait and retry) rather than a bug.

    A group counts when every exception in it does: a task group that failed on a lost
    connection raises the same error from each of its tasks.
    """
    if isinstance(exc, BaseExceptionGroup):
        return all(is_outage(e) for e in exc.exceptions)
    if isinstance(exc, sa_exc.DBAPIError):
        # OperationalError: server gone, SQLite busy; InterfaceError: connection closed. Any
        # failure to *connect* (no statement) is an outage: our SQL cannot be at fault there.
        if (
            exc.connection_invalidated
            or exc.statement is None
            or isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError)
        ):
            return True
        exc = exc.orig if exc.orig is not None else exc
    # Most PostgreSQL server errors reach us as a plain DBAPIError: their SQLSTATE tells.
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate[:2] in _TRANSIENT_SQLSTATE_CLASSES:
        return True
    return isinstance(exc, (OSError, sa_exc.TimeoutError, *_asyncpg_outages()))


def describe_outage(exc: BaseException) -> str:
    """One line for the log: the driver's message, not SQLAlchemy's paragraph."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, sa_exc.DBAPIError) and exc.orig is not None:
        exc = exc.orig
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text and text[0] else type(exc).__name__


# -- leases and queue depth ----------------------------------------------------------------------


async def leased_ids(store: StoreBase, worker: str) -> tuple[list[int], list[int]]:
    """(task ids, action ids) this worker holds leases on. Work cancelled mid-way (shutdown, a
    lost connection) leaves them behind; handing them back at once beats waiting out the lease."""
    async with store.engine.connect() as conn:
        task_ids = (
            await conn.scalars(sa.select(tasks.c.id).where(tasks.c.lease_owner == worker))
        ).all()
        action_ids = (
            await conn.scalars(
                sa.select(actions.c.id).where(
                    actions.c.lease_owner == worker, actions.c.status == ActionStatus.RUNNING
                )
            )
        ).all()
    return list(task_ids), list(action_ids)


async def queue_depth(store: StoreBase) -> dict[str, int]:
    """Open actions by status (pending, running): the daemon's STATUS line."""
    async with store.engine.connect() as conn:
        rows = (
            await conn.execute(
                sa.select(actions.c.status, sa.func.count())
                .where(actions.c.status.in_(OPEN))
                .group_by(actions.c.status)
            )
        ).all()
    return {str(status): int(count) for status, count in rows}


# -- LISTEN ------------------------------------------------------------------------------------


def listen_dsn(url: str) -> str:
    """The asyncpg DSN for a configured (SQLAlchemy-style) PostgreSQL URL."""
    return async_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class ActionListener:
    """LISTEN tasksync_actions on a dedicated asyncpg connection, reconnecting with backoff.

    Not a pooled connection: the pool hands a connection to whoever asks next, and the LISTEN
    would go with it. Each notification calls `on_notify`, and so does each change of
    `connected` (notifications sent while disconnected are lost): it tells the action loop
    whether it may rely on notifications or must poll.
    """

    def __init__(
        self,
        url: str,
        on_notify: Callable[[], None],
        channel: str = CHANNEL,
        what: str = "queued actions",
    ) -> None:
        self._dsn = listen_dsn(url)
        self._on_notify = on_notify
        # `tasksync events --follow` listens on tasksync_events with the same machinery
        self.channel, self.what = channel, what
        self.connected = False

    def _notified(self, *_args: Any) -> None:
        # asyncpg calls this on the event loop thread: (connection, pid, channel, payload)
        self._on_notify()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled. Reports started once the first attempt to connect is over,
        whether it worked or not: the daemon must start (and poll) while the database is away."""
        started = False

        def mark_started() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        failures = 0
        while True:
            try:
                await self._listen_once(mark_started)
            except Exception as exc:
                if not is_outage(exc):
                    raise
                failures += 1
                if failures == 1:
                    log.warning(
                        "LISTEN %s: %s; polling until it is back",
                        self.channel,
                        describe_outage(exc),
                    )
                delay = min(MAX_RECONNECT_DELAY, 2.0 ** min(failures - 1, 10))
            else:
                failures, delay = 0, RECONNECT_PAUSE  # it was up: reconnect (almost) at once
            mark_started()
            await anyio.sleep(delay)

    async def _listen_once(self, listening: Callable[[], None]) -> None:
        """One connection's life: returns when it was lost, raises when it could not start."""
        import asyncpg

        try:
            conn = await asyncpg.connect(
                self._dsn,
                timeout=CONNECT_TIMEOUT,
                server_settings={"application_name": "tasksync-listen"},
            )
        except Exception as exc:  # e.g. "not accepting connections" (55000): never our bug
            raise ConnectionError(describe_outage(exc)) from exc
        lost = anyio.Event()
        try:
            conn.add_termination_listener(lambda _conn: lost.set())
            await conn.add_listener(self.channel, self._notified)
            self.connected = True
            log.info("listening for %s (LISTEN %s)", self.what, self.channel)
            self._on_notify()  # whatever was queued while nobody listened
            listening()
            while not lost.is_set():
                with anyio.move_on_after(KEEPALIVE):
                    await lost.wait()
                if not lost.is_set():
                    with anyio.fail_after(CONNECT_TIMEOUT):
                        await conn.execute("SELECT 1")
            log.warning("LISTEN %s: the connection was closed; reconnecting", self.channel)
        finally:
            if self.connected:  # the action loop must learn to poll until we are back
                self.connected = False
                self._on_notify()
            conn.terminate()  # never waits on a dead peer, unlike close()
