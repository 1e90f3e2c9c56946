"""The one way tests run the real `tasksync` command: `python -m worker` in a subprocess.

Every run gets `clean_env()`: the outer environment without anything that would configure
tasksync behind the test's back (TASKSYNC_* variables, systemd's credentials and state
directories, its notify and watchdog sockets), plus what the test passes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

# What systemd sets for a service: a test that wants one passes it explicitly.
SYSTEMD_VARIABLES = ("CREDENTIALS_DIRECTORY", "STATE_DIRECTORY", "NOTIFY_SOCKET", "WATCHDOG_")


def tasksync_argv(*args: str | bytes) -> list[str | bytes]:
    """The command line of `tasksync ARGS...` (bytes for arguments that are not UTF-8)."""
    return [sys.executable, "-m", "worker", *args]


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("TASKSYNC_", *SYSTEMD_VARIABLES))
    }
    env.update(extra or {})
    return env


def run_cli(
    *args: str | bytes,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 60,
    input: str | None = None,
    text: bool = True,
) -> subprocess.CompletedProcess[Any]:
    """Run the command to completion; stdout and stderr captured (text unless `text=False`)."""
    return subprocess.run(
        tasksync_argv(*args),
        capture_output=True,
        text=text,
        env=clean_env(env),
        cwd=cwd,
        timeout=timeout,
        input=input,
        check=False,
    )


async def run_cli_async(
    *args: str, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[bytes]:
    """`run_cli` for tests whose event loop must keep serving (a sandbox in the same loop)."""
    return await anyio.run_process(tasksync_argv(*args), env=clean_env(env), cwd=cwd, check=False)


async def open_cli(
    *args: str, env: Mapping[str, str] | None = None, **kwargs: Any
) -> anyio.abc.Process:
    """Start the command in the background, in the test's event loop (a daemon, a killed run)."""
    return await anyio.open_process(tasksync_argv(*args), env=clean_env(env), **kwargs)


def spawn_cli(
    *args: str, env: Mapping[str, str] | None = None, **kwargs: Any
) -> subprocess.Popen[Any]:
    """Start the command in the background from synchronous code."""
    return subprocess.Popen(tasksync_argv(*args), env=clean_env(env), **kwargs)
