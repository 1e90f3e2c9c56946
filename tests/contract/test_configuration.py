"""Contract: configuration discovery order, environment, credentials, durations, defaults.

Black box: the real `tasksync` command in a subprocess (see tests/contract/__init__.py).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.contract import (
    AICC_IDS,
    FAST_RETRY,
    Workspace,
    make_workspace,
    ok,
    parallel,
    query,
    seed_sim,
    sim_workspace,
    tasksync,
    ts,
)
from tests.support.contract_sim import (
    AICC_PREFIX,
    CLIENT_SECRET,
    KOODRIVE_TOKEN,
    SECMASTER_TOKEN,
    ContractSim,
)


def _tracked(db: Path) -> list[str]:
    if not db.exists():
        return []
    return [r["task_id"] for r in query(f"sqlite:///{db}", "SELECT task_id FROM tasks")]


@pytest.mark.skipif(
    Path("/etc/tasksync/tasksync.toml").exists(),
    reason="a system-wide configuration exists on this host",
)
def test_configuration_discovery_order_and_database_defaults(tmp_path: Path) -> None:
    def cfg(name: str) -> Path:
        path = tmp_path / f"{name}.toml"
        path.write_text(f'[database]\nurl = "sqlite:///{tmp_path / name}.db"\n')
        return path

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "tasksync.toml").write_text(f'[database]\nurl = "sqlite:///{tmp_path / "cwdfile"}.db"\n')
    envfile, flagfile = cfg("envfile"), cfg("flagfile")
    bare, state, rel = tmp_path / "bare", tmp_path / "state", tmp_path / "rel"
    for d in (bare, state, rel):
        d.mkdir()
    (rel / "tasksync.toml").write_text('[database]\nurl = "sqlite:///relative.db"\n')
    statedir = tmp_path / "statedir"
    statedir.mkdir()

    runs = [
        lambda: tasksync("track", "aicc", "from-cwd", cwd=cwd),
        lambda: tasksync(
            "track", "aicc", "from-env", cwd=cwd, env={"TASKSYNC_CONFIG": str(envfile)}
        ),
        lambda: tasksync(
            "--config",
            str(flagfile),
            "track",
            "aicc",
            "from-flag",
            cwd=cwd,
            env={"TASKSYNC_CONFIG": str(envfile)},
        ),
        lambda: tasksync("track", "aicc", "default-db", cwd=bare),
        lambda: tasksync(
            "track", "aicc", "state-db", cwd=state, env={"STATE_DIRECTORY": str(statedir)}
        ),
        lambda: tasksync(
            "track", "aicc", "relative-db", cwd=rel, env={"STATE_DIRECTORY": str(statedir)}
        ),
        lambda: tasksync(
            "track",
            "aicc",
            "env-url",
            cwd=cwd,
            env={"TASKSYNC_DATABASE__URL": f"sqlite:///{tmp_path / 'envurl.db'}"},
        ),
    ]
    for r in parallel(runs):
        ok(r)
    assert _tracked(tmp_path / "cwdfile.db") == ["from-cwd"]
    assert _tracked(tmp_path / "envfile.db") == ["from-env"]
    assert _tracked(tmp_path / "flagfile.db") == ["from-flag"]
    assert _tracked(bare / "tasksync.db") == ["default-db"]  # SQLite tasksync.db in the cwd
    assert _tracked(statedir / "tasksync.db") == ["state-db"]  # ... or in $STATE_DIRECTORY
    assert _tracked(statedir / "relative.db") == ["relative-db"]
    assert _tracked(tmp_path / "envurl.db") == ["env-url"]  # environment wins over the file
    assert not (state / "tasksync.db").exists() and not (rel / "relative.db").exists()


def test_environment_and_credentials_directory(tmp_path: Path, sim: ContractSim) -> None:
    seed_sim(sim)
    base = sim.base_url

    def workspace(name: str, body: str) -> Workspace:
        d = tmp_path / name
        d.mkdir()
        return make_workspace(d, f"sqlite:///{d / 'x.db'}", FAST_RETRY + body)

    # 1. the file holds a wrong AICC secret; the nested environment variable wins
    wrong = workspace("wrong", sim.config_toml(("aicc",)).replace(CLIENT_SECRET, "wrong"))
    # 2. KooDrive enabled by environment variables alone (no section in the file)
    envonly = workspace("envonly", "")
    # 3. secrets from $CREDENTIALS_DIRECTORY (files may end in a newline, as `echo` writes them)
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "aicc_client_secret").write_text(CLIENT_SECRET + "\n")
    (creds / "secmaster_token").write_text(SECMASTER_TOKEN + "\n")
    (creds / "koodrive_token").write_text(KOODRIVE_TOKEN)
    (creds / "database_url").write_text(f"sqlite:///{tmp_path / 'credsdb.db'}\n")
    stripped = "\n".join(
        line
        for line in sim.config_toml().splitlines()
        if not line.startswith(("client_secret", "token"))
    )
    (tmp_path / "creds").mkdir()
    credcfg = tmp_path / "creds" / "tasksync.toml"
    credcfg.write_text(FAST_RETRY + stripped + "\n")  # no [database]: database_url fills it
    credws = Workspace(tmp_path / "creds", f"sqlite:///{tmp_path / 'credsdb.db'}", credcfg)
    # 4. a credential fills a key of a configured system; it does not enable one
    notenabled = workspace("notenabled", sim.config_toml(("aicc",)))
    kd_only = tmp_path / "kd-credentials"
    kd_only.mkdir()
    (kd_only / "koodrive_token").write_text(KOODRIVE_TOKEN)

    env_creds = {"CREDENTIALS_DIRECTORY": str(creds)}
    koodrive_env = {
        "TASKSYNC_SYSTEMS__KOODRIVE__BASE_URL": base,
        "TASKSYNC_SYSTEMS__KOODRIVE__TOKEN": KOODRIVE_TOKEN,
    }
    flows: list[tuple[Workspace, list[list[str]], dict[str, str]]] = [
        (
            wrong,
            [["track", "aicc", AICC_IDS[0]]],
            {"TASKSYNC_SYSTEMS__AICC__CLIENT_SECRET": CLIENT_SECRET},
        ),
        (envonly, [["track", "koodrive", "kd-2"]], koodrive_env),
        (
            credws,
            [
                ["track", "aicc", AICC_IDS[1]],
                ["track", "secmaster", "sm-waiting"],
                ["track", "koodrive", "kd-3"],
            ],
            env_creds,
        ),
        (notenabled, [["track", "koodrive", "kd-1"]], {"CREDENTIALS_DIRECTORY": str(kd_only)}),
    ]

    def flow(ws: Workspace, tracks: list[list[str]], env: dict[str, str]) -> None:
        for argv in tracks:
            ok(ws.run(*argv, env=env))
        ok(ws.run("sync", "--all", "--quiet", env=env))

    parallel([lambda f=f: flow(*f) for f in flows])
    assert wrong.task("aicc", AICC_IDS[0])["status"] == "Pending"
    assert envonly.task("koodrive", "kd-2")["state"] == "done"
    for system, task_id, status in [
        ("aicc", AICC_IDS[1], "Processing"),
        ("secmaster", "sm-waiting", "waiting"),
        ("koodrive", "kd-3", "3"),
    ]:
        row = credws.task(system, task_id)
        assert row["status"] == status and row["last_error"] is None, row
    # the koodrive_token credential did not enable KooDrive
    assert notenabled.task("koodrive", "kd-1")["status"] is None
    assert not [s for s in sim.requests("GET", "/koodrive/") if s.path.endswith("/kd-1")]


DURATIONS = [
    # (poll_interval, terminal_poll_interval, sync_schedule, expected seconds non-terminal, terminal)
    ("90s", "1h", "*/5 * * * *", 90, 3600),
    ("5m", "1h30m", "30s", 300, 5400),
    (45, 600, 90, 45, 600),
]


def test_durations_and_poll_intervals(tmp_path: Path, sim: ContractSim) -> None:
    seed_sim(sim)

    def one(i: int, poll: Any, terminal: Any, schedule: Any) -> Workspace:
        d = tmp_path / f"d{i}"
        d.mkdir()
        fmt = lambda v: f'"{v}"' if isinstance(v, str) else str(v)  # noqa: E731
        ws = sim_workspace(
            d,
            sim,
            f"sqlite:///{d / 'x.db'}",
            worker=f"poll_interval = {fmt(poll)}\nterminal_poll_interval = {fmt(terminal)}\n"
            f"sync_schedule = {fmt(schedule)}\n",
        )
        ok(ws.run("track", "koodrive", "kd-1", "kd-2"))
        ok(ws.run("sync", "--quiet"))
        return ws

    spaces = parallel([lambda i=i, c=c: one(i, *c[:3]) for i, c in enumerate(DURATIONS)])
    for ws, (*_, open_s, terminal_s) in zip(spaces, DURATIONS, strict=True):
        for task_id, expected in (("kd-1", open_s), ("kd-2", terminal_s)):
            row = ws.task("koodrive", task_id)
            gap = (ts(row["next_poll_at"]) - ts(row["last_polled_at"])).total_seconds()
            assert abs(gap - expected) < 2, (ws.config.read_text(), task_id, gap)


def test_plain_sync_polls_only_due_tasks_and_all_polls_everything(
    tmp_path: Path, sim: ContractSim
) -> None:
    seed_sim(sim)
    ws = sim_workspace(
        tmp_path, sim, f"sqlite:///{tmp_path / 's.db'}", worker='poll_interval = "2s"\n'
    )
    ws.ok("track", "koodrive", *sorted(sim.koodrive))
    listed = ws.ok("discover", "aicc")  # only the systems named
    assert {r["system"] for r in ws.q("SELECT system FROM tasks")} == {"aicc", "koodrive"}
    n = len(sim.koodrive) + len(AICC_IDS)

    def details() -> int:
        return len(sim.requests("GET", "/koodrive/")) + len(sim.requests("GET", AICC_PREFIX))

    polled = ws.ok("sync")
    assert details() == n
    for out in (listed.stdout, polled.stdout):  # stdout is not a terminal: no progress bar
        assert out.strip() and "\r" not in out and "\x1b" not in out, repr(out)
    ws.ok("sync", "--quiet")  # nothing is due yet: nothing is fetched
    assert details() == n
    ws.ok("sync", "--all", "--quiet", "koodrive")  # --all: every tracked task of that system
    assert details() == n + len(sim.koodrive)
    ws.ok("sync", "--all", "--quiet")
    t_last = time.monotonic()
    assert details() == 2 * n + len(sim.koodrive)
    # once poll_interval has passed, the non-terminal tasks are due again (terminal ones not)
    time.sleep(max(0.0, 2.3 - (time.monotonic() - t_last)))
    before = details()
    ws.ok("sync", "--quiet")
    nonterminal = 6  # KooDrive 0, 1, 7 and AICC Pending, Processing, Reopened (unknown)
    assert details() - before == nonterminal
    runs = [
        r for r in ws.q("SELECT * FROM sync_runs ORDER BY id") if r.get("kind", "sync") == "sync"
    ]
    assert [r["polled"] for r in runs] == [n, 0, len(sim.koodrive), n, nonterminal]
    assert all(r["failed"] == 0 for r in runs)
