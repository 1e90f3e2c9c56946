"""Contract: a bad configuration exits 78 naming the key.

Black box: the real `tasksync` command in a subprocess (see tests/contract/__init__.py).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support.contract import (
    ok,
    parallel,
    tasksync,
)

AICC_OK = 'base_url = "https://aicc.example.com"\nclient_id = "c"\nclient_secret = "s"\n'
SM_BASE = 'base_url = "https://sm.example.com"\nproject_id = "p"\nworkspace_id = "w"\n'
SM_NO_PROJECT = 'base_url = "https://sm.example.com"\nworkspace_id = "w"\n'


def test_bad_configuration_exits_78_naming_the_key(tmp_path: Path) -> None:
    cases: list[tuple[str, dict[str, str], list[str]]] = [
        # (file body, environment, words the message must contain)
        ("[worker]\nconcurency = 3\n", {}, ["worker.concurency"]),
        ("", {"TASKSYNC_WORKER__CONCURENCY": "3"}, ["concurency", "TASKSYNC_WORKER__CONCURENCY"]),
        (
            '[systems.aicc]\nbase_url = "https://a.example"\nclient_id = "c"\n',
            {},
            ["client_secret"],
        ),
        ('[systems.aicc]\nclient_id = "c"\nclient_secret = "s"\n', {}, ["base_url"]),
        ("[systems.secmaster]\n" + SM_NO_PROJECT + 'token = "t"\n', {}, ["project_id"]),
        (f'[systems.secmaster]\n{SM_BASE}ak = "a"\nsk = "s"\ntoken = "t"\n', {}, ["secmaster"]),
        (
            '[systems.koodrive]\nbase_url = "https://k.example"\ntoken = "t"\napp_id = "a"\n'
            'app_secret = "s"\nuser_id = "u"\n',
            {},
            ["koodrive"],
        ),
        (
            '[systems.koodrive]\nbase_url = "http://koodrive.example.com"\ntoken = "t"\n',
            {},
            ["base_url"],
        ),
        ("[systems.aicc]\n" + AICC_OK + 'colour = "blue"\n', {}, ["colour"]),
        ("[nosuch]\nx = 1\n", {}, ["nosuch"]),
        ('[worker]\npoll_interval = "5 minutes"\n', {}, ["poll_interval"]),
        ('[worker]\nsync_schedule = "*/5 * * *"\n', {}, ["sync_schedule"]),
        ('[worker]\ndiscover_schedule = "often"\n', {}, ["discover_schedule"]),
        ('[retry]\nmax_attempts = "many"\n', {}, ["max_attempts"]),
        ("", {"TASKSYNC_SYSTEMS__KOODRIVE__BASE_URL": "http://10.0.0.1"}, ["base_url"]),
        ("", {"TASKSYNC_SYSTEMS__AICC__BASE_URL": "https://a.example"}, ["client_id"]),
    ]

    def check(i: int, body: str, env: dict[str, str], words: list[str]) -> str | None:
        d = tmp_path / f"c{i}"
        d.mkdir()
        cfg = d / "tasksync.toml"
        cfg.write_text(f'[database]\nurl = "sqlite:///{d / "x.db"}"\n' + body)
        cfg.chmod(0o600)
        r = tasksync("--config", str(cfg), "status", cwd=d, env=env)
        line = r.stderr.strip()
        if r.returncode != 78:
            return f"case {i} {words}: exit {r.returncode}: {line[:200]!r}"
        if not all(w.lower() in line.lower() for w in words):
            return f"case {i}: message does not name {words}: {line[:300]!r}"
        return None

    problems = [
        p for p in parallel([lambda i=i, c=c: check(i, *c) for i, c in enumerate(cases)]) if p
    ]
    assert not problems, "\n".join(problems)


def test_loopback_http_is_allowed(tmp_path: Path) -> None:
    def check(host: str) -> subprocess.CompletedProcess[str]:
        d = tmp_path / host.strip("[]").replace(":", "_")
        d.mkdir()
        cfg = d / "tasksync.toml"
        cfg.write_text(
            f'[database]\nurl = "sqlite:///{d / "x.db"}"\n'
            f'[systems.koodrive]\nbase_url = "http://{host}:8080"\ntoken = "t"\n'
        )
        cfg.chmod(0o600)
        return tasksync("--config", str(cfg), "status", cwd=d)

    # 127.0.0.1 is what every simulator test uses
    for r in parallel([lambda h=h: check(h) for h in ("localhost", "[::1]")]):
        ok(r)
