"""Small upstreams written in a test: serve an aiohttp.web app on a loopback port."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import orjson
from aiohttp import web


@asynccontextmanager
async def serve(app: web.Application, *, handler_cancellation: bool = False) -> AsyncIterator[str]:
    """The app on 127.0.0.1 at a free port; yields its base URL.

    `handler_cancellation` stops a handler when its client goes away (for answers trickled
    forever). Shutdown waits at most 0.2 s for handlers still running: the test is over.
    """
    runner = web.AppRunner(
        app, access_log=None, shutdown_timeout=0.2, handler_cancellation=handler_cancellation
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def json_response(
    body: object, status: int = 200, content_type: str = "application/json", **headers: str
) -> web.Response:
    """A JSON answer: an object is encoded, bytes are sent as they are (hostile bodies)."""
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    return web.Response(status=status, body=data, headers={"Content-Type": content_type, **headers})
