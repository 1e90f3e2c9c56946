"""`tasksync demo`: the README's first command, end to end in a subprocess."""

from __future__ import annotations

import re
import time
from pathlib import Path

from tests.support.cli import run_cli

KINDS = (
    "process",
    "comment",
    "delete-comment",
    "add-attachment",
    "delete-attachment",
    "terminate",
    "continue",
)


def test_demo_applies_every_action_kind(tmp_path: Path) -> None:
    started = time.monotonic()
    # TMPDIR: the demo keeps its database in a fresh temporary directory; keep it in ours
    result = run_cli("demo", env={"TMPDIR": str(tmp_path)}, cwd=tmp_path, timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    assert elapsed < 60
    out = result.stdout
    rows = re.findall(r"^\s+(\d+)\s+(aicc|secmaster)\s+(\S+)\s+(\S+)\s+(\w+)$", out, re.M)
    assert sorted(kind for _, _, kind, _, _ in rows) == sorted(KINDS)
    assert {status for *_, status in rows} == {"succeeded"}
    for section in ("Snapshots stored per system", "Events by kind", "SELECT"):
        assert section in out
    assert re.search(r"second sync: 36 polled, [1-9]\d* changed, 0 failed", out)
    databases = list(tmp_path.glob("tasksync-demo-*/demo.db"))
    assert len(databases) == 1 and str(databases[0]) in out
    assert result.stderr == ""
