"""The `[metrics] listen` HTTP endpoint of `tasksync run`, served on the daemon's own event loop
(aiohttp.web, started as one more loop of its task group: no thread, no process):

    GET /metrics   Prometheus text format, or OpenMetrics when the scraper's Accept asks for it
    GET /livez     200 while every loop shows progress (the watchdog's judgement), else 503
    GET /readyz    200 when the database answers at the newest schema and the daemon is not
                   stopping, else 503; `?verbose` lists each check

A database outage makes the daemon unready, never dead: /livez judges the loops only (they wait
an outage out, beating as they back off).

The socket is bound before the daemon starts anything (`bind`), so an address in use is a
one-line start-up error rather than a loop failing later.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import anyio
from aiohttp import web
from anyio.abc import TaskStatus

from worker.config import split_listen
from worker.health import Check, check_database
from worker.metrics import Recorder
from worker.notify import Liveness
from worker.store.base import StoreBase

log = logging.getLogger("worker.observe")

VIEW_CACHE = 5.0  # seconds a scrape reuses the database-derived gauges
VIEW_TIMEOUT = 5.0  # a scrape must answer even when the database does not
CLEANUP_BUDGET = 2.0


class ListenError(Exception):
    """`metrics.listen` cannot be bound (in use, not an address of this host): exit 1."""


def bind(listen: str) -> socket.socket:
    """A listening TCP socket for `listen` (port 0: a free one, see the log line)."""
    host, port = split_listen(listen)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"metrics.listen: cannot resolve {host!r}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        # as aiohttp does: a restarted daemon may rebind while old connections linger
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ListenError(
            f"metrics.listen: cannot listen on {listen}: {(exc.strerror or str(exc)).lower()}"
        ) from None
    sock.setblocking(False)
    return sock


@dataclass
class Probe:
    """What the endpoints read of the daemon (worker/service.py fills it)."""

    store: StoreBase
    liveness: Liveness
    max_silence: float
    systems: Sequence[str]
    stopping: Callable[[], bool]


class Endpoint:
    def __init__(self, probe: Probe, recorder: Recorder) -> None:
        self.probe = probe
        self.recorder = recorder
        self._view_lock = anyio.Lock()

    async def refresh_view(self) -> None:
        """Re-read the database-derived gauges unless the cached ones are fresh enough."""
        async with self._view_lock:  # concurrent scrapes share one read
            read_at = self.recorder.view.read_at
            if read_at is not None and time.monotonic() - read_at < VIEW_CACHE:
                return
            from worker.store.health import database_view

            try:
                with anyio.fail_after(VIEW_TIMEOUT):
                    view = await database_view(self.probe.store, self.probe.systems)
            except Exception as exc:
                # the outage shows as tasksync_database_up 0; the gauges keep their last values
                log.debug("metrics: database view not read: %s", exc)
                self.recorder.database(False)
                self.recorder.view.read_at = time.monotonic()  # no retry storm per scrape
                return
            view.read_at = time.monotonic()
            self.recorder.view = view
            self.recorder.database(True)

    async def readiness(self) -> list[Check]:
        database = await check_database(self.probe.store)
        self.recorder.database(database.ok)
        stopping = self.probe.stopping()
        return [
            database,
            Check(
                "shutdown", not stopping, "stopping: finishing in-flight work" if stopping else "ok"
            ),
        ]

    def liveness(self) -> list[str]:
        return self.probe.liveness.stale(time.monotonic(), self.probe.max_silence)


def make_app(endpoint: Endpoint) -> web.Application:
    async def metrics(request: web.Request) -> web.Response:
        await endpoint.refresh_view()
        body, content_type = endpoint.recorder.exposition(request.headers.get("Accept"))
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type  # carries its own version/charset
        return response

    async def livez(request: web.Request) -> web.Response:
        stale = endpoint.liveness()
        if stale:
            reason = f"no progress for over {endpoint.probe.max_silence:g}s from {', '.join(stale)}"
            return web.Response(status=503, text=reason + "\n")
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        checks = await endpoint.readiness()
        ready = all(c.ok for c in checks)
        if "verbose" in request.query:
            lines = [f"[{'+' if c.ok else '-'}] {c.name}: {c.detail}" for c in checks]
            lines.append("ready" if ready else "not ready")
            text = "\n".join(lines)
        else:
            text = "ok" if ready else "; ".join(c.line() for c in checks if not c.ok)
        return web.Response(status=200 if ready else 503, text=text + "\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    return app


async def serve(
    sock: socket.socket,
    endpoint: Endpoint,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve on `sock` until cancelled (the daemon's task group is, at the very end)."""
    runner = web.AppRunner(
        make_app(endpoint), access_log=None, handle_signals=False, shutdown_timeout=1.0
    )
    await runner.setup()
    try:
        site = web.SockSite(runner, sock)
        await site.start()
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        log.info("metrics: serving /metrics, /livez, /readyz on http://%s:%d", shown, port)
        task_status.started()
        await anyio.sleep_forever()
    finally:
        with anyio.move_on_after(CLEANUP_BUDGET, shield=True):
            await runner.cleanup()
