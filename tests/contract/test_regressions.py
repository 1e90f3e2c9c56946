"""Contract: edge cases that are easy to get wrong, each pinned by a test.

Black box: the real `tasksync` command in a subprocess (see tests/contract/__init__.py).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support.cli import run_cli, spawn_cli
from tests.support.contract import (
    execute,
    ok,
    parallel,
    seed_sim,
    sim_workspace,
    tasksync,
    ts,
)
from tests.support.contract_sim import (
    ContractSim,
)


# enqueue on an untracked task tracks it again: otherwise the applied action's effect is
# never synced
def test_enqueue_starts_tracking_an_untracked_task(tmp_path: Path, sim: ContractSim) -> None:
    seed_sim(sim)
    ws = sim_workspace(tmp_path, sim, f"sqlite:///{tmp_path / 'u.db'}")
    ws.ok("track", "secmaster", "sm-waiting")
    ws.ok("untrack", "secmaster", "sm-waiting")
    ws.ok("enqueue", "secmaster", "sm-waiting", "comment", "--comment", "after untrack")
    assert ws.task("secmaster", "sm-waiting")["tracked"] in (True, 1)
    ws.ok("apply")
    ws.ok("sync", "--quiet")  # "the task is made due so the next cycle stores the effect"
    assert ws.task("secmaster", "sm-waiting")["last_polled_at"] is not None
    assert ws.events("secmaster", "sm-waiting", "comment_added")


# a closed stdout (`tasksync actions | head -0`) is not a database failure ('Broken pipe')
def test_closed_stdout_is_not_reported_as_a_database_failure(tmp_path: Path) -> None:
    db = tmp_path / "p.db"
    env = {"TASKSYNC_DATABASE__URL": f"sqlite:///{db}"}
    ok(tasksync("enqueue", "secmaster", "t1", "comment", "--comment", "x", cwd=tmp_path, env=env))
    proc = spawn_cli(
        "actions",
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    proc.wait(30)
    assert "database" not in err, err


# an unwritable --write-config path is named as such, not reported as a listening problem
def test_sandbox_unwritable_config_names_the_file(tmp_path: Path) -> None:
    target = tmp_path / "missing-dir" / "tasksync.toml"
    r = tasksync("sandbox", "--port", "0", "--write-config", str(target), cwd=tmp_path, timeout=20)
    assert r.returncode != 0
    assert "cannot serve" not in r.stderr, r.stderr


# last_changed_at is when tasksync observed a change, not SecMaster's update_time (which can be
# months old, older than first_seen_at)
def test_last_changed_at_moves_when_a_change_is_observed(tmp_path: Path, sim: ContractSim) -> None:
    seed_sim(sim)
    ws = sim_workspace(tmp_path, sim, f"sqlite:///{tmp_path / 'c.db'}")
    ws.ok("track", "secmaster", "sm-waiting")
    ws.ok("sync", "--quiet")
    first = ws.task("secmaster", "sm-waiting")
    with sim.lock:  # another user comments; this simulator leaves update_time as it was
        sim.secmaster["sm-waiting"]["comments"].append(
            {"id": "c-9", "message": "new", "user_id": "u", "user_name": "n", "time": 1755586422424}
        )
    ws.ok("sync", "--all", "--quiet")
    row = ws.task("secmaster", "sm-waiting")
    assert ws.events("secmaster", "sm-waiting", "comment_added")
    assert ts(row["last_changed_at"]) >= ts(first["first_seen_at"]), row["last_changed_at"]


# an action id beyond 64 bits is a one-line error on both databases (SQLite's integers
# overflow; PostgreSQL's bigint is out of range)
def test_out_of_range_action_id_is_a_clean_error(tmp_path: Path) -> None:
    env = {"TASKSYNC_DATABASE__URL": f"sqlite:///{tmp_path / 'o.db'}"}
    ok(tasksync("migrate", cwd=tmp_path, env=env))
    huge = "99999999999999999999"
    for r in parallel(
        [lambda c=c: tasksync(c, huge, cwd=tmp_path, env=env) for c in ("cancel", "retry")]
    ):
        # tasksync() itself fails on a traceback; then: bad input (2) or no such action (1)
        assert r.returncode in (1, 2), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


# a duration too large for a timestamp (poll_interval or lease = "99999999h") is a
# configuration error naming the key, not an OverflowError inside `sync`
def test_durations_too_large_for_a_timestamp(tmp_path: Path, sim: ContractSim) -> None:
    seed_sim(sim)

    def flow(key: str) -> subprocess.CompletedProcess[str]:
        d = tmp_path / key
        d.mkdir()
        ws = sim_workspace(d, sim, f"sqlite:///{d / 'x.db'}", worker=f'{key} = "99999999h"\n')
        first = ws.run("track", "koodrive", "kd-0")
        return first if first.returncode else ws.run("sync", "--quiet")

    for key, r in zip(
        ("poll_interval", "lease"),
        parallel([lambda k=k: flow(k) for k in ("poll_interval", "lease")]),
        strict=True,
    ):
        # either refused as a bad value (78, naming the key) or harmless (the cycle runs)
        assert r.returncode in (0, 78), (key, r.stderr[-500:])
        if r.returncode == 78:
            assert key in r.stderr


def _raw(*args: str | bytes, cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    """Run with raw (possibly non-UTF-8) arguments; stderr decoded leniently."""
    r = run_cli(*args, cwd=cwd, env=env, text=False)
    return r.returncode, r.stderr.decode("utf-8", "replace")


# a task id or option value that is not UTF-8 (typed on a Latin-1 or GBK terminal) is bad
# input, not a UnicodeEncodeError
def test_arguments_that_are_not_utf8_are_bad_input(tmp_path: Path) -> None:
    env = {"TASKSYNC_DATABASE__URL": f"sqlite:///{tmp_path / 'b.db'}"}
    runs = parallel(
        [
            lambda: _raw("track", "aicc", b"ccqG\xff", cwd=tmp_path, env=env),
            lambda: _raw(
                "enqueue",
                "secmaster",
                "t1",
                "comment",
                "--comment",
                b"\xb2\xe2\xca\xd4",
                cwd=tmp_path,
                env=env,
            ),
        ]
    )
    for code, err in runs:
        assert "Traceback" not in err, err[-400:]
        assert code == 2 and len(err.strip().splitlines()) == 1, (code, err[-400:])


# a configuration file that is not UTF-8 (saved as GBK with Chinese comments) is exit 78, not
# a UnicodeDecodeError
def test_configuration_file_that_is_not_utf8_exits_78(tmp_path: Path) -> None:
    cfg = tmp_path / "tasksync.toml"
    cfg.write_bytes("[worker]\n# 每五分钟同步一次\nconcurrency = 4\n".encode("gbk"))
    code, err = _raw("--config", str(cfg), "status", cwd=tmp_path, env={})
    assert "Traceback" not in err, err[-400:]
    assert code == 78 and len(err.strip().splitlines()) == 1, (code, err)


# a database migrated by a newer tasksync (an unknown revision): `status` must not advise
# `tasksync migrate`, which cannot help, and `migrate` itself fails with one line
def test_database_from_a_newer_version_is_a_clean_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'n.db'}"
    env = {"TASKSYNC_DATABASE__URL": url}
    ok(tasksync("migrate", cwd=tmp_path, env=env))
    execute(url, "UPDATE alembic_version SET version_num = 'ffff0000newer'")
    status, migrate = parallel(
        [
            lambda: tasksync("status", cwd=tmp_path, env=env),
            lambda: tasksync("migrate", cwd=tmp_path, env=env),
        ]
    )
    for r in (status, migrate):  # tasksync() fails on a traceback
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-400:]
        assert "run `tasksync migrate`" not in r.stderr  # migrating cannot help here


# `sandbox --mutate-every nan` is exit 2: NaN passes a naive positivity check
def test_sandbox_rejects_a_nan_interval(tmp_path: Path) -> None:
    r = tasksync("sandbox", "--port", "0", "--mutate-every", "nan", cwd=tmp_path, timeout=20)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-300:]
