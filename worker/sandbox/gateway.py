"""The API gateway in front of the simulated systems: throttling policies over fixed windows.

Huawei's gateway counts the requests of an API per credential in fixed windows and answers
429 `APIGW.0308` once a window's limit is spent, before the service sees the request
(docs/upstream.md). `--throttle aicc=40/1s,secmaster=100/1s,koodrive=600/1m` sets one policy
per system; windows are aligned to the epoch, like a fixed-window counter on a real gateway.
Token endpoints are exempt (they are other APIs, with their own limits).
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

from worker.model import SYSTEMS

_ITEM: Final = re.compile(r"^\s*(\w+)\s*=\s*(\d+)\s*/\s*(\d*)\s*([smhd])\s*$")
_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_WORDS: Final = {1: "second", 60: "minute", 3600: "hour", 86400: "day"}


@dataclass(frozen=True, slots=True)
class Throttle:
    limit: int
    count: int  # the window is `count` units
    unit: str  # s, m, h or d

    @property
    def window(self) -> int:
        return self.count * _SECONDS[self.unit]

    def message(self) -> str:
        """The gateway's own words, e.g. `...limit:40,time:1 second`."""
        word = _WORDS[_SECONDS[self.unit]]
        return (
            "The throttling threshold has been reached: policy user over ratelimit,"
            f"limit:{self.limit},time:{self.count} {word}"
        )

    def __str__(self) -> str:
        return f"{self.limit}/{self.count}{self.unit}"


def parse_throttle(text: str) -> dict[str, Throttle]:
    """`aicc=40/1s,koodrive=600/1m` (empty: no throttling). Raises ValueError naming the item."""
    policies: dict[str, Throttle] = {}
    for raw in text.split(","):
        if not raw.strip():
            continue
        match = _ITEM.match(raw)
        if match is None:
            raise ValueError(
                f"throttle item {raw.strip()!r}: expected SYSTEM=LIMIT/WINDOW, e.g. aicc=40/1s "
                "(window units s, m, h, d)"
            )
        system, limit, count, unit = match[1], int(match[2]), int(match[3] or 1), match[4]
        if system not in SYSTEMS:
            raise ValueError(
                f"throttle item {raw.strip()!r}: unknown system {system!r} ({', '.join(SYSTEMS)})"
            )
        if limit < 1 or count < 1:
            raise ValueError(f"throttle item {raw.strip()!r}: limit and window must be positive")
        policies[system] = Throttle(limit, count, unit)
    return policies


@dataclass
class Gateway:
    """Fixed-window counters per system; `admit` says whether a request gets through."""

    policies: Mapping[str, Throttle] = field(default_factory=dict)
    clock: Callable[[], float] = time.time
    refused: Counter[str] = field(default_factory=Counter)  # 429s answered, per system
    admitted: Counter[str] = field(default_factory=Counter)
    _windows: dict[str, tuple[int, int]] = field(default_factory=dict)  # system -> (window, n)

    def admit(self, system: str) -> Throttle | None:
        """None when the request may pass; the policy it broke otherwise."""
        policy = self.policies.get(system)
        if policy is None:
            return None
        window = int(self.clock() // policy.window)
        current, used = self._windows.get(system, (window, 0))
        if current != window:
            used = 0
        if used >= policy.limit:
            self.refused[system] += 1
            return policy
        self._windows[system] = (window, used + 1)
        self.admitted[system] += 1
        return None
