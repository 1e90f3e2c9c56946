"""Logging: one line per record on stderr, journald-aware, with task context and redaction.

(A traceback follows its record on further lines; under journald each of them carries the
record's priority.)

Under systemd, stderr is a journald stream: a `<N>` prefix sets each line's priority and
journald stamps the time itself. Elsewhere lines carry a local ISO timestamp. The context of
the work in hand (system, task, action) is kept in a contextvar, so each asyncio task logs its
own without passing loggers around. Registered secrets are replaced by `***` in the final text
of every line, which covers the message, its arguments, context and tracebacks in one place.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType
from typing import TextIO

from worker.redact import Redactor

LEVELS: Mapping[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
# syslog priorities understood by journald in a `<N>` line prefix (sd-daemon(3)).
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
_CONTEXT_KEYS = ("system", "task", "action")
_MIN_SECRET_LENGTH = 4  # shorter values would blank out ordinary words and digits

# An immutable default: every binding makes a new mapping, so no context ever mutates another's.
_context: ContextVar[Mapping[str, str]] = ContextVar(
    "tasksync_log_context", default=MappingProxyType({})
)


def parse_level(name: str) -> int:
    """A level number from its name, case-insensitively; ValueError names the choices."""
    level = LEVELS.get(name.strip().lower())
    if level is None:
        raise ValueError(f"unknown log level {name!r}: use debug, info, warning or error")
    return level


# -- context ---------------------------------------------------------------------------------


def _fields(system: str | None, task: str | None, action: int | str | None) -> dict[str, str]:
    given = {"system": system, "task": task, "action": action}
    return {key: str(value) for key, value in given.items() if value is not None}


@contextmanager
def log_context(
    *, system: str | None = None, task: str | None = None, action: int | str | None = None
) -> Iterator[None]:
    """Add fields to every line logged inside the block (keys left None keep their value)."""
    token = _context.set({**_context.get(), **_fields(system, task, action)})
    try:
        yield
    finally:
        _context.reset(token)


def bind_context(
    *, system: str | None = None, task: str | None = None, action: int | str | None = None
) -> None:
    """Add fields for the rest of the current context: an asyncio task owns a copy of its
    context, so binding at the top of a task's coroutine does not leak into other tasks."""
    _context.set({**_context.get(), **_fields(system, task, action)})


def current_context() -> Mapping[str, str]:
    return _context.get()


def _quote(value: str) -> str:
    if value and not any(c.isspace() or c in '="' for c in value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _format_context(fields: Mapping[str, str]) -> str:
    return "".join(f" {key}={_quote(fields[key])}" for key in _CONTEXT_KEYS if key in fields)


# -- redaction -------------------------------------------------------------------------------


_redactor = Redactor(min_length=_MIN_SECRET_LENGTH)


def register_secret(value: str | None) -> None:
    """Hide this value in every log line from now on (values under 4 characters are ignored)."""
    if value:
        _redactor.add(value)


def redact(text: str) -> str:
    """The text with every registered secret replaced by `***`."""
    return _redactor(text)


# -- formatting ------------------------------------------------------------------------------


def _priority(levelno: int) -> int:
    for threshold, priority in _PRIORITIES:
        if levelno >= threshold:
            return priority
    return 7


def _escape_newlines(text: str) -> str:
    # A message is one line: text from upstream bodies must not be able to forge extra records.
    return text.replace("\r", "\\r").replace("\n", "\\n")


class LineFormatter(logging.Formatter):
    """`<N>name: message ctx` for journald, `YYYY-MM-DD HH:MM:SS LEVEL name: message ctx` else."""

    def __init__(self, journal: bool) -> None:
        super().__init__()
        self.journal = journal

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))

    def format(self, record: logging.LogRecord) -> str:
        # The context is read here, in the thread and task that logged: the handler writes
        # synchronously. A queue-based handler would have to capture it at record creation.
        message = _escape_newlines(record.getMessage()) + _format_context(_context.get())
        if self.journal:
            head = f"{record.name}: {message}"
        else:
            head = f"{self.formatTime(record)} {record.levelname} {record.name}: {message}"
        extra = []
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            extra.append(record.exc_text)
        if record.stack_info:
            extra.append(self.formatStack(record.stack_info))
        text = redact("\n".join([head, *extra]))
        if self.journal:
            # journald takes each line as its own entry: prefix every line of a traceback too,
            # so that it keeps the record's priority instead of falling back to info.
            prefix = f"<{_priority(record.levelno)}>"
            text = "\n".join(prefix + line for line in text.split("\n"))
        return text


def is_journal_stream(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """Whether `stream` is the journald stream systemd connected ($JOURNAL_STREAM=dev:ino)."""
    env = os.environ if environ is None else environ
    expected = env.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # io.StringIO and closed streams have no fd
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


class _Handler(logging.StreamHandler[TextIO]):
    """Marks the handler setup_logging installs, so that calling it again replaces it."""


# Libraries whose INFO/DEBUG output is noise for an operator: level in normal runs, in debug runs.
_QUIET: Mapping[str, tuple[int, int]] = {
    "apscheduler": (logging.WARNING, logging.DEBUG),  # one line per job run otherwise
    "aiosqlite": (logging.WARNING, logging.WARNING),  # logs every statement at DEBUG
    "asyncio": (logging.WARNING, logging.DEBUG),
    "alembic": (logging.WARNING, logging.DEBUG),  # "setup plugin" lines on every start
}


def setup_logging(level: str, stream: TextIO | None = None) -> logging.Handler:
    """Log to `stream` (stderr at call time by default) at `level`; safe to call again.

    Raises ValueError for an unknown level name (the CLI turns it into exit status 2).
    """
    levelno = parse_level(level)
    target = sys.stderr if stream is None else stream
    handler = _Handler(target)
    handler.setFormatter(LineFormatter(journal=is_journal_stream(target)))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(levelno)
    debug = levelno <= logging.DEBUG
    for name, (normal, verbose) in _QUIET.items():
        logging.getLogger(name).setLevel(verbose if debug else normal)
    logging.getLogger("aiohttp.access").disabled = True  # the sandbox's per-request lines
    return handler
