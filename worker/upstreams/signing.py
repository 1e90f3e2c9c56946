"""The two HMAC request-signing schemes: SecMaster's SDK-HMAC-SHA256 and KooDrive's app auth.

Written here (about 80 lines) because the official SDK is synchronous and pins an exact pymongo;
its signer is the test oracle (tests/test_signing.py). The sandbox verifies with the same
canonicalisation, so both sides of every test speak exactly one definition of it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from urllib.parse import quote, unquote, urlsplit

SDK_ALGORITHM = "SDK-HMAC-SHA256"
APP_ALGORITHM = "HMAC-SHA256"
DATE_FORMAT = "%Y%m%dT%H%M%SZ"


def format_date(moment: datetime | None = None) -> str:
    return (moment or datetime.now(UTC)).astimezone(UTC).strftime(DATE_FORMAT)


def parse_date(text: str) -> datetime:
    return datetime.strptime(text, DATE_FORMAT).replace(tzinfo=UTC)


def _encode(text: str) -> str:
    # RFC 3986 unreserved characters stay; everything else (including '/', '~' aside) is encoded.
    return quote(text, safe="~")


def canonical_uri(path: str) -> str:
    """Each segment percent-encoded (after undoing any encoding already applied); trailing '/'."""
    segments = [_encode(unquote(segment)) for segment in path.split("/")]
    uri = "/".join(segments)
    return uri if uri.endswith("/") else uri + "/"


def canonical_query(pairs: Iterable[tuple[str, str]]) -> str:
    """Sorted by name (then value, so repeated keys are stable); an empty value keeps its '='."""
    encoded = sorted((_encode(k), _encode(v)) for k, v in pairs)
    return "&".join(f"{k}={v}" for k, v in encoded)


def canonical_request(
    method: str,
    path: str,
    query: Iterable[tuple[str, str]],
    headers: Mapping[str, str],
    signed: list[str],
    body: bytes,
) -> str:
    lower = {k.lower(): v for k, v in headers.items()}
    canonical_headers = "".join(f"{name}:{lower[name].strip()}\n" for name in signed)
    return "\n".join(
        (
            method.upper(),
            canonical_uri(path),
            canonical_query(query),
            canonical_headers,
            ";".join(signed),
            hashlib.sha256(body).hexdigest(),
        )
    )


def _hmac(secret: str, text: str) -> str:
    return hmac.new(secret.encode(), text.encode(), hashlib.sha256).hexdigest()


def sdk_signature(
    method: str, path: str, query: Iterable[tuple[str, str]], headers: Mapping[str, str], signed: list[str], body: bytes, sk: str
) -> str:
    """Signature of SDK-HMAC-SHA256. `headers` must contain X-Sdk-Date and every signed header."""
    date = {k.lower(): v for k, v in headers.items()}["x-sdk-date"]
    request_hash = hashlib.sha256(canonical_request(method, path, query, headers, signed, body).encode()).hexdigest()
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
    """Return headers with X-Sdk-Date, Host and Authorization added (every header is signed)."""
    parts = urlsplit(url)
    out = dict(headers)
    out.setdefault("X-Sdk-Date", date or format_date())
    if not any(k.lower() == "host" for k in out):
        out["Host"] = parts.netloc
    signed = sorted(k.lower() for k in out)
    query = query_pairs(parts.query)
    signature = sdk_signature(method, parts.path or "/", query, out, signed, body, sk)
    out["Authorization"] = (
        f"{SDK_ALGORITHM} Access={ak}, SignedHeaders={';'.join(signed)}, Signature={signature}"
    )
    return out


APP_SIGNED = ["host", "x-date", "x-user-id"]


def app_signature(method: str, path: str, query: Iterable[tuple[str, str]], headers: Mapping[str, str], body: bytes, secret: str) -> str:
    """KooDrive app auth: StringToSign has no date line (upstream.md)."""
    request_hash = hashlib.sha256(canonical_request(method, path, query, headers, APP_SIGNED, body).encode()).hexdigest()
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
    parts = urlsplit(url)
    out = dict(headers)
    out["X-User-Id"] = user_id
    out["X-Date"] = date or format_date()
    out["Host"] = parts.netloc
    signature = app_signature(method, parts.path or "/", query_pairs(parts.query), out, body, app_secret)
    out["Authorization"] = f"{APP_ALGORITHM} AppId={app_id},SignedHeaders={';'.join(APP_SIGNED)},Signature={signature}"
    return out


def query_pairs(query: str) -> list[tuple[str, str]]:
    pairs = []
    for item in query.split("&") if query else []:
        name, _, value = item.partition("=")
        pairs.append((unquote(name.replace("+", " ")), unquote(value.replace("+", " "))))
    return pairs


def parse_authorization(header: str) -> tuple[str, dict[str, str]]:
    """Split 'ALG k=v, k=v' (either comma style) into the algorithm and its fields."""
    algorithm, _, rest = header.strip().partition(" ")
    fields = {}
    for item in rest.split(","):
        key, sep, value = item.strip().partition("=")
        if sep:
            fields[key] = value
    return algorithm, fields
