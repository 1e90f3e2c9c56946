"""A raw HTTP/1.1 server on asyncio streams, for tests that need what no well-behaved framework
would do: drop the connection after reading a request, cut a body short, stall, send a body
larger than it announced, or count the connections a client opens."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson


@dataclass
class Req:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]


@dataclass
class Reply:
    data: bytes | None  # None: close the connection without answering
    delay: float = 0.0
    close: bool = False


Handler = Callable[[Req], Awaitable[Reply]]


def http(
    status: int,
    body: bytes = b"",
    *,
    content_type: str | None = "application/json",
    headers: dict[str, str] | None = None,
    length: int | None = None,
    chunked: bool = False,
) -> bytes:
    lines = [f"HTTP/1.1 {status} X"]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        payload = b"".join(
            b"%x\r\n%s\r\n" % (len(part), part)
            for part in (body[i : i + 1000] for i in range(0, len(body), 1000))
        )
        payload += b"0\r\n\r\n"
    else:
        lines.append(f"Content-Length: {len(body) if length is None else length}")
        payload = body
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


def json_reply(status: int, obj: Any, **kwargs: Any) -> Reply:
    return Reply(http(status, orjson.dumps(obj), **kwargs))


class RawServer:
    """Reads requests on keep-alive connections and answers what `handler` says."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[Req] = []
        self.connections = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self.url = ""

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._server.wait_closed()

    def count(self, method: str) -> int:
        return sum(1 for r in self.requests if r.method == method)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                method, target, _ = request_line.split(" ", 2)
                headers = {}
                for line in header_lines:
                    if line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                request = Req(method, target, headers, body)
                self.requests.append(request)
                reply = await self.handler(request)
                if reply.delay:
                    await asyncio.sleep(reply.delay)
                if reply.data is None:
                    break
                writer.write(reply.data)
                await writer.drain()
                if reply.close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:
            # Cancelled by __aexit__ (a stalled reply): end quietly, as asyncio's stream
            # callback logs an error for a connection task that ends cancelled.
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
