"""The systemd notify protocol (sd_notify(3)) and the liveness gate behind the watchdog.

Written here rather than taken from PyPI: the packages there (sdnotify, systemd-python,
cysystemd) are unmaintained or need a C build against libsystemd, and the protocol is one
datagram of newline-separated `KEY=value` fields sent to the socket named by $NOTIFY_SOCKET.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

from worker.text import one_line

log = logging.getLogger(__name__)

# A datagram to PID 1 normally goes through at once; the timeout only bounds the pathological case
# of a full receive queue, so that the event loop is never blocked for long (the message is then
# dropped and logged, as libsystemd's callers do with its error code).


def _socket_address(value: str) -> str | None:
    """The address for sendto(): a filesystem path, or `@name` for the abstract namespace."""
    if value.startswith("@"):
        return "\0" + value[1:]  # abstract socket: a leading NUL byte instead of the `@`
    if value.startswith("/"):
        return value
    return None  # vsock:... (systemd 254+, VMs) and anything else: not supported here


def _one_line(text: str) -> str:
    # A field ends at a newline: a multi-line status would turn its later lines into fields.
    return one_line(text, 1000)


class Notifier:
    """Sends state changes to systemd. A no-op when $NOTIFY_SOCKET is unset; never raises."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self._address = _socket_address(raw) if raw else None
        if raw and self._address is None:
            log.debug("NOTIFY_SOCKET=%r is not a path or @abstract name: not notifying", raw)
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *fields: str) -> bool:
        """Send `KEY=value` fields in one datagram; True when it was sent."""
        if self._address is None or not fields:
            return False
        message = "\n".join(fields).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # Never block the event loop: a full notify queue drops the message instead
                # (systemd drains its socket promptly; a test that does not read it would not).
                self._sock.setblocking(False)
            self._sock.sendto(message, self._address)
        except OSError as exc:
            log.debug("sd_notify %s failed: %s", fields[0].partition("=")[0], exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        fields = ["READY=1"] + ([f"STATUS={_one_line(status)}"] if status is not None else [])
        return self.notify(*fields)

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        fields = ["STOPPING=1"] + ([f"STATUS={_one_line(status)}"] if status is not None else [])
        return self.notify(*fields)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(
    environ: Mapping[str, str] | None = None, pid: int | None = None
) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec=), or None when not asked for.

    $WATCHDOG_PID names the process the watchdog is meant for; when it is set to another pid
    (a child that inherited the environment), this process must not ping.
    """
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = env.get("WATCHDOG_PID")
    if owner:
        try:
            if int(owner) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return usec / 2_000_000


class Liveness:
    """Which loops have shown progress lately: the gate for WATCHDOG=1.

    Pinging from a timer alone would prove only that the event loop turns; a loop stuck on a
    lost lock or a hung await would go unnoticed. Each loop instead calls `beat(name)` whenever
    it completes a unit of work *and* between idle sleeps (so it sleeps in slices shorter than
    `max_silence`), and the watchdog task pings only while `healthy()`. When a loop wedges, the
    pings stop and systemd restarts the service after WatchdogSec.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last: dict[str, float] = {}

    def register(self, name: str, now: float | None = None) -> None:
        """Start watching a loop: it counts as having beaten now."""
        self._last[name] = self._clock() if now is None else now

    def beat(self, name: str, now: float | None = None) -> None:
        self._last[name] = self._clock() if now is None else now

    def unregister(self, name: str) -> None:
        """Stop watching a loop that has finished on purpose (for example, during shutdown)."""
        self._last.pop(name, None)

    def stale(self, now: float, max_silence: float) -> list[str]:
        """The loops silent for longer than max_silence seconds, by name."""
        return sorted(name for name, last in self._last.items() if now - last > max_silence)

    def healthy(self, now: float, max_silence: float) -> bool:
        return not self.stale(now, max_silence)


def ping_if_healthy(notifier: Notifier, liveness: Liveness, now: float, max_silence: float) -> bool:
    """One watchdog tick: ping when every loop made progress, else log which ones did not."""
    stale = liveness.stale(now, max_silence)
    if stale:
        log.warning(
            "no progress for over %gs from %s: withholding the watchdog ping",
            max_silence,
            ", ".join(stale),
        )
        return False
    return notifier.watchdog()
