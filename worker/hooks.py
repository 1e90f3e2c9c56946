"""Test-only fault points, read once from the environment where a process is assembled
(`worker.cli`) and handed to the parts that honour them. Never set them in production.

    TASKSYNC_TEST_CRASH_AT=POINT       the action runner SIGKILLs its own process at POINT of a
                                       batch: "after-attempt" (recorded, not sent) or
                                       "after-answer" (applied upstream, not yet recorded)
    TASKSYNC_TEST_WEDGE=LOOP[:SECONDS[:LENGTH]]
                                       the daemon's LOOP blocks without beating, SECONDS after
                                       start-up, for ever (or LENGTH seconds, once), so the
                                       watchdog pings stop (and /livez recovers)
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass

CRASH_ENV = "TASKSYNC_TEST_CRASH_AT"
WEDGE_ENV = "TASKSYNC_TEST_WEDGE"


@dataclass(frozen=True, slots=True)
class Hooks:
    crash_at: str | None = None
    # (loop name, seconds after start-up, how long: None for ever)
    wedge: tuple[str, float, float | None] | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Hooks:
        return cls(
            crash_at=environ.get(CRASH_ENV) or None, wedge=_wedge(environ.get(WEDGE_ENV, ""))
        )

    def crash_point(self, name: str) -> None:
        if name == self.crash_at:
            os.kill(os.getpid(), signal.SIGKILL)


def _wedge(value: str) -> tuple[str, float, float | None] | None:
    name, _, rest = value.strip().partition(":")
    if not name:
        return None
    after, _, length = rest.partition(":")
    try:
        return name, float(after or 0), float(length) if length else None
    except ValueError:
        return name, 0.0, None
