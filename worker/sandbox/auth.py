"""The credentials the sandbox accepts and the checks the real gateways make on every request.

Signatures are verified with worker.upstreams.signing, the same canonicalisation the clients
sign with; its own correctness is pinned by the official SDK's test vector elsewhere.
Each check returns None when the request may pass, else the reason, which goes into the
gateway's `APIGW.0301` answer (clients show it; tests assert on it).
"""

# The sandbox's credentials are public by design (loopback only, fake data): not secrets.
# ruff: noqa: S105

from __future__ import annotations

import functools
import hmac
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from worker.upstreams.signing import (
    APP_SIGNED,
    CONTENT_SHA256,
    app_signature,
    parse_authorization,
    parse_date,
    query_pairs,
    sdk_signature,
)

# strptime costs ~10 µs, a fifth of a signature check; a busy client sends the same
# second's date on many requests, so the parsed value is memoised.
_parse_date = functools.lru_cache(maxsize=256)(parse_date)

LOCKOUT_AFTER = 5
_NOT_OURS = ("unsupported signing algorithm", "access key not found")  # failures of another AK

DATE_WINDOW = 15 * 60.0  # X-Sdk-Date / X-Date must be this close to server time
FUTURE_SLACK = 5.0  # app auth refuses dates in the future, give or take clock jitter


@dataclass(frozen=True, slots=True)
class Credentials:
    """The one set of credentials the sandbox accepts, for every auth mode of every system."""

    # AICC: OAuth2 client credentials, and the handler id used by process actions.
    client_id: str = "tasksync-sandbox"
    client_secret: str = "sandbox-aicc-secret-4f7b2c91"
    creator_id: str = "10gg00000148QvgpaLAm"
    # SecMaster: the project and workspace, AK/SK, an IAM password user, a fixed token.
    project_id: str = "15645222e8744afa985c93dab6341da6"
    workspace_id: str = "75645d0a-93b8-4a7f-a77c-e97009389445"
    ak: str = "SANDBOXAKQTWAOYTTIND"
    sk: str = "sandboxSKMFyfvK41ba2giqM7Uio6PznpdUKGpow"
    username: str = "sandbox-user"
    password: str = "sandbox-password-9c1e"
    domain: str = "sandbox-account"
    region: str = "cn-north-4"
    user_id: str = "0b1e2d3c4f5a69788796a5b4c3d2e1f0"  # the IAM user behind every mode
    secmaster_token: str = "MIIsandbox-fixed-secmaster-token"
    # KooDrive: a bearer token, or app auth.
    koodrive_token: str = "sandbox-koodrive-token-8d2a"
    app_id: str = "sandbox-app"
    app_secret: str = "sandbox-app-secret-51e0"
    koodrive_user_id: str = "1395497048157130881"
    tenant_id: str = "d5ac574bd2934a69baa4f23c55daa8d4"


CREDENTIALS = Credentials()


class TokenStore:
    """Tokens issued by one token endpoint, each valid for `lifetime` seconds."""

    def __init__(self, prefix: str, lifetime: float, clock: Callable[[], float] = time.monotonic):
        self.prefix = prefix
        self.lifetime = lifetime
        self.clock = clock
        self._expiry: dict[str, float] = {}
        self.issued = 0

    def issue(self) -> str:
        now = self.clock()
        if len(self._expiry) > 1000:  # a long run issues many: forget the dead ones now and then
            self._expiry = {t: e for t, e in self._expiry.items() if e > now}
        token = self.prefix + secrets.token_urlsafe(32)
        self._expiry[token] = now + self.lifetime
        self.issued += 1
        return token

    def valid(self, token: str) -> bool:
        expiry = self._expiry.get(token)
        return expiry is not None and expiry > self.clock()

    def revoke_all(self) -> None:
        """Early expiry: every token issued so far stops working at once."""
        self._expiry.clear()


class Authenticator:
    def __init__(
        self,
        credentials: Credentials,
        aicc_tokens: TokenStore,
        iam_tokens: TokenStore,
        wall_clock: Callable[[], float] = time.time,
        aksk_lockout: float | None = None,
    ) -> None:
        self.credentials = credentials
        self.aicc_tokens = aicc_tokens
        self.iam_tokens = iam_tokens
        self.wall_clock = wall_clock
        # SecMaster locks an AK/SK for 5 minutes after five failed authentications in a row
        # (docs/upstream.md). Off unless asked for: it would make unrelated tests order-dependent.
        self.aksk_lockout = aksk_lockout
        self.aksk_failures = 0
        self._locked_until = 0.0

    def check_aicc(self, headers: Mapping[str, str]) -> str | None:
        token = headers.get("access-token")
        if not token:
            return "access-token header missing"
        if not self.aicc_tokens.valid(token):
            return "access-token is invalid or has expired"
        return None

    def check_secmaster(
        self,
        method: str,
        raw_path: str,
        headers: Mapping[str, str],
        body: bytes,
        project_in_path: str,
    ) -> str | None:
        token = headers.get("X-Auth-Token")
        if token is not None:
            if token == self.credentials.secmaster_token or self.iam_tokens.valid(token):
                return None
            return "X-Auth-Token is invalid or has expired"
        authorization = headers.get("Authorization")
        if not authorization:
            return "neither X-Auth-Token nor an AK/SK Authorization header"
        if self.aksk_lockout is not None and self.wall_clock() < self._locked_until:
            return f"the AK/SK is locked after {LOCKOUT_AFTER} failed authentications"
        denial = self._check_aksk(method, raw_path, headers, body, authorization, project_in_path)
        if denial is None:
            self.aksk_failures = 0
        elif self.aksk_lockout is not None and not denial.startswith(_NOT_OURS):
            self.aksk_failures += 1
            if self.aksk_failures >= LOCKOUT_AFTER:
                self.aksk_failures = 0
                self._locked_until = self.wall_clock() + self.aksk_lockout
        return denial

    def _check_aksk(
        self,
        method: str,
        raw_path: str,
        headers: Mapping[str, str],
        body: bytes,
        authorization: str,
        project_in_path: str,
    ) -> str | None:
        algorithm, fields = parse_authorization(authorization)
        if algorithm != "SDK-HMAC-SHA256":
            return f"unsupported signing algorithm {algorithm!r}"
        if fields.get("Access") != self.credentials.ak:
            return "access key not found"
        signed = [h for h in fields.get("SignedHeaders", "").split(";") if h]
        for required in ("host", "x-sdk-date", "x-project-id"):
            if required not in signed:
                return f"{required} is not among the signed headers"
        if signed != sorted(signed):
            return "SignedHeaders must be sorted"
        missing = [h for h in signed if headers.get(h) is None]
        if missing:
            return f"signed header {missing[0]} is missing"
        if headers.get("X-Project-Id") != project_in_path:
            return "X-Project-Id does not match the project in the path"
        stale = self._stale(headers["X-Sdk-Date"], allow_future=DATE_WINDOW)
        if stale:
            return f"X-Sdk-Date {stale}"
        path, _, query = raw_path.partition("?")
        signed_values = {h: headers[h] for h in signed}
        declared = headers.get(CONTENT_SHA256)
        if declared is not None:  # e.g. UNSIGNED-PAYLOAD: replaces the body's hash, as upstream
            signed_values[CONTENT_SHA256.lower()] = declared
        expected = sdk_signature(
            method, path, query_pairs(query), signed_values, signed, body, self.credentials.sk
        )
        if not hmac.compare_digest(expected, fields.get("Signature", "")):
            return "verify aksk signature fail"
        return None

    def check_koodrive(
        self, method: str, raw_path: str, headers: Mapping[str, str], body: bytes
    ) -> str | None:
        authorization = headers.get("Authorization")
        if not authorization:
            return "Authorization header missing"
        if authorization.startswith("Bearer "):
            token = authorization[len("Bearer ") :]
            if hmac.compare_digest(token, self.credentials.koodrive_token):
                return None
            return "bearer token is invalid"
        algorithm, fields = parse_authorization(authorization)
        if algorithm != "HMAC-SHA256":
            return "Authorization is neither 'Bearer <token>' nor HMAC-SHA256 app auth"
        if fields.get("AppId") != self.credentials.app_id:
            return "app id not found"
        if fields.get("SignedHeaders") != ";".join(APP_SIGNED):
            return f"SignedHeaders must be {';'.join(APP_SIGNED)}"
        missing = [h for h in APP_SIGNED if headers.get(h) is None]
        if missing:
            return f"header {missing[0]} is missing"
        if headers["X-User-Id"] != self.credentials.koodrive_user_id:
            return "X-User-Id does not match the app's user"
        stale = self._stale(headers["X-Date"], allow_future=FUTURE_SLACK)
        if stale:
            return f"X-Date {stale}"
        path, _, query = raw_path.partition("?")
        signed_values = {h: headers[h] for h in APP_SIGNED}
        expected = app_signature(
            method, path, query_pairs(query), signed_values, body, self.credentials.app_secret
        )
        if not hmac.compare_digest(expected, fields.get("Signature", "")):
            return "app signature does not match"
        return None

    def _stale(self, text: str, *, allow_future: float) -> str | None:
        try:
            moment = _parse_date(text).timestamp()
        except ValueError:
            return f"{text!r} is not YYYYMMDDTHHMMSSZ"
        skew = moment - self.wall_clock()
        if skew > allow_future:
            return f"{text} is {skew:.0f}s in the future"
        if -skew > DATE_WINDOW:
            return f"{text} is {-skew:.0f}s old; at most {DATE_WINDOW:.0f}s allowed"
        return None
