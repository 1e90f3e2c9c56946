"""Log lines: journald priority prefixes, terminal timestamps, context fields, redaction."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest

from worker import logs
from worker.logs import (
    bind_context,
    current_context,
    log_context,
    parse_level,
    redact,
    register_secret,
    setup_logging,
)

TIMESTAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


@pytest.fixture(autouse=True)
def isolated_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test gets its own secrets and leaves the root logger as it found it."""
    monkeypatch.setattr(logs, "_redactor", logs.Redactor(min_length=4))
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    quiet = {
        name: logging.getLogger(name).level for name in ("apscheduler", "aiosqlite", "asyncio")
    }
    access = logging.getLogger("aiohttp.access").disabled
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)
    for name, old in quiet.items():
        logging.getLogger(name).setLevel(old)
    logging.getLogger("aiohttp.access").disabled = access


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[TextIO]:
    with (tmp_path / "stderr.log").open("w+", encoding="utf-8") as stream:
        yield stream


def _journal(stream: TextIO, monkeypatch: pytest.MonkeyPatch) -> None:
    st = os.fstat(stream.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")


def _lines(stream: TextIO) -> list[str]:
    stream.flush()
    stream.seek(0)
    return stream.read().splitlines()


def test_journal_lines_carry_priorities_and_no_timestamps(
    log_file: TextIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    _journal(log_file, monkeypatch)
    setup_logging("DEBUG", stream=log_file)
    log = logging.getLogger("worker.sync")
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    log.critical("c")
    assert _lines(log_file) == [
        "<7>worker.sync: d",
        "<6>worker.sync: i",
        "<4>worker.sync: w",
        "<3>worker.sync: e",
        "<2>worker.sync: c",
    ]


def test_journal_tracebacks_keep_the_priority_on_every_line(
    log_file: TextIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    _journal(log_file, monkeypatch)
    setup_logging("info", stream=log_file)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("worker.actions").exception("apply failed")
    lines = _lines(log_file)
    assert lines[0] == "<3>worker.actions: apply failed"
    assert lines[1] == "<3>Traceback (most recent call last):"
    assert lines[-1] == "<3>RuntimeError: boom"
    assert all(line.startswith("<3>") for line in lines)


def test_another_journal_stream_means_terminal_format(
    log_file: TextIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")  # stderr was redirected away from journald
    setup_logging("info", stream=log_file)
    logging.getLogger("worker").info("hello")
    assert re.fullmatch(rf"{TIMESTAMP} INFO worker: hello", _lines(log_file)[0])


def test_terminal_lines_carry_iso_timestamps_and_levels(log_file: TextIO) -> None:
    setup_logging("warning", stream=log_file)
    log = logging.getLogger("worker.sync")
    log.info("not shown")
    log.warning("slow upstream: %d ms", 950)
    (line,) = _lines(log_file)
    assert re.fullmatch(rf"{TIMESTAMP} WARNING worker.sync: slow upstream: 950 ms", line)


def test_a_message_is_one_line(log_file: TextIO) -> None:
    setup_logging("info", stream=log_file)
    logging.getLogger("worker").info("upstream said: %s", "bad\nINFO forged line\r")
    (line,) = _lines(log_file)
    assert line.endswith("upstream said: bad\\nINFO forged line\\r")


def test_streams_without_a_file_descriptor_work(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    stream = io.StringIO()
    setup_logging("info", stream=stream)
    logging.getLogger("worker").info("in memory")
    assert stream.getvalue().endswith(" INFO worker: in memory\n")


def test_setup_twice_replaces_its_handler(log_file: TextIO) -> None:
    setup_logging("info", stream=io.StringIO())
    setup_logging("info", stream=log_file)
    logging.getLogger("worker").info("once")
    assert len(_lines(log_file)) == 1
    assert sum(isinstance(h, logs._Handler) for h in logging.getLogger().handlers) == 1


def test_context_fields_are_appended_for_the_keys_set(log_file: TextIO) -> None:
    setup_logging("info", stream=log_file)
    log = logging.getLogger("worker.sync")
    with log_context(system="aicc"):
        log.info("cycle")
        with log_context(task="XYZ", action=12):
            log.info("applied")
        with log_context(task="has space"):
            log.info("odd id")
    log.info("outside")
    lines = [line.split(": ", 1)[1] for line in _lines(log_file)]
    assert lines == [
        "cycle system=aicc",
        "applied system=aicc task=XYZ action=12",
        'odd id system=aicc task="has space"',
        "outside",
    ]
    assert current_context() == {}


@pytest.mark.anyio
async def test_bound_context_stays_in_its_asyncio_task(log_file: TextIO) -> None:
    setup_logging("info", stream=log_file)
    log = logging.getLogger("worker.actions")

    async def apply(action: int) -> None:
        bind_context(system="secmaster", action=action)
        await asyncio.sleep(0)
        log.info("applying")

    await asyncio.gather(apply(1), apply(2))
    log.info("done")
    lines = sorted(line.split(": ", 1)[1] for line in _lines(log_file))
    assert lines == [
        "applying system=secmaster action=1",
        "applying system=secmaster action=2",
        "done",
    ]


def test_secrets_are_redacted_in_messages_args_and_tracebacks(log_file: TextIO) -> None:
    setup_logging("debug", stream=log_file)
    register_secret("s3cr3t-token")
    register_secret("a/b+c=d")  # also hidden percent-encoded, as it travels in query strings
    register_secret("abc")  # too short: would blank ordinary words
    register_secret("")
    log = logging.getLogger("worker.upstreams")
    log.info("Authorization: Bearer s3cr3t-token")
    log.info("sending %s to %s", {"token": "s3cr3t-token"}, "https://x/?sk=a%2Fb%2Bc%3Dd")
    try:
        raise ValueError("rejected credential s3cr3t-token")
    except ValueError:
        log.exception("call failed with %s", "a/b+c=d")
    text = "\n".join(_lines(log_file))
    assert "s3cr3t" not in text
    assert "a/b+c=d" not in text and "a%2Fb%2Bc%3Dd" not in text
    assert "Bearer ***" in text
    assert "{'token': '***'} to https://x/?sk=***" in text
    assert "ValueError: rejected credential ***" in text
    assert "call failed with ***" in text
    assert redact("abc and ''") == "abc and ''"


def test_a_secret_containing_another_is_hidden_whole() -> None:
    register_secret("key1")
    register_secret("key1-and-more")
    assert redact("x key1-and-more y key1") == "x *** y ***"


@pytest.mark.parametrize(
    ("name", "level"), [("debug", 10), ("INFO", 20), (" Warning ", 30), ("error", 40)]
)
def test_level_names_are_case_insensitive(name: str, level: int) -> None:
    assert parse_level(name) == level


def test_a_bad_level_is_a_clear_value_error() -> None:
    with pytest.raises(
        ValueError, match="unknown log level 'loud': use debug, info, warning or error"
    ):
        setup_logging("loud")


def test_noisy_libraries_are_quieted_unless_debugging() -> None:
    setup_logging("info", stream=io.StringIO())
    assert logging.getLogger("apscheduler").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("aiosqlite").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("aiohttp.access").disabled
    setup_logging("debug", stream=io.StringIO())
    assert logging.getLogger("apscheduler").getEffectiveLevel() == logging.DEBUG
    assert logging.getLogger("aiosqlite").getEffectiveLevel() == logging.WARNING


def test_default_stream_is_stderr_at_call_time(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("info")
    logging.getLogger("worker").info("to stderr")
    assert capsys.readouterr().err.endswith(" INFO worker: to stderr\n")
