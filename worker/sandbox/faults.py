"""Fault injection: what can go wrong on the wire, as data (`FaultSpec`) plus a seeded dice roller.

One draw per request decides at most one fault, so the configured probabilities are exactly the
rates a client sees (they must add up to at most 1). Token endpoints are exempt: a client that
cannot even get a token tests nothing interesting, and early expiry has its own knob (`expire`).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Final, Literal

Fault = Literal["500", "429", "429-no-retry-after", "slow", "drop", "malformed"]

# Order matters: it is the order of the cumulative draw, so a seeded run is reproducible.
FAULTS: Final[tuple[Fault, ...]] = ("500", "429", "429-no-retry-after", "slow", "drop", "malformed")

# Spec-string names -> dataclass fields.
_RATE_FIELDS: Final[dict[str, str]] = {
    "500": "error_500",
    "429": "throttle",
    "429-no-retry-after": "throttle_no_retry_after",
    "slow": "slow",
    "drop": "drop",
    "malformed": "malformed",
}
_DEFAULT_SLOW: Final = 3.0


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """Per-request fault probabilities (0..1, summing to at most 1) and two parameters.

    - error_500: HTTP 500 and nothing applied.
    - throttle / throttle_no_retry_after: HTTP 429 (APIGW.0308) with / without `Retry-After: 1`.
    - slow: answer after `slow_seconds` (a write is applied first).
    - drop: close the connection without an answer (a write is applied first: the
      "unknown outcome" case).
    - malformed: HTTP 200 with a truncated JSON body (a write is applied first).
    - expire: every `expire` requests, every issued AICC and IAM token dies early.
    - down: systems that are down: `secmaster` drops every connection without an answer (the
      sandbox serves all three systems on one port, so it cannot refuse one system's
      connections: this is the nearest), `secmaster:503` answers 503 to every request.
    """

    error_500: float = 0.0
    throttle: float = 0.0
    throttle_no_retry_after: float = 0.0
    slow: float = 0.0
    drop: float = 0.0
    malformed: float = 0.0
    expire: int | None = None
    slow_seconds: float = _DEFAULT_SLOW
    down: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in _RATE_FIELDS.values():
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability between 0 and 1, not {value}")
        if sum(self.rates()) > 1.0 + 1e-9:
            raise ValueError("fault probabilities add up to more than 1")
        if self.expire is not None and self.expire < 1:
            raise ValueError(f"expire must be a positive number of requests, not {self.expire}")
        if not 0.0 <= self.slow_seconds <= 3600.0:
            raise ValueError(f"slow-seconds must be between 0 and 3600, not {self.slow_seconds}")
        for item in self.down:
            system, _, mode = item.partition(":")
            if system not in ("aicc", "secmaster", "koodrive") or mode not in ("", "503"):
                raise ValueError(
                    f"down={item}: expected a system (aicc, secmaster, koodrive), "
                    "optionally with :503"
                )

    def down_mode(self, system: str) -> str | None:
        """None when the system is up; "drop" or "503" when it is down."""
        for item in self.down:
            name, _, mode = item.partition(":")
            if name == system:
                return mode or "drop"
        return None

    def rates(self) -> tuple[float, ...]:
        """Probabilities in the order of FAULTS."""
        return tuple(getattr(self, _RATE_FIELDS[fault]) for fault in FAULTS)

    @property
    def active(self) -> bool:
        return any(self.rates()) or self.expire is not None

    @classmethod
    def parse(cls, text: str) -> FaultSpec:
        """Parse `"500=0.1,429=0.05,slow=0.05,slow-seconds=3,expire=300"` (empty: no faults).

        Raises ValueError naming the offending item.
        """
        values: dict[str, float | int] = {}
        down: list[str] = []
        for raw in text.split(","):
            item = raw.strip()
            if not item:
                continue
            name, sep, value = (part.strip() for part in item.partition("="))
            if not sep or not value:
                raise ValueError(f"fault item {item!r}: expected NAME=VALUE")
            try:
                if name == "down":
                    down.append(value)
                elif name == "expire":
                    values["expire"] = int(value)
                elif name == "slow-seconds":
                    values["slow_seconds"] = float(value)
                elif name in _RATE_FIELDS:
                    values[_RATE_FIELDS[name]] = float(value)
                else:
                    known = ", ".join((*_RATE_FIELDS, "expire", "slow-seconds", "down"))
                    raise ValueError(f"fault item {item!r}: unknown fault {name!r} ({known})")
            except ValueError as exc:
                if "fault item" in str(exc):
                    raise
                raise ValueError(f"fault item {item!r}: {value!r} is not a number") from None
        try:
            return cls(**values, down=tuple(down))  # type: ignore[arg-type]
        except ValueError as exc:
            raise ValueError(f"fault spec {text!r}: {exc}") from None

    def __str__(self) -> str:
        """The spec-string form; `FaultSpec.parse(str(spec)) == spec`."""
        items = [
            f"{fault}={rate:g}" for fault, rate in zip(FAULTS, self.rates(), strict=True) if rate
        ]
        if self.expire is not None:
            items.append(f"expire={self.expire}")
        if self.slow_seconds != _DEFAULT_SLOW:
            items.append(f"slow-seconds={self.slow_seconds:g}")
        items += [f"down={item}" for item in self.down]
        return ",".join(items)


class FaultInjector:
    """Draws faults for requests and counts them. `spec` can be swapped at any time."""

    def __init__(self, spec: FaultSpec | None = None, seed: int = 0) -> None:
        self.spec = spec or FaultSpec()
        self.rng = random.Random(f"faults:{seed}")
        self.injected: Counter[str] = Counter()  # fault name (and "expire") -> times it fired
        self.eligible = 0  # requests that were subject to a draw

    def draw(self) -> tuple[Fault | None, bool]:
        """One request's fault (or None) and whether tokens must expire now."""
        spec = self.spec
        if not spec.active:  # the common, fast path: no dice, no counters
            return None, False
        self.eligible += 1
        expire = spec.expire is not None and self.eligible % spec.expire == 0
        if expire:
            self.injected["expire"] += 1
        roll = self.rng.random()
        for fault, rate in zip(FAULTS, spec.rates(), strict=True):
            if roll < rate:
                self.injected[fault] += 1
                return fault, expire
            roll -= rate
        return None, expire
