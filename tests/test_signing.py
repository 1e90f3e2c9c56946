"""Request signing: the official vector, the official SDK as a differential oracle, app auth."""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import pytest
from huaweicloudsdkcore.auth.credentials import BasicCredentials
from huaweicloudsdkcore.sdk_request import SdkRequest
from huaweicloudsdkcore.signer.signer import Signer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.upstreams.signing import (
    app_signature,
    canonical_query,
    canonical_request,
    canonical_uri,
    encode_query,
    format_date,
    parse_authorization,
    parse_date,
    query_pairs,
    sdk_signature,
    sign_app,
    sign_sdk,
)

AK = "QTWAOYTTINDUT2QVKYUC"
SK = "MFyfvK41ba2giqM7Uio6PznpdUKGpownRZlmVmHc"
VECTOR_URL = (
    "https://service.region.example.com/v1/77b6a44cba5143ab91d13ab9a8ff44fd/vpcs"
    "?limit=2&marker=13551d6b-755d-4757-b956-536f674975c0"
)
VECTOR_AUTH = (
    "SDK-HMAC-SHA256 Access=QTWAOYTTINDUT2QVKYUC, SignedHeaders=content-type;host;x-sdk-date, "
    "Signature=7be6668032f70418fcc22abc52071e57aff61b84a1d2381bb430d6870f4f6ebe"
)


def test_official_vector() -> None:
    headers = {"Content-Type": "application/json", "X-Sdk-Date": "20191115T033655Z"}
    signed = sign_sdk("GET", VECTOR_URL, headers, b"", AK, SK)
    assert signed["Authorization"] == VECTOR_AUTH
    assert signed["Host"] == "service.region.example.com"
    canonical = canonical_request(
        "GET",
        "/v1/77b6a44cba5143ab91d13ab9a8ff44fd/vpcs",
        query_pairs(VECTOR_URL.partition("?")[2]),
        signed,
        ["content-type", "host", "x-sdk-date"],
        b"",
    )
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    assert digest == "b25362e603ee30f4f25e7858e8a7160fd36e803bb2dfe206278659d71a9bcd7a"


def test_verifier_side_recomputes_the_signature() -> None:
    headers = {"Content-Type": "application/json", "X-Project-Id": "p1"}
    url = "https://h.example/v1/p1/workspaces/w/soc/tasks/t%20x?offset=0&limit=100"
    signed = sign_sdk("PUT", url, headers, b'{"action":"TERMINATE"}', AK, SK)
    algorithm, fields = parse_authorization(signed["Authorization"])
    assert algorithm == "SDK-HMAC-SHA256"
    assert fields["SignedHeaders"] == "content-type;host;x-project-id;x-sdk-date"
    again = sdk_signature(
        "PUT",
        "/v1/p1/workspaces/w/soc/tasks/t%20x",
        query_pairs("offset=0&limit=100"),
        signed,
        fields["SignedHeaders"].split(";"),
        b'{"action":"TERMINATE"}',
        SK,
    )
    assert again == fields["Signature"]


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("", "/"),
        ("/", "/"),
        ("/v1/a", "/v1/a/"),
        ("/v1/a/", "/v1/a/"),
        ("/v1/a b/é", "/v1/a%20b/%C3%A9/"),
        ("/v1/a%20b", "/v1/a%20b/"),
        ("/v1/~x!*'()", "/v1/~x%21%2A%27%28%29/"),
    ],
)
def test_canonical_uri(path: str, expected: str) -> None:
    assert canonical_uri(path) == expected


def test_canonical_query_sorts_repeats_and_keeps_empty_values() -> None:
    pairs = [("b", "2"), ("a", ""), ("b", "1"), ("a b", "x+y")]
    assert canonical_query(pairs) == "a=&a%20b=x%2By&b=1&b=2"
    assert query_pairs(encode_query(pairs)) == sorted(pairs)


# -- differential test against the official SDK signer ------------------------------------------

_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    max_size=12,
)
_segment = st.one_of(_text, st.sampled_from(["a b", "é", "%", "+", "~", "!$&'()*,;=:@", "a/b"]))
_header_name = st.from_regex(r"X-[A-Za-z0-9][A-Za-z0-9_-]{0,10}", fullmatch=True)
_header_value = st.from_regex(r"[ ]{0,2}[!-~]([ !-~]{0,20}[!-~])?[ ]{0,2}", fullmatch=True)
_content_type = st.sampled_from(
    [None, "application/json", "application/json;charset=UTF-8", "text/plain", "application/bson"]
)
_method = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "get"])
_date = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2099, 12, 31), timezones=st.just(UTC)
)


def _encode_segment(segment: str, mode: int) -> str:
    # Callers encode paths differently (fully, yarl-style leaving sub-delims): both must sign alike.
    return quote(segment, safe="" if mode == 0 else "!$&'()*+,;=:@")


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    method=_method,
    segments=st.lists(_segment, min_size=0, max_size=5),
    trailing=st.booleans(),
    encoding=st.integers(0, 1),
    query=st.lists(st.tuples(_text, _text), max_size=6),
    repeat=st.booleans(),
    headers=st.dictionaries(_header_name, _header_value, max_size=4),
    content_type=_content_type,
    body=st.one_of(st.just(b""), st.binary(max_size=64), st.text(max_size=30).map(str.encode)),
    moment=_date,
)
def test_sign_sdk_matches_official_sdk(
    method: str,
    segments: list[str],
    trailing: bool,
    encoding: int,
    query: list[tuple[str, str]],
    repeat: bool,
    headers: dict[str, str],
    content_type: str | None,
    body: bytes,
    moment: datetime,
) -> None:
    unique: dict[str, str] = {}
    for name in headers:  # one spelling per header name, as on the wire
        unique.setdefault(name.lower(), name)
    headers = {name: headers[name] for name in unique.values()}
    if repeat and query:
        query = [*query, (query[0][0], "again"), (query[0][0], "")]
    path = "/" + "/".join(_encode_segment(s, encoding) for s in segments)
    if trailing and not path.endswith("/"):
        path += "/"
    host = "secmaster.cn-north-4.myhuaweicloud.com"
    base = dict(headers)
    if content_type is not None:
        base["Content-Type"] = content_type
    base["X-Sdk-Date"] = format_date(moment)

    ours = sign_sdk(method, f"https://{host}{path}?{encode_query(query)}", base, body, AK, SK)

    request = SdkRequest(
        method=method,
        schema="https",
        host=host,
        resource_path=path,
        query_params=list(query),
        header_params=dict(base),
        body=body,
    )
    Signer(BasicCredentials(AK, SK)).sign(request)
    assert ours["Authorization"] == request.header_params["Authorization"]


# -- KooDrive app auth ---------------------------------------------------------------------------

_APP_HEADER = re.compile(
    r"^HMAC-SHA256 AppId=(?P<app>[^,\s]+),SignedHeaders=host;x-date;x-user-id,"
    r"Signature=(?P<sig>[0-9a-f]{64})$"
)


def test_app_auth_round_trip_and_header_format() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    url = "https://cn.myhuaweicloud-koodrive.com/koodrive/ose/v1/task/1534087020903704704"
    signed = sign_app("GET", url, {"Accept": "application/json"}, b"", "app-1", "s3cret", "u-9")
    after = datetime.now(UTC)
    match = _APP_HEADER.match(signed["Authorization"])
    assert match is not None, signed["Authorization"]
    assert match["app"] == "app-1"
    assert signed["Host"] == "cn.myhuaweicloud-koodrive.com"
    assert signed["X-User-Id"] == "u-9"
    sent_at = parse_date(signed["X-Date"])
    assert before <= sent_at <= after  # truncated to the second: never in the future
    algorithm, fields = parse_authorization(signed["Authorization"])
    assert algorithm == "HMAC-SHA256"
    path = "/koodrive/ose/v1/task/1534087020903704704"
    assert app_signature("GET", path, [], signed, b"", "s3cret") == fields["Signature"]
    # Any change to what is signed changes the signature.
    assert app_signature("GET", path + "5", [], signed, b"", "s3cret") != fields["Signature"]
    assert app_signature("GET", path, [], signed, b"x", "s3cret") != fields["Signature"]
    assert app_signature("GET", path, [], signed, b"", "other") != fields["Signature"]
    moved = {**signed, "X-Date": format_date(sent_at - timedelta(seconds=1))}
    assert app_signature("GET", path, [], moved, b"", "s3cret") != fields["Signature"]


def test_app_auth_replaces_caller_supplied_auth_headers() -> None:
    signed = sign_app(
        "GET",
        "http://127.0.0.1:8080/koodrive/ose/v1/task/1",
        {"host": "evil", "x-date": "20000101T000000Z", "Authorization": "Bearer x"},
        b"",
        "a",
        "s",
        "u",
        date="20250101T000000Z",
    )
    assert signed["Host"] == "127.0.0.1:8080"
    assert signed["X-Date"] == "20250101T000000Z"
    assert sum(1 for k in signed if k.lower() in {"host", "x-date", "authorization"}) == 3
