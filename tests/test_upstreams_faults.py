"""Every fault and malformed answer, fed to every client over real sockets, and how it is classified.

The upstream here is a tiny raw HTTP/1.1 server (asyncio streams) so that a test can do what no
well-behaved framework would: drop the connection after reading a request, cut a body short,
stall, or send a body larger than it announced.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import orjson
import pytest

from tests.support.rawhttp import Handler, RawServer, Reply, Req, http, json_reply
from worker.config import AiccSettings, KooDriveSettings, SecMasterSettings
from worker.redact import Redactor
from worker.upstreams.aicc import AiccClient
from worker.upstreams.base import ErrorKind, Upstream, UpstreamError
from worker.upstreams.envelope import parse_retry_after
from worker.upstreams.http import HttpClient
from worker.upstreams.koodrive import KooDriveClient
from worker.upstreams.secmaster import SecMasterClient

TASK = "ccqG0000014iXvGKONQO"
AICC_SECRET = "aicc-client-secret-5f2b9c"
AICC_TOKEN = "aicc-live-token-77e1a0"
SM_TOKEN = "secmaster-fixed-token-91ab3c"
KD_TOKEN = "koodrive-bearer-token-c0ffee"
SECRETS = (AICC_SECRET, AICC_TOKEN, SM_TOKEN, KD_TOKEN)

# -- the three clients against it -----------------------------------------------------------------


def aicc_token(request: Req) -> Reply | None:
    if request.path == "/baas/auth/v1.0/oauth2/token":
        return json_reply(200, {"access_token": AICC_TOKEN, "expires_in": 7200})
    return None


def make_client(system: str, url: str, *, timeout: float = 5.0, cap: int = 5_000_000) -> Upstream:
    if system == "aicc":
        return AiccClient(
            AiccSettings(
                base_url=url,
                client_id="cid",
                client_secret=AICC_SECRET,  # type: ignore[arg-type]
                creator_id="handler-1",
                timeout=timeout,
                max_body_bytes=cap,
            ),
            page_delay=0.01,
        )
    if system == "secmaster":
        return SecMasterClient(
            SecMasterSettings(
                base_url=url,
                project_id="proj",
                workspace_id="ws",
                token=SM_TOKEN,  # type: ignore[arg-type]
                timeout=timeout,
                max_body_bytes=cap,
            ),
            page_delay=0.01,
        )
    return KooDriveClient(
        KooDriveSettings(
            base_url=url,
            token=KD_TOKEN,  # type: ignore[arg-type]
            timeout=timeout,
            max_body_bytes=cap,
        ),
        token_file=Path("/nonexistent/koodrive_token"),
    )


GOOD_BODY: dict[str, Any] = {
    "aicc": {
        "resCode": "0",
        "resMsg": "ok",
        "result": {"taskInfo": {"title": "t", "status": "Pending"}, "taskTrace": []},
    },
    "secmaster": {
        "code": "00000000",
        "message": "",
        "success": True,
        "data": {"id": TASK, "name": "n", "status": "waiting", "comments": []},
    },
    "koodrive": {"taskId": TASK, "taskName": "n", "status": 1, "code": 0, "msg": "Success."},
}

OPS = [
    ("aicc", "fetch"),
    ("aicc", "apply"),
    ("aicc", "discover"),
    ("secmaster", "fetch"),
    ("secmaster", "apply"),
    ("secmaster", "discover"),
    ("koodrive", "fetch"),
]
WRITES = {("aicc", "apply"), ("secmaster", "apply")}


async def run_op(client: Upstream, op: str) -> object:
    if op == "fetch":
        return await client.fetch(TASK)
    if op == "apply":
        if client.system == "aicc":
            params = {"title": "t", "description": "d"}
            return await client.apply(TASK, "process", params)
        return await client.apply(TASK, "comment", {"comment": "c"})
    return [task async for task in client.discover()]


async def classify(system: str, op: str, fault: Handler, **client_kw: Any) -> UpstreamError:
    async def handler(request: Req) -> Reply:
        return aicc_token(request) or await fault(request)

    async with RawServer(handler) as server:
        client = make_client(system, server.url, **client_kw)
        try:
            # discovery retries a failed page (and waits out each 429's pause) before it stops
            with anyio.fail_after(40 if op == "discover" else 5):
                with pytest.raises(UpstreamError) as info:
                    await run_op(client, op)
        finally:
            await client.aclose()
    error = info.value
    text = str(error)
    assert not any(secret in text for secret in SECRETS), text
    assert "\n" not in text
    where = f"{system} task {TASK}: " if op != "discover" else f"{system}: task list at "
    assert text.startswith(where), text
    return error


def fixed(reply: Reply) -> Handler:
    async def handler(request: Req) -> Reply:
        return reply

    return handler


R, U, P, N, A = (
    ErrorKind.RETRY,
    ErrorKind.UNKNOWN,
    ErrorKind.PERMANENT,
    ErrorKind.NOT_FOUND,
    ErrorKind.AUTH,
)
HTML = b"<!DOCTYPE html><html><body>" + b"x" * 1500 + b"</body></html>"
SOON = format_datetime(datetime.now(UTC) + timedelta(hours=2), usegmt=True)

# (id, server behaviour, kind for a read, kind for a write, fragment of the message)
GENERIC: list[tuple[str, Reply, ErrorKind, ErrorKind, str]] = [
    ("500", Reply(http(500, b"oops", content_type="text/plain")), R, U, "HTTP 500"),
    ("502", Reply(http(502, HTML, content_type="text/html")), R, R, "HTTP 502 (text/html"),
    ("503", Reply(http(503, headers={"Retry-After": "1"})), R, R, "HTTP 503"),
    ("504", Reply(http(504)), R, R, "HTTP 504"),
    ("429", Reply(http(429, b'{"error_code":"APIGW.0308"}')), R, R, "HTTP 429"),
    ("429-date", Reply(http(429, headers={"Retry-After": SOON})), R, R, "HTTP 429"),
    ("dropped", Reply(None), R, U, "connection"),
    ("cut-off", Reply(http(200, b'{"resCode": "0"', length=500), close=True), R, U, "cut off"),
    ("not-json", Reply(http(200, b"hello", content_type="text/plain")), R, U, "not JSON"),
    ("truncated", Reply(http(200, b'{"resCode": "0", "res')), R, U, "truncated JSON"),
    ("html-200", Reply(http(200, HTML, content_type="text/html")), R, U, "not JSON (text/html"),
    ("nan", Reply(http(200, b'{"resCode": "0", "code": NaN}')), R, U, "not JSON"),
    ("empty-200", Reply(http(200, b"")), R, U, "empty"),
    ("array", Reply(http(200, b"[1, 2]")), R, U, "is a list, expected an object"),
    ("404", Reply(http(404, b"{}")), N, N, "HTTP 404"),
    ("400-html", Reply(http(400, HTML, content_type="text/html")), P, P, "HTTP 400"),
    (
        "redirect",
        Reply(http(302, headers={"Location": "https://evil.example/steal"})),
        P,
        P,
        "redirect to evil.example",
    ),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("system", "op"), OPS)
@pytest.mark.parametrize(
    ("reply", "read_kind", "write_kind", "fragment"),
    [pytest.param(*row[1:], id=row[0]) for row in GENERIC],
)
async def test_generic_faults(
    system: str, op: str, reply: Reply, read_kind: ErrorKind, write_kind: ErrorKind, fragment: str
) -> None:
    error = await classify(system, op, fixed(reply))
    expected = write_kind if (system, op) in WRITES else read_kind
    assert error.kind is expected, str(error)
    assert fragment in str(error)


@pytest.mark.anyio
# (discovery waits out each Retry-After between its tries of a page: covered in test_sync)
@pytest.mark.parametrize(("system", "op"), [o for o in OPS if o[1] != "discover"])
async def test_retry_after_is_parsed(system: str, op: str) -> None:
    error = await classify(system, op, fixed(Reply(http(503, headers={"Retry-After": "7"}))))
    assert error.retry_after == 7.0
    assert error.http_status == 503
    soon = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    error = await classify(system, op, fixed(Reply(http(429, headers={"Retry-After": soon}))))
    assert error.retry_after is not None and 100 < error.retry_after <= 120
    error = await classify(system, op, fixed(Reply(http(429))))
    # no header: the system's own pause after a 429 that states no limit (one second)
    assert error.retry_after is not None and 0 < error.retry_after <= 1.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("5", 5.0),
        (" 2.5 ", 2.5),
        ("-3", 0.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
        ("soon", None),
        ("nan", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


@pytest.mark.anyio
@pytest.mark.parametrize(("system", "op"), OPS)
async def test_slow_answer_times_out(system: str, op: str) -> None:
    async def slow(request: Req) -> Reply:
        return Reply(http(200, orjson.dumps(GOOD_BODY[system])), delay=3.0)

    started = time.monotonic()
    error = await classify(system, op, slow, timeout=0.3)
    assert time.monotonic() - started < 2.5
    assert error.kind is (U if (system, op) in WRITES else R)
    assert "no answer within 0.3s" in str(error)


@pytest.mark.anyio
@pytest.mark.parametrize(("system", "op"), OPS)
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_body_over_the_cap(system: str, op: str, chunked: bool) -> None:
    big = dict(GOOD_BODY[system], padding="x" * 5000)
    reply = Reply(http(200, orjson.dumps(big), chunked=chunked))
    error = await classify(system, op, fixed(reply), cap=2048)
    assert error.kind is (U if (system, op) in WRITES else R)
    assert "2048-byte limit" in str(error)


@pytest.mark.anyio
@pytest.mark.parametrize(("system", "op"), OPS)
async def test_error_status_with_a_huge_body_keeps_its_status_class(system: str, op: str) -> None:
    reply = Reply(http(503, b"x" * 10_000, content_type="text/html"))
    error = await classify(system, op, fixed(reply), cap=2048)
    assert error.kind is R  # a 503 means nothing was applied, however large its page
    assert "HTTP 503" in str(error)


@pytest.mark.anyio
@pytest.mark.parametrize(("system", "op"), OPS)
async def test_connection_refused_is_retry_even_for_writes(system: str, op: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = make_client(system, f"http://127.0.0.1:{port}")
    try:
        with anyio.fail_after(5), pytest.raises(UpstreamError) as info:
            await run_op(client, op)
    finally:
        await client.aclose()
    assert info.value.kind is R
    assert "cannot connect" in str(info.value)


@pytest.mark.anyio
@pytest.mark.parametrize(("system", "op"), OPS)
async def test_secrets_echoed_by_the_server_are_redacted(system: str, op: str) -> None:
    async def echo(request: Req) -> Reply:
        seen = " ".join(request.headers.values()) + " " + request.body.decode(errors="replace")
        text = f"rejected request {seen}"
        body = {"resCode": "E1", "resMsg": text, "code": "SecMaster.20030001"}
        return json_reply(400, {**body, "message": text, "msg": text})

    error = await classify(system, op, echo)  # classify() asserts that no secret is shown
    assert error.kind is P
    assert "***" in str(error)


# -- system-specific envelopes ---------------------------------------------------------------------

SPECIFIC: list[tuple[str, str, Reply, ErrorKind, ErrorKind, str]] = [
    # AICC
    (
        "aicc",
        "rescode-number",
        json_reply(200, {"resCode": 0, "result": {}}),
        R,
        U,
        'resCode is a number (0), expected the string "0"',
    ),
    ("aicc", "rescode-missing", json_reply(200, {"result": {}}), R, U, "resCode is null"),
    (
        "aicc",
        "business",
        json_reply(200, {"resCode": "1001", "resMsg": "bad title"}),
        P,
        P,
        "resCode 1001: bad title",
    ),
    (
        "aicc",
        "business-400",
        json_reply(400, {"resCode": "1002", "resMsg": "too long"}),
        P,
        P,
        "HTTP 400 resCode 1002: too long",
    ),
    ("aicc", "business-500", json_reply(500, {"resCode": "9", "resMsg": "db"}), R, U, "HTTP 500"),
    # SecMaster
    (
        "secmaster",
        "business-400",
        json_reply(400, {"code": "SecMaster.20030001", "message": "bad parameter"}),
        P,
        P,
        "HTTP 400 SecMaster.20030001: bad parameter",
    ),
    (
        "secmaster",
        "business-200",
        json_reply(200, {"code": "SecMaster.20010001", "message": "bad workspace"}),
        P,
        P,
        "SecMaster.20010001: bad workspace",
    ),
    (
        "secmaster",
        "gateway-429",
        json_reply(429, {"error_code": "APIGW.0308", "error_msg": "throttled"}),
        R,
        R,
        "HTTP 429 APIGW.0308: throttled",
    ),
    (
        "secmaster",
        "code-number",
        json_reply(200, {"code": 0, "success": True, "data": {}}),
        R,
        U,
        'code is a number (0), expected the string "00000000"',
    ),
    (
        "secmaster",
        "no-code-no-success",
        json_reply(200, {"data": {}}),
        R,
        U,
        "neither code 00000000 nor success true",
    ),
    (
        "secmaster",
        "success-false",
        json_reply(200, {"code": "00000000", "success": False, "data": {}}),
        R,
        U,
        "success=False",
    ),
]
SPECIFIC_FETCH: list[tuple[str, str, Reply, ErrorKind, str]] = [
    ("aicc", "result-list", json_reply(200, {"resCode": "0", "result": []}), R,
     "result is a list, expected an object"),
    ("aicc", "no-taskinfo", json_reply(200, {"resCode": "0", "result": {"taskTrace": []}}), R,
     "result.taskInfo is null, expected an object"),
    ("aicc", "trace-object",
     json_reply(200, {"resCode": "0", "result": {"taskInfo": {}, "taskTrace": {}}}), R,
     "result.taskTrace is an object, expected a list"),
    ("aicc", "status-object",
     json_reply(200, {"resCode": "0", "result": {"taskInfo": {"status": {"a": 1}}}}), R,
     "result.taskInfo.status is an object, expected a string"),
    ("secmaster", "data-string", json_reply(200, {"code": "00000000", "data": "x"}), R,
     "data is a string, expected an object"),
    ("secmaster", "comments-object",
     json_reply(200, {"code": "00000000", "data": {"comments": {"id": "1"}}}), R,
     "data.comments is an object, expected a list"),
    ("secmaster", "comment-string",
     json_reply(200, {"code": "00000000", "data": {"comments": ["hi"]}}), R,
     "data.comments[0] is a string, expected an object"),
    ("secmaster", "status-object",
     json_reply(200, {"code": "00000000", "data": {"status": {"s": 1}}}), R,
     "data.status is an object, expected a string"),
    ("koodrive", "status-object", json_reply(200, {"code": 0, "status": {"s": 1}}), R,
     "status is an object, expected a number"),
    ("koodrive", "code-missing", json_reply(200, {"status": 1}), R, 'code is null, expected 0'),
    ("koodrive", "code-bool", json_reply(200, {"code": False, "status": 1}), R,
     "code is a boolean"),
    ("koodrive", "not-found", json_reply(200, {"code": 13000309, "msg": "no such task"}), N,
     "code 13000309: no such task"),
    ("koodrive", "not-found-str-500", json_reply(500, {"code": "13000309", "msg": "gone"}), N,
     "code 13000309: gone"),
    ("koodrive", "bad-parameter", json_reply(200, {"code": 13000102, "msg": "bad param"}), P,
     "code 13000102: bad param"),
    ("koodrive", "no-permission", json_reply(400, {"code": 13000410, "msg": "no permission"}),
     P, "HTTP 400 code 13000410: no permission"),
    ("koodrive", "auth-400",
     json_reply(400, {"code": 13000001, "msg": "authentication failed"}), A,
     "authentication failed"),
    ("koodrive", "500-code", json_reply(500, {"code": 13000500, "msg": "busy"}), R, "HTTP 500"),
]  # fmt: skip


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("system", "reply", "read_kind", "write_kind", "fragment"),
    [pytest.param(row[0], *row[2:], id=f"{row[0]}-{row[1]}") for row in SPECIFIC],
)
@pytest.mark.parametrize("op", ["fetch", "apply"])
async def test_envelopes(
    system: str,
    op: str,
    reply: Reply,
    read_kind: ErrorKind,
    write_kind: ErrorKind,
    fragment: str,
) -> None:
    error = await classify(system, op, fixed(reply))
    assert error.kind is (write_kind if op == "apply" else read_kind), str(error)
    assert fragment in str(error)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("system", "reply", "kind", "fragment"),
    [pytest.param(row[0], *row[2:], id=f"{row[0]}-{row[1]}") for row in SPECIFIC_FETCH],
)
async def test_payload_shapes(system: str, reply: Reply, kind: ErrorKind, fragment: str) -> None:
    error = await classify(system, "fetch", fixed(reply))
    assert error.kind is kind, str(error)
    assert fragment in str(error)


@pytest.mark.anyio
@pytest.mark.parametrize("system", ["aicc", "secmaster", "koodrive"])
async def test_good_answer_with_escaped_content_type_is_accepted(system: str) -> None:
    # AICC's documented Content-Type is `application/json%3Bcharset=UTF-8`.
    reply = Reply(
        http(200, orjson.dumps(GOOD_BODY[system]), content_type="application/json%3Bcharset=UTF-8")
    )

    async def handler(request: Req) -> Reply:
        return aicc_token(request) or reply

    async with RawServer(handler) as server:
        client = make_client(system, server.url)
        try:
            with anyio.fail_after(5):
                fetched = await client.fetch(TASK)
        finally:
            await client.aclose()
    assert fetched.task_id == TASK
    assert fetched.observation.title in ("t", "n")


# -- a write reaches the server at most once ------------------------------------------------------


def drop_writes(system: str) -> Handler:
    """Answers reads (keep-alive) and token requests; reads a write, then hangs up on it."""

    async def handler(request: Req) -> Reply:
        if token := aicc_token(request):
            return token
        if request.method == "PUT" or request.path.endswith("/task/process"):
            return Reply(None)
        return json_reply(200, GOOD_BODY[system])

    return handler


@pytest.mark.anyio
@pytest.mark.parametrize("system", ["secmaster", "aicc"])
async def test_a_dropped_write_is_unknown_and_never_resent(system: str) -> None:
    async with RawServer(drop_writes(system)) as server:
        client = make_client(system, server.url)
        try:
            with anyio.fail_after(5):
                await client.fetch(TASK)  # a keep-alive connection is now open and idle
                await client.fetch(TASK)
                with pytest.raises(UpstreamError) as info:
                    await run_op(client, "apply")
        finally:
            await client.aclose()
    write = "PUT" if system == "secmaster" else "POST"
    writes = [r for r in server.requests if r.method == write and "token" not in r.path]
    assert len(writes) == 1, "aiohttp re-sent the write"
    assert info.value.kind is ErrorKind.UNKNOWN
    assert "may have been applied" in str(info.value)


@pytest.mark.anyio
async def test_put_over_http_client_is_sent_once_even_on_a_reused_connection() -> None:
    """Straight at HttpClient: GET then PUT, the server drops the PUT. Exactly one PUT."""
    async with RawServer(drop_writes("secmaster")) as server:
        http_client = HttpClient(
            "secmaster", base_url=server.url, timeout=5, max_body_bytes=10_000, redactor=Redactor()
        )
        try:
            with anyio.fail_after(5):
                await http_client.send(
                    "GET", server.url + "/r", task_id="t", write=False, headers={}
                )
                with pytest.raises(UpstreamError) as info:
                    await http_client.send(
                        "PUT", server.url + "/w", task_id="t", write=True, headers={}, body=b"{}"
                    )
        finally:
            await http_client.aclose()
    assert server.count("PUT") == 1
    assert info.value.kind is ErrorKind.UNKNOWN


@pytest.mark.anyio
async def test_canary_plain_aiohttp_resends_a_put_even_with_force_close() -> None:
    """Why the write guard exists: aiohttp 3.14 re-sends a dropped PUT by itself, even over a
    connector with force_close=True. If this starts failing, aiohttp changed; the guard in
    worker/upstreams/http.py stays correct either way."""
    async with RawServer(drop_writes("secmaster")) as server:
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            with anyio.fail_after(5), pytest.raises(aiohttp.ServerDisconnectedError):
                async with session.put(server.url + "/w", data=b"{}"):
                    pass
    assert server.count("PUT") == 2


# -- TLS -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    try:
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
             "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"openssl cannot make a test certificate: {exc}")
    yield cert, key


@contextlib.asynccontextmanager
async def tls_server(cert: Path, key: Path) -> AsyncIterator[str]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(http(200, orjson.dumps(GOOD_BODY["koodrive"])))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    try:
        yield f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.anyio
async def test_tls_is_verified_and_ca_file_adds_a_trusted_ca(
    certificate: tuple[Path, Path],
) -> None:
    cert, key = certificate
    async with tls_server(cert, key) as url:
        untrusting = make_client("koodrive", url)
        try:
            with anyio.fail_after(5), pytest.raises(UpstreamError) as info:
                await untrusting.fetch(TASK)
        finally:
            await untrusting.aclose()
        assert info.value.kind is ErrorKind.RETRY
        assert "certificate" in str(info.value).lower()

        trusting = KooDriveClient(
            KooDriveSettings(base_url=url, token=KD_TOKEN, ca_file=str(cert))  # type: ignore[arg-type]
        )
        try:
            with anyio.fail_after(5):
                fetched = await trusting.fetch(TASK)
        finally:
            await trusting.aclose()
        assert fetched.observation.status == "1"


# -- rate limit and logging -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_rate_limit_spaces_requests() -> None:
    async def handler(request: Req) -> Reply:
        return json_reply(200, GOOD_BODY["koodrive"])

    async with RawServer(handler) as server:
        client = KooDriveClient(
            KooDriveSettings(base_url=server.url, token=KD_TOKEN, rate_limit=20)  # type: ignore[arg-type]
        )
        try:
            started = time.monotonic()
            with anyio.fail_after(5):
                async with anyio.create_task_group() as group:
                    for _ in range(30):
                        group.start_soon(client.fetch, TASK)
            elapsed = time.monotonic() - started
        finally:
            await client.aclose()
    # A burst of 20, then 20 per second: the last 10 need about half a second.
    assert elapsed >= 0.35
    assert len(server.requests) == 30


@pytest.mark.anyio
async def test_requests_are_logged_at_debug_without_secrets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def handler(request: Req) -> Reply:
        return aicc_token(request) or json_reply(200, GOOD_BODY["aicc"])

    caplog.set_level("DEBUG", logger="worker.upstreams")
    async with RawServer(handler) as server:
        client = make_client("aicc", server.url)
        try:
            with anyio.fail_after(5):
                await client.fetch(TASK)
        finally:
            await client.aclose()
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("worker.upstreams")]
    assert any(f"GET /service/AICC__Case/1.0.0/openapi/task/{TASK} -> 200" in x for x in lines)
    assert any("POST /baas/auth/v1.0/oauth2/token -> 200" in x for x in lines)
    assert not any(secret in line for line in lines for secret in SECRETS)


def test_redactor_masks_plain_url_and_json_escaped_forms() -> None:
    redact = Redactor(["a/b+c d", None, ""])
    redact.add('q"uote')
    text = 'x a/b+c d y a%2Fb%2Bc%20d z a%2Fb%2Bc+d w q\\"uote'
    assert redact(text) == "x *** y *** z *** w ***"


@pytest.mark.anyio
@pytest.mark.parametrize("system", ["aicc", "secmaster"])
async def test_discovery_ends_when_the_server_ignores_paging(system: str) -> None:
    page = [{"taskId": f"t{i}", "id": f"t{i}"} for i in range(100)]
    body = {
        "aicc": {"resCode": "0", "result": {"taskList": page, "count": 1_000_000}},
        "secmaster": {"code": "00000000", "total": 1_000_000, "data": page},
    }[system]

    async def handler(request: Req) -> Reply:
        return aicc_token(request) or json_reply(200, body)

    async with RawServer(handler) as server:
        client = make_client(system, server.url)
        try:
            with anyio.fail_after(5):
                found = [task async for task in client.discover()]
        finally:
            await client.aclose()
    assert found == [f"t{i}" for i in range(100)]
    # secmaster also tries to narrow a list over 10,000 by date: two more first pages
    wanted = 2 if system == "aicc" else 4
    assert len([r for r in server.requests if "token" not in r.path]) == wanted
