"""The upstream HTTP transport (worker/upstreams/transport.py) over real sockets: connection
reuse, a stale kept-alive connection, writes on their own connection, framing (length, chunked,
until close, interim answers), content codings and the cap, and the in-flight slots.

How each failure is classified for the three clients is tests/test_upstreams_faults.py's job."""

from __future__ import annotations

import asyncio
import gzip
import socket

import anyio
import pytest

from tests.support.rawhttp import Handler, RawServer, Reply, Req, http
from worker.upstreams.transport import (
    ConnectError,
    Pool,
    Response,
    Slots,
    TransportError,
    split_url,
)

pytestmark = pytest.mark.anyio


def pool(url: str, *, keep_alive: bool = True, limit: int = 8) -> Pool:
    origin, _ = split_url(url)
    return Pool(origin, limit=limit, connect_timeout=2, ssl_context=None, keep_alive=keep_alive)


async def get(
    p: Pool, target: str = "/t", *, cap: int = 1_000_000, method: str = "GET"
) -> Response:
    body = b"{}" if method != "GET" else None
    return await p.request(
        method, target, [("Accept", "application/json")], body, time_limit=2, cap=cap
    )


def replying(*replies: Reply) -> Handler:
    """Answer with each reply in turn, then the last one for ever."""
    queue = list(replies)

    async def handler(request: Req) -> Reply:
        return queue.pop(0) if len(queue) > 1 else queue[0]

    return handler


async def test_reads_reuse_one_connection() -> None:
    async with RawServer(replying(Reply(http(200, b'{"a": 1}')))) as server:
        p = pool(server.url)
        try:
            for _ in range(20):
                answer = await get(p)
                assert (answer.status, answer.body, answer.problem) == (200, b'{"a": 1}', None)
        finally:
            await p.aclose()
    assert server.connections == 1
    head = server.requests[0]
    assert head.headers["host"] == server.url.removeprefix("http://")
    assert "connection" not in head.headers


async def test_concurrent_reads_open_at_most_the_limit() -> None:
    async def slow(request: Req) -> Reply:
        return Reply(http(200, b"{}"), delay=0.05)

    async with RawServer(slow) as server:
        p = pool(server.url, limit=3)
        try:
            await asyncio.gather(*(get(p) for _ in range(12)))
        finally:
            await p.aclose()
    assert server.connections == 3
    assert len(server.requests) == 12


async def test_a_read_on_a_connection_the_server_closed_goes_again_on_a_new_one() -> None:
    # The first answer closes the connection after it (the server's idle timeout, as seen by
    # the client: the next request on it finds it gone before any answer).
    async def handler(request: Req) -> Reply:
        return Reply(http(200, b"{}"), close=len(server.requests) == 1)

    async with RawServer(handler) as server:
        p = pool(server.url)
        try:
            await get(p)
            await anyio.sleep(0.05)  # the close reaches the client while the connection idles
            answer = await get(p)
        finally:
            await p.aclose()
    assert answer.status == 200
    assert server.connections == 2
    assert len(server.requests) == 2


async def test_a_read_dropped_unanswered_on_a_reused_connection_goes_once_more() -> None:
    # The server closes the kept-alive connection just as the second request arrives (its idle
    # timeout racing our reuse): a read goes once more, on a new connection.
    async with RawServer(
        replying(Reply(http(200, b"{}")), Reply(None), Reply(http(200, b"{}")))
    ) as server:
        p = pool(server.url)
        try:
            await get(p)
            answer = await get(p)
        finally:
            await p.aclose()
    assert answer.status == 200
    assert (server.connections, len(server.requests)) == (2, 3)


async def test_a_read_dropped_on_a_fresh_connection_is_not_sent_again() -> None:
    async with RawServer(replying(Reply(None))) as server:
        p = pool(server.url)
        try:
            with pytest.raises(TransportError) as info:
                await get(p)
        finally:
            await p.aclose()
    assert info.value.sent
    assert "without answering" in str(info.value)
    assert len(server.requests) == 1


async def test_a_write_goes_on_its_own_connection_and_is_never_sent_twice() -> None:
    async with RawServer(replying(Reply(http(200, b"{}")), Reply(None))) as server:
        p = pool(server.url, keep_alive=False)
        try:
            assert (await get(p, method="PUT")).status == 200
            with pytest.raises(TransportError) as info:
                await get(p, method="PUT")  # dropped after the server read it
        finally:
            await p.aclose()
    assert info.value.sent
    assert server.connections == 2
    assert server.count("PUT") == 2  # once each: the dropped one was not re-sent
    assert all(r.headers["connection"] == "close" for r in server.requests)
    assert server.requests[0].headers["content-length"] == "2"


async def test_nothing_listening_is_a_connect_error_with_nothing_sent() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = pool(f"http://127.0.0.1:{port}")  # nothing listens there any more
    try:
        with pytest.raises(ConnectError) as info:
            await get(p)
    finally:
        await p.aclose()
    assert not info.value.sent


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(http(200, b'{"ok": true}' * 300, chunked=True), id="chunked"),
        pytest.param(
            b"HTTP/1.1 100 Continue\r\n\r\n" + http(200, b'{"ok": true}' * 300), id="interim-100"
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + b'{"ok": true}' * 300,
            id="until-close",
        ),
        pytest.param(
            http(200, gzip.compress(b'{"ok": true}' * 300), headers={"Content-Encoding": "gzip"}),
            id="gzip",
        ),
    ],
)
async def test_framings_and_codings_give_the_whole_body(raw: bytes) -> None:
    async with RawServer(replying(Reply(raw, close=True))) as server:
        p = pool(server.url)
        try:
            answer = await get(p)
        finally:
            await p.aclose()
    assert (answer.status, answer.problem) == (200, None)
    assert answer.body == b'{"ok": true}' * 300
    assert answer.headers.get("CONTENT-TYPE") == "application/json"


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (http(200, b"x" * 5000), "answer of 5000 bytes exceeds the 1000-byte limit"),
        (http(200, b"x" * 5000, chunked=True), "answer exceeds the 1000-byte limit"),
        (
            http(200, gzip.compress(b"x" * 50_000), headers={"Content-Encoding": "gzip"}),
            "answer exceeds the 1000-byte limit",
        ),
        (http(200, b"x" * 10, length=500), "answer cut off after 10 of 500 bytes"),
    ],
)
async def test_body_problems_keep_the_status(raw: bytes, problem: str) -> None:
    async with RawServer(replying(Reply(raw, close=True))) as server:
        p = pool(server.url)
        try:
            answer = await get(p, cap=1000)
            assert (answer.status, answer.problem) == (200, problem)
            assert (await get(p, cap=1000)).problem == problem  # the broken one was not reused
        finally:
            await p.aclose()
    assert server.connections == 2


async def test_garbage_instead_of_http_is_a_transport_error() -> None:
    async with RawServer(replying(Reply(b"SSH-2.0-OpenSSH\r\n\r\n"))) as server:
        p = pool(server.url)
        try:
            with pytest.raises(TransportError, match="not HTTP"):
                await get(p)
        finally:
            await p.aclose()


async def test_a_header_with_a_line_break_is_refused_before_sending() -> None:
    async with RawServer(replying(Reply(http(200, b"{}")))) as server:
        p = pool(server.url)
        try:
            with pytest.raises(ValueError, match="line break"):
                await p.request(
                    "GET", "/t", [("X-A", "1\r\nX-Injected: 2")], None, time_limit=2, cap=100
                )
        finally:
            await p.aclose()
    assert server.requests == []


@pytest.mark.parametrize(
    ("url", "scheme", "host", "port", "netloc", "target"),
    [
        ("http://h/a?b=1", "http", "h", 80, "h", "/a?b=1"),
        ("HTTPS://Example.COM:8443", "https", "example.com", 8443, "example.com:8443", "/"),
        ("https://[::1]:443/x", "https", "::1", 443, "[::1]", "/x"),
        ("http://user:pw@h:81/p", "http", "h", 81, "h:81", "/p"),
    ],
)
def test_split_url(url: str, scheme: str, host: str, port: int, netloc: str, target: str) -> None:
    origin, got = split_url(url)
    assert (origin.scheme, origin.host, origin.port, origin.netloc, got) == (
        scheme,
        host,
        port,
        netloc,
        target,
    )


@pytest.mark.parametrize("url", ["ftp://h/x", "h/x", "http:///x"])
def test_split_url_refuses(url: str) -> None:
    with pytest.raises(ValueError):
        split_url(url)


async def test_slots_are_first_come_first_served_and_survive_cancellation() -> None:
    slots = Slots(1)
    order: list[str] = []
    release = anyio.Event()
    leaving = anyio.CancelScope()

    async def holder() -> None:
        async with slots:
            await release.wait()

    async def waiter(name: str) -> None:
        async with slots:
            order.append(name)

    async def leaver() -> None:
        with leaving:
            await waiter("left")

    async with anyio.create_task_group() as tg:
        tg.start_soon(holder)
        await anyio.sleep(0.01)
        for name in ("first", "second"):
            tg.start_soon(waiter, name)
            await anyio.sleep(0.01)
        tg.start_soon(leaver)
        await anyio.sleep(0.01)
        tg.start_soon(waiter, "third")
        await anyio.sleep(0.01)
        leaving.cancel()  # leaves while waiting: its place is skipped, no slot is lost
        await anyio.sleep(0.01)
        release.set()
    assert order == ["first", "second", "third"]
    with anyio.fail_after(1):
        async with slots:  # the one slot came back
            pass


async def test_endless_headers_are_cut_at_the_cap() -> None:
    filler = b"X-Filler: " + b"a" * 1000 + b"\r\n"
    raw = b"HTTP/1.1 200 OK\r\n" + filler * 100 + b"Content-Length: 2\r\n\r\n{}"
    async with RawServer(replying(Reply(raw))) as server:
        p = pool(server.url)
        try:
            with pytest.raises(TransportError, match="headers exceed"):
                await get(p)
        finally:
            await p.aclose()


async def test_deadlines_fail_only_the_late_exchanges() -> None:
    """One timer per pool watches the busy connections' deadlines: an exchange with no answer
    and one whose body stalls time out (no earlier than their limit), exchanges answered in
    time beside them do not, and the pool works on afterwards."""

    async def handler(request: Req) -> Reply:
        if request.path == "/silent":
            return Reply(http(200, b"{}"), delay=30)
        if request.path == "/trickle":
            return Reply(http(200, b"{}", length=10))  # announces 10 bytes, sends 2
        return Reply(http(200, b'{"ok": 1}'), delay=0.05)

    async def request(p: Pool, target: str) -> Response:
        return await p.request(
            "GET", target, [("Accept", "application/json")], None, time_limit=0.4, cap=1000
        )

    async with RawServer(handler) as server:
        p = pool(server.url, limit=16)
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            silent, trickle, *on_time = await asyncio.gather(
                request(p, "/silent"),
                request(p, "/trickle"),
                *(request(p, "/ok") for _ in range(10)),
                return_exceptions=True,
            )
            elapsed = loop.time() - started
            assert isinstance(silent, TransportError) and silent.sent
            assert str(silent) == "no answer within 0.4s"
            assert isinstance(trickle, Response)
            assert trickle.problem == "no complete answer within 0.4s"
            assert all(isinstance(r, Response) and r.body == b'{"ok": 1}' for r in on_time)
            assert elapsed >= 0.4  # never early; how late is the tick's business, not asserted
            answer = await request(p, "/ok")
            assert (answer.status, answer.problem) == (200, None)
        finally:
            await p.aclose()
