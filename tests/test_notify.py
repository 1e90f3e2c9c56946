"""sd_notify over real AF_UNIX datagram sockets; the watchdog interval; the liveness gate."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.notify import Liveness, Notifier, ping_if_healthy, watchdog_interval


def _receiver(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    address = str(tmp_path / "notify.sock")
    with _receiver(address) as sock:
        yield address, sock


@pytest.fixture
def abstract_socket() -> Iterator[tuple[str, socket.socket]]:
    name = f"tasksync-test-{uuid.uuid4().hex}"
    with _receiver("\0" + name) as sock:
        yield "@" + name, sock


def test_messages_reach_a_filesystem_socket(path_socket: tuple[str, socket.socket]) -> None:
    address, sock = path_socket
    notifier = Notifier({"NOTIFY_SOCKET": address})
    assert notifier.enabled
    try:
        assert notifier.ready()
        assert sock.recv(4096) == b"READY=1"
        assert notifier.status("syncing\n42 tasks")
        assert sock.recv(4096) == b"STATUS=syncing 42 tasks"
        assert notifier.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
        assert notifier.stopping("draining")
        assert sock.recv(4096) == b"STOPPING=1\nSTATUS=draining"
    finally:
        notifier.close()


def test_messages_reach_an_abstract_socket(abstract_socket: tuple[str, socket.socket]) -> None:
    address, sock = abstract_socket
    notifier = Notifier({"NOTIFY_SOCKET": address})
    try:
        assert notifier.ready(status="3 loops running")
        assert sock.recv(4096) == b"READY=1\nSTATUS=3 loops running"
    finally:
        notifier.close()


def test_reads_notify_socket_from_the_process_environment(
    path_socket: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    address, sock = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    notifier = Notifier()
    try:
        assert notifier.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
    finally:
        notifier.close()


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "vsock:2:9"}])
def test_is_a_no_op_without_a_usable_socket(environ: dict[str, str]) -> None:
    notifier = Notifier(environ)
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.watchdog()
    notifier.close()


def test_send_errors_are_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")})
    with caplog.at_level(logging.DEBUG, logger="worker.notify"):
        assert not notifier.ready()
    notifier.close()
    assert any("READY failed" in r.getMessage() for r in caplog.records)
    assert all(r.levelno == logging.DEBUG for r in caplog.records)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "60000000"}, 30.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "4242"}, 30.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "500000"}, 0.25),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(environ, pid=4242) == expected


def test_watchdog_interval_defaults_to_our_own_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 10.0


def test_liveness_is_healthy_only_while_every_loop_beats() -> None:
    liveness = Liveness(clock=lambda: 0.0)
    assert liveness.healthy(now=1000.0, max_silence=10.0)  # nothing registered yet
    liveness.register("sync", now=0.0)
    liveness.register("actions", now=0.0)
    assert liveness.healthy(now=10.0, max_silence=10.0)
    liveness.beat("sync", now=15.0)
    assert not liveness.healthy(now=15.0, max_silence=10.0)
    assert liveness.stale(now=15.0, max_silence=10.0) == ["actions"]
    liveness.beat("actions", now=16.0)
    assert liveness.healthy(now=20.0, max_silence=10.0)
    assert liveness.stale(now=30.0, max_silence=10.0) == ["actions", "sync"]
    liveness.unregister("sync")
    liveness.unregister("actions")
    assert liveness.healthy(now=1000.0, max_silence=10.0)


def test_liveness_reads_its_clock_when_no_time_is_given() -> None:
    now = [100.0]
    liveness = Liveness(clock=lambda: now[0])
    liveness.register("discover")
    now[0] = 105.0
    liveness.beat("discover")
    assert liveness.healthy(now=110.0, max_silence=5.0)
    assert not liveness.healthy(now=110.5, max_silence=5.0)


def test_ping_only_when_healthy(
    path_socket: tuple[str, socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    address, sock = path_socket
    notifier = Notifier({"NOTIFY_SOCKET": address})
    liveness = Liveness()
    liveness.register("sync", now=0.0)
    try:
        assert ping_if_healthy(notifier, liveness, now=5.0, max_silence=10.0)
        assert sock.recv(4096) == b"WATCHDOG=1"
        with caplog.at_level(logging.WARNING, logger="worker.notify"):
            assert not ping_if_healthy(notifier, liveness, now=11.0, max_silence=10.0)
        assert "sync" in caplog.text
        sock.settimeout(0.05)
        with pytest.raises(TimeoutError):
            sock.recv(4096)
    finally:
        notifier.close()
