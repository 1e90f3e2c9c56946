"""The one redactor: replaces known secrets with `***` in text about to leave the process.

Used twice over: the logging formatter holds one for every configured secret (worker.logs),
and each upstream client holds one for its own credentials and the tokens it is issued, so an
error message is clean before it reaches `last_error` in the database.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import quote, quote_plus

import orjson
from pydantic import SecretStr

MASK = "***"


def secret_value(secret: SecretStr | str | None) -> str | None:
    if secret is None:
        return None
    return secret.get_secret_value() if isinstance(secret, SecretStr) else secret


class Redactor:
    """Known secrets, in every form they travel in (raw, percent-, plus- and JSON-escaped),
    matched by one regular expression.

    The pattern is rebuilt when a secret is added (rare) and swapped in one assignment, so a
    thread that logs while a secret is being added sees the old or the new pattern, never a
    half-built one. Values shorter than `min_length` are ignored: masking every "ab" in a log
    would hide more than it protects.
    """

    def __init__(
        self, secrets: Iterable[SecretStr | str | None] = (), *, min_length: int = 1
    ) -> None:
        self._min_length = min_length
        self._forms: frozenset[str] = frozenset()
        self._pattern: re.Pattern[str] | None = None
        for secret in secrets:
            self.add(secret)

    def add(self, secret: SecretStr | str | None) -> None:
        value = (secret_value(secret) or "").strip()
        if len(value) < self._min_length:
            return
        escaped = orjson.dumps(value).decode()[1:-1]
        forms = {value, quote(value, safe=""), quote_plus(value), escaped}
        if forms <= self._forms:
            return
        every = self._forms | forms
        # Longest first, so a secret that contains another is replaced whole.
        alternatives = sorted(every, key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(s) for s in alternatives))
        self._forms = every

    def __call__(self, text: str) -> str:
        pattern = self._pattern
        return text if pattern is None else pattern.sub(MASK, text)
