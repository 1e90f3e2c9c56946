"""A lean HTTP/1.1 client for the upstream calls: kept-alive connections for reads, a new
connection for every write, and no request ever sent twice by this layer.

Why by hand and not aiohttp's client (which the first releases used):

- Cost. aiohttp's client spends about 75 µs of CPU per request on a 2-core machine (request
  and response objects, multidicts, URL objects, timers, traces, stream readers), as much as
  all the rest of a poll put together; this module spends a fraction of that (bench/README.md
  has the side-by-side figures). A cycle of 18,000 polls is CPU-bound on that.
- Exactly once. aiohttp re-sends a PUT by itself after a dropped connection, on a fresh
  connection too (docs/upstream.md, "traps"), which took a per-request middleware and a trace
  hook to refuse. Here a write goes out on its own new connection and nothing ever re-sends
  it: whether its bytes left is known exactly (`TransportError.sent`).

Parsing is httptools' (llhttp, the parser of Node.js and uvicorn): strict, in C, and framing
(Content-Length, chunked) is its job. What is here: connections and their reuse, the request's
bytes, the deadline, the body cap, and turning every way a connection can fail into one of a
few errors that `http.py` classifies.
"""

from __future__ import annotations

import asyncio
import ssl
import zlib
from collections import deque
from collections.abc import Iterable
from types import TracebackType
from typing import NamedTuple

import httptools

USER_AGENT = "tasksync"
NO_BODY_STATUSES = frozenset({204, 304})
MAX_HEAD_BYTES = 65_536  # of header names and values in one answer (aiohttp allows 8 KiB a line)
# Content codings we ask for and undo, with their zlib window bits (aiohttp asked for the same).
CODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
ACCEPT_ENCODING = "gzip, deflate"
USER_AGENT_LINE = f"User-Agent: {USER_AGENT}"
ACCEPT_ENCODING_LINE = f"Accept-Encoding: {ACCEPT_ENCODING}"
# Deadlines are checked by one timer per pool, every twentieth of the time limit (at most every
# second), while requests are out: a request times out at most 5 % late. A timer per request
# (pushed on the event loop's heap, cancelled again, left there until its time came) was ~3 %
# of a poll cycle's CPU.
TICKS_PER_LIMIT = 20
MAX_TICK = 1.0


class TransportError(Exception):
    """The exchange failed before a whole answer head arrived. `sent`: the request's bytes
    were handed to the connection (a write may have been applied)."""

    def __init__(self, message: str, *, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent


class ConnectError(TransportError):
    """No connection (refused, DNS, connect timeout, TLS handshake): nothing was sent."""

    def __init__(self, message: str, *, certificate: bool = False) -> None:
        super().__init__(message, sent=False)
        self.certificate = certificate


class Slots:
    """A counting semaphore, first come first served, whose acquire costs O(1).

    Not asyncio.Semaphore: on Python 3.11 its acquire calls `locked()`, which walks every
    waiter, and the shared in-flight limit has one waiter per idle fetcher (three systems ×
    `concurrency`): that walk was 5 % of a sync cycle's CPU. A released slot is handed to the
    first waiter directly, so a newcomer never overtakes it.
    """

    def __init__(self, count: int) -> None:
        self._free = count
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def __aenter__(self) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # handed a slot as the cancellation came: pass it on
            raise  # (a cancelled waiter left in the deque is skipped by _release)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._release()

    def _release(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1


class Headers(dict[str, str]):
    """Answer headers, looked up without regard to case (stored lower-case; the first value of
    a repeated header wins, as a lookup in aiohttp's multidict does)."""

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return super().get(name.lower(), default)

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and super().__contains__(name.lower())


class Response(NamedTuple):
    status: int
    headers: Headers
    body: bytes
    problem: str | None  # the body could not be read whole (too large, cut off, timed out)


class Origin(NamedTuple):
    scheme: str
    host: str
    port: int

    @property
    def netloc(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


def split_url(url: str) -> tuple[Origin, str]:
    """'https://h:8443/a/b?c' -> (Origin('https', 'h', 8443), '/a/b?c'). The URL is sent as it
    is written: it must already be percent-encoded (http.py builds it so)."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("http", "https"):
        raise ValueError(f"not an http(s) URL: {url[:80]!r}")
    slash = rest.find("/")
    netloc, target = (rest, "/") if slash < 0 else (rest[:slash], rest[slash:])
    netloc = netloc.rpartition("@")[2]  # userinfo is never sent
    host, port_text = netloc, ""
    if netloc.startswith("["):
        end = netloc.find("]")
        host, port_text = netloc[1:end], netloc[end + 1 :].removeprefix(":")
    elif ":" in netloc:
        host, _, port_text = netloc.rpartition(":")
    if not host:
        raise ValueError(f"URL has no host: {url[:80]!r}")
    port = int(port_text) if port_text else (443 if scheme == "https" else 80)
    return Origin(scheme, host.lower(), port), target


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection: one exchange at a time, the answer parsed as it arrives."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.uses = 0
        self.deadline = 0.0  # loop time by which the current exchange must be complete
        self.time_limit = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._cap = 0
        self._status = 0
        self._headers = Headers()
        self._chunks: list[bytes] = []
        self._size = 0
        self._head_bytes = 0
        self._length: int | None = None
        self._inflater: zlib._Decompress | None = None  # a compressed answer, undone as it comes
        self._framed = True  # the end of the body is known from its framing, not from EOF
        self._head_done = False
        self._done = False
        self._keep_alive = False
        self._problem: str | None = None
        self._error: TransportError | None = None
        self._received = False
        # lost before a byte of the answer came: on a kept-alive connection, the server had
        # closed it while it was idle
        self.silent = False

    # -- one exchange ----------------------------------------------------------------------------

    def send(self, data: bytes, cap: int) -> asyncio.Future[None]:
        assert self.transport is not None and self._waiter is None
        self.uses += 1
        self._cap = cap
        self._status = 0
        self._headers = Headers()
        self._chunks = []
        self._size = self._head_bytes = 0
        self._length = None
        self._inflater = None
        self._framed = True
        self._head_done = self._done = self._keep_alive = False
        self._problem = None
        self._error = None
        self._received = self.silent = False
        self._waiter = waiter = self.loop.create_future()
        self.transport.write(data)
        return waiter

    def result(self) -> Response:
        if self._error is not None:
            raise self._error
        return Response(self._status, self._headers, b"".join(self._chunks), self._problem)

    @property
    def reusable(self) -> bool:
        return (
            not self.closed
            and self._done
            and self._problem is None
            and self._error is None
            and self._keep_alive
        )

    def time_out(self, seconds: float) -> None:
        if self._head_done:
            self._finish(problem=f"no complete answer within {seconds:g}s")
        else:
            self._finish(error=TransportError(f"no answer within {seconds:g}s", sent=True))
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _finish(self, *, problem: str | None = None, error: TransportError | None = None) -> None:
        waiter = self._waiter
        if waiter is None:
            return
        self._waiter = None
        self._problem, self._error = problem, error
        if problem is not None or error is not None:
            self.closed = True  # the stream is in an unknown state: never reuse it
        if not waiter.done():
            waiter.set_result(None)

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self._received = True
        if self._waiter is None:
            self.close()  # bytes nobody asked for: this connection cannot be trusted any more
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self._head_done:
                self._finish(problem=f"answer cut off: malformed body framing ({exc})")
            else:
                self._finish(error=TransportError(f"answer is not HTTP/1.1: {exc}", sent=True))
            self.close()

    def eof_received(self) -> bool:
        self._lost(None)
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._lost(exc)

    def _lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is None:
            return
        if self._head_done:
            if not self._framed:
                self._done = True  # a body delimited by the end of the connection: complete
                self._finish()
                return
            of = f" of {self._length}" if self._length is not None else ""
            if exc is None:
                self._finish(problem=f"answer cut off after {self._size}{of} bytes")
            else:
                self._finish(problem=f"connection lost after {self._size}{of} bytes of the answer")
            return
        self.silent = not self._received
        if exc is None:
            message = "server closed the connection without answering"
        else:
            message = f"connection lost: {type(exc).__name__}: {exc}"
        self._finish(error=TransportError(message, sent=True))

    # -- httptools callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._waiter is None:
            self.close()  # an answer nobody asked for: this connection cannot be trusted

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value)
        if self._head_bytes > MAX_HEAD_BYTES:
            if self._waiter is not None:
                message = f"answer headers exceed {MAX_HEAD_BYTES} bytes"
                self._finish(error=TransportError(message, sent=True))
                self.close()
            return
        key = name.decode("latin-1").lower()
        if key not in self._headers:
            dict.__setitem__(self._headers, key, value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            return  # an interim answer (100 Continue): the real one follows
        self._status = status
        self._head_done = True
        headers = self._headers
        length = headers.get("content-length")
        if length is not None and length.isdigit():
            self._length = int(length)
            if self._length > self._cap:
                self._finish(
                    problem=f"answer of {self._length} bytes exceeds the {self._cap}-byte limit"
                )
                self.close()
        elif "transfer-encoding" not in headers and status not in NO_BODY_STATUSES:
            self._framed = False
        coding = headers.get("content-encoding")
        if coding is not None and coding.strip().lower() in CODINGS:
            self._inflater = zlib.decompressobj(CODINGS[coding.strip().lower()])

    def on_body(self, body: bytes) -> None:
        if self._waiter is None:
            return
        if self._inflater is not None:
            # the cap holds for what the answer inflates to: a small gzip bomb stops here
            try:
                body = self._inflater.decompress(body, self._cap - self._size + 1)
            except zlib.error as exc:
                self._finish(problem=f"answer's content coding is broken: {exc}")
                self.close()
                return
        self._size += len(body)
        if self._size > self._cap:
            self._finish(problem=f"answer exceeds the {self._cap}-byte limit")
            self.close()
            return
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        if not self._head_done:
            self._headers = Headers()  # the interim answer's headers are not the answer's
            return
        inflater = self._inflater
        if inflater is not None and self._waiter is not None:
            self._inflater = None  # what is left comes through on_body as it is
            self.on_body(inflater.flush())
            if self._waiter is None:
                return  # the rest of it broke the cap
        self._done = True
        # asked here: once feed_data returns, the parser has reset for the next message
        self._keep_alive = self.parser.should_keep_alive()
        self._finish()


class Pool:
    """Connections to one origin. `keep_alive=False`: a new connection per request, closed after
    its answer (writes)."""

    def __init__(
        self,
        origin: Origin,
        *,
        limit: int,
        connect_timeout: float,
        ssl_context: ssl.SSLContext | None,
        keep_alive: bool,
    ) -> None:
        self.origin = origin
        self.keep_alive = keep_alive
        self._host_line = f"Host: {origin.netloc}"
        self._connect_timeout = connect_timeout
        self._ssl = ssl_context if origin.scheme == "https" else None
        self._slots = Slots(limit)
        self._idle: list[_Connection] = []
        self._busy: set[_Connection] = set()
        self._closed = False
        self._sweeper: asyncio.TimerHandle | None = None
        self._tick = MAX_TICK

    async def request(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: bytes | None,
        *,
        time_limit: float,
        cap: int,
    ) -> Response:
        """Send once and read the answer. A read that fails on a kept-alive connection before any
        byte of its answer came (the server closed an idle connection as we reused it) goes
        once more on a new connection; a write never goes twice."""
        data = self._encode(method, target, headers, body)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + time_limit
        async with self._slots:
            while True:
                conn = self._take_idle()
                reused = conn is not None
                if conn is None:
                    conn = await self._connect(loop, deadline)
                self._busy.add(conn)
                try:
                    waiter = conn.send(data, cap)
                    conn.deadline, conn.time_limit = deadline, time_limit
                    self._watch(loop, time_limit)
                    await waiter
                    try:
                        return conn.result()
                    except TransportError:
                        if reused and conn.silent:
                            # a stale kept-alive connection: the others idle as long are
                            # likely closed too; once more, on a new one
                            self._drop_idle()
                            continue
                        raise
                except BaseException:
                    conn.close()
                    raise
                finally:
                    self._busy.discard(conn)
                    if self.keep_alive and not self._closed and conn.reusable:
                        self._idle.append(conn)
                    else:
                        conn.close()

    def _watch(self, loop: asyncio.AbstractEventLoop, time_limit: float) -> None:
        """Make sure the busy connections' deadlines are checked (see TICKS_PER_LIMIT)."""
        tick = min(MAX_TICK, time_limit / TICKS_PER_LIMIT)
        if tick < self._tick:
            self._tick = tick
            if self._sweeper is not None:
                self._sweeper.cancel()
                self._sweeper = None
        if self._sweeper is None:
            self._sweeper = loop.call_later(self._tick, self._sweep, loop)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        self._sweeper = None
        now = loop.time()
        for conn in [c for c in self._busy if c.deadline <= now]:
            conn.time_out(conn.time_limit)
        if self._busy:
            self._sweeper = loop.call_later(self._tick, self._sweep, loop)

    def _drop_idle(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()

    def _take_idle(self) -> _Connection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    async def _connect(self, loop: asyncio.AbstractEventLoop, deadline: float) -> _Connection:
        origin = self.origin
        seconds = min(self._connect_timeout, max(deadline - loop.time(), 0.0))
        try:
            async with asyncio.timeout(seconds):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop),
                    origin.host,
                    origin.port,
                    ssl=self._ssl,
                    server_hostname=origin.host if self._ssl is not None else None,
                )
        except TimeoutError:
            raise ConnectError(f"connect timed out after {seconds:g}s") from None
        except ssl.SSLCertVerificationError as exc:
            raise ConnectError(f"{exc.verify_message or exc.reason}", certificate=True) from None
        except (OSError, ssl.SSLError) as exc:
            raise ConnectError(f"{origin.host}:{origin.port}: {_os_reason(exc)}") from None
        return conn

    def _encode(
        self, method: str, target: str, headers: Iterable[tuple[str, str]], body: bytes | None
    ) -> bytes:
        lines = [f"{method} {target} HTTP/1.1"]
        names = set()
        for name, value in headers:
            lines.append(f"{name}: {value}")
            names.add(name.lower())
        if "host" not in names:
            lines.append(self._host_line)
        if "user-agent" not in names:
            lines.append(USER_AGENT_LINE)
        if "accept-encoding" not in names:
            lines.append(ACCEPT_ENCODING_LINE)
        if body:
            lines.append(f"Content-Length: {len(body)}")
        elif method in ("POST", "PUT", "PATCH"):
            lines.append("Content-Length: 0")
        if not self.keep_alive:
            lines.append("Connection: close")
        lines.append("\r\n")
        head = "\r\n".join(lines)
        breaks = len(lines)  # one CRLF between lines, two at the end
        if head.count("\n") != breaks or head.count("\r") != breaks:
            raise ValueError("a header or the target holds a line break")
        data = head.encode("latin-1")  # UnicodeEncodeError is a ValueError
        return data + body if body else data

    async def aclose(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in (*self._idle, *self._busy):
            conn.close()
        self._idle.clear()


def _os_reason(exc: BaseException) -> str:
    return exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)
