"""IAM's password token endpoint (`POST /v3/auth/tokens`), enough of it for SecMaster auth B."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiohttp import web

from worker.sandbox.auth import Credentials, TokenStore


def _iam_error(status: int, title: str, message: str) -> web.Response:
    # Keystone's error shape, which IAM answers with.
    body = {"error": {"code": status, "message": message, "title": title}}
    return web.Response(
        status=status, body=orjson.dumps(body), headers={"Content-Type": "application/json"}
    )


def _dig(data: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def iam_token_response(creds: Credentials, tokens: TokenStore, body: bytes) -> web.Response:
    """201 with the token in `X-Subject-Token`; 400 for a malformed body; 401 for a wrong
    user, password, account or scope."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _iam_error(400, "Bad Request", "The request body is not valid JSON.")
    identity = _dig(data, "auth", "identity")
    methods = _dig(identity, "methods")
    user = _dig(identity, "password", "user")
    if not isinstance(methods, list) or "password" not in methods or not isinstance(user, dict):
        return _iam_error(400, "Bad Request", "auth.identity needs methods [password] and a user.")
    project = _dig(data, "auth", "scope", "project")
    if (
        user.get("name") != creds.username
        or user.get("password") != creds.password
        or _dig(user, "domain", "name") != creds.domain
    ):
        return _iam_error(401, "Unauthorized", "The username or password is wrong.")
    if not isinstance(project, dict) or (
        project.get("name") != creds.region and project.get("id") != creds.project_id
    ):
        return _iam_error(401, "Unauthorized", "The project in the scope is not accessible.")
    issued = datetime.now(UTC)
    expires = issued + timedelta(seconds=tokens.lifetime)
    domain = {"name": creds.domain, "id": creds.user_id[::-1]}
    token = {
        "expires_at": expires.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "issued_at": issued.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "methods": ["password"],
        "catalog": [],
        "roles": [{"name": "te_admin", "id": "0"}],
        "project": {"name": creds.region, "id": creds.project_id, "domain": domain},
        "user": {
            "name": creds.username,
            "id": creds.user_id,
            "domain": domain,
            "password_expires_at": "",
        },
    }
    return web.Response(
        status=201,
        body=orjson.dumps({"token": token}),
        headers={"Content-Type": "application/json", "X-Subject-Token": tokens.issue()},
    )
