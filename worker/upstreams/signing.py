"""The two HMAC request-signing schemes: SecMaster's SDK-HMAC-SHA256 and KooDrive's app auth.

Written here (about 100 lines) because the official SDK is synchronous and pins an exact pymongo;
its signer (`huaweicloudsdkcore.signer.signer.Signer`) is the oracle: tests/test_signing.py signs
hundreds of random requests with both and requires identical Authorization headers. Where the
SDK's behaviour is surprising it is mirrored on purpose and says so below. The sandbox verifies
with these same functions, so both sides of every test speak exactly one definition of it.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from urllib.parse import quote, unquote, urlsplit

SDK_ALGORITHM = "SDK-HMAC-SHA256"
APP_ALGORITHM = "HMAC-SHA256"
DATE_FORMAT = "%Y%m%dT%H%M%SZ"
CONTENT_SHA256 = "X-Sdk-Content-Sha256"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def format_date(moment: datetime | None = None) -> str:
    """UTC `YYYYMMDDTHHMMSSZ`. Truncates to the second, so "now" is never in the future."""
    if moment is not None:
        return moment.astimezone(UTC).strftime(DATE_FORMAT)
    global _now_text
    second = int(time.time())
    if _now_text[0] != second:  # every signed request asks: format once per second
        _now_text = (second, time.strftime(DATE_FORMAT, time.gmtime(second)))
    return _now_text[1]


_now_text: tuple[int, str] = (0, "")


def parse_date(text: str) -> datetime:
    return datetime.strptime(text, DATE_FORMAT).replace(tzinfo=UTC)


def _encode(text: str) -> str:
    # RFC 3986: unreserved characters stay, '~' included; everything else, '/' too, is encoded.
    return quote(text, safe="~")


def canonical_uri(path: str) -> str:
    """Percent-decode the whole path, split on '/', encode each segment; always a trailing '/'.

    Decoding before splitting (as the SDK does) means an encoded '%2F' counts as a separator.
    """
    # Encoding each segment and joining them with '/' is encoding the whole with '/' kept.
    uri = quote(unquote(path or "/"), safe="~/")
    return uri if uri.endswith("/") else uri + "/"


def canonical_query(pairs: Iterable[tuple[str, str]]) -> str:
    """Pairs sorted by (name, value) *before* encoding, as the SDK sorts them; an empty value
    keeps its '='. Sorting the decoded text matters for non-ASCII names ('é' vs '%C3%A9')."""
    return "&".join(f"{_encode(k)}={_encode(v)}" for k, v in sorted(pairs))


def canonical_request(
    method: str,
    path: str,
    query: Iterable[tuple[str, str]],
    headers: Mapping[str, str],
    signed: list[str],
    body: bytes,
    *,
    payload_hash: str | None = None,
) -> str:
    lower = {k.lower(): v for k, v in headers.items()}
    return _canonical(method, path, query, lower, signed, payload_hash or _sha256(body))


def _canonical(
    method: str,
    path: str,
    query: Iterable[tuple[str, str]],
    lower: Mapping[str, str],
    signed: list[str],
    payload_hash: str,
) -> str:
    """`canonical_request` with the headers already keyed by lower-case name."""
    canonical_headers = "".join(f"{name}:{lower[name].strip()}\n" for name in signed)
    return "\n".join(
        (
            method.upper(),
            canonical_uri(path),
            canonical_query(query),
            canonical_headers,
            ";".join(signed),
            payload_hash,
        )
    )


def _sha256(data: bytes) -> str:
    return EMPTY_SHA256 if not data else hashlib.sha256(data).hexdigest()


def _hmac(secret: str, text: str) -> str:
    return hmac.new(secret.encode(), text.encode(), hashlib.sha256).hexdigest()


def _sdk_payload_hash(lower: Mapping[str, str], body: bytes) -> str:
    # As the SDK: an empty body hashes to the empty hash, and a declared X-Sdk-Content-Sha256
    # (e.g. UNSIGNED-PAYLOAD) replaces the body's hash.
    if not body:
        return EMPTY_SHA256
    return lower.get(_CONTENT_SHA256_LOWER) or _sha256(body)


_CONTENT_SHA256_LOWER = CONTENT_SHA256.lower()


def sdk_signature(
    method: str,
    path: str,
    query: Iterable[tuple[str, str]],
    headers: Mapping[str, str],
    signed: list[str],
    body: bytes,
    sk: str,
) -> str:
    """Signature of SDK-HMAC-SHA256. `headers` must contain X-Sdk-Date and every signed header."""
    lower = {k.lower(): v for k, v in headers.items()}
    canonical = _canonical(method, path, query, lower, signed, _sdk_payload_hash(lower, body))
    date = lower["x-sdk-date"]
    request_hash = hashlib.sha256(canonical.encode()).hexdigest()
    return _hmac(sk, f"{SDK_ALGORITHM}\n{date}\n{request_hash}")


def sign_sdk(
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    ak: str,
    sk: str,
    date: str | None = None,
) -> dict[str, str]:
    """Return headers with X-Sdk-Date, Host and Authorization added.

    Every header is signed except names containing '_' (the SDK skips those). `url` must be the
    URL exactly as it goes on the wire (path percent-encoded, query encoded).
    """
    parts = urlsplit(url)
    out = dict(headers)
    names = {k.lower() for k in out}
    content_type = next((v for k, v in out.items() if k.lower() == "content-type"), "")
    if content_type and not content_type.startswith(("application/json", "application/bson")):
        # Mirrors the SDK: a body that is not JSON is declared, not hashed.
        out[CONTENT_SHA256] = UNSIGNED_PAYLOAD
    if "x-sdk-date" not in names:
        out["X-Sdk-Date"] = date or format_date()
    if "host" not in names:
        out["Host"] = parts.netloc
    signed = sorted(k.lower() for k in out if "_" not in k)
    signature = sdk_signature(
        method, parts.path or "/", query_pairs(parts.query), out, signed, body, sk
    )
    out["Authorization"] = (
        f"{SDK_ALGORITHM} Access={ak}, SignedHeaders={';'.join(signed)}, Signature={signature}"
    )
    return out


APP_SIGNED = ["host", "x-date", "x-user-id"]


def app_signature(
    method: str,
    path: str,
    query: Iterable[tuple[str, str]],
    headers: Mapping[str, str],
    body: bytes,
    secret: str,
) -> str:
    """KooDrive app auth: StringToSign has no date line (docs/upstream.md). No official vector."""
    canonical = canonical_request(method, path, query, headers, APP_SIGNED, body)
    request_hash = hashlib.sha256(canonical.encode()).hexdigest()
    return _hmac(secret, f"{APP_ALGORITHM}\n{request_hash}")


def sign_app(
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    app_id: str,
    app_secret: str,
    user_id: str,
    date: str | None = None,
) -> dict[str, str]:
    """Return headers with X-User-Id, X-Date (now, truncated: never in the future), Host and
    Authorization set."""
    parts = urlsplit(url)
    drop = {"x-user-id", "x-date", "host", "authorization"}
    out = {k: v for k, v in headers.items() if k.lower() not in drop}
    out["X-User-Id"] = user_id
    out["X-Date"] = date or format_date()
    out["Host"] = parts.netloc
    signature = app_signature(
        method, parts.path or "/", query_pairs(parts.query), out, body, app_secret
    )
    out["Authorization"] = (
        f"{APP_ALGORITHM} AppId={app_id},SignedHeaders={';'.join(APP_SIGNED)},Signature={signature}"
    )
    return out


def query_pairs(query: str) -> list[tuple[str, str]]:
    """Decode a raw query string into (name, value) pairs, keeping order, repeats and empties."""
    pairs = []
    for item in query.split("&") if query else []:
        name, _, value = item.partition("=")
        pairs.append((unquote(name.replace("+", " ")), unquote(value.replace("+", " "))))
    return pairs


def encode_query(pairs: Iterable[tuple[str, str]]) -> str:
    """The query string to send: exactly the canonical form, so what is signed is what is sent."""
    return canonical_query(pairs)


def parse_authorization(header: str) -> tuple[str, dict[str, str]]:
    """Split 'ALG k=v, k=v' (either comma style) into the algorithm and its fields."""
    algorithm, _, rest = header.strip().partition(" ")
    fields = {}
    for item in rest.split(","):
        key, sep, value = item.strip().partition("=")
        if sep:
            fields[key] = value
    return algorithm, fields
