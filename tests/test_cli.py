"""The command line end to end: the real `tasksync` in a subprocess, on both databases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.conftest import Database, run_cli
from worker.store import Store
from worker.store.migrate import HEAD_REVISION

pytestmark = pytest.mark.anyio


def cli(db: Database, *args: str, cwd: Path | None = None, **env: str):  # type: ignore[no-untyped-def]
    return run_cli(*args, env={"TASKSYNC_DATABASE__URL": db.url, **env}, cwd=cwd)


def test_migrate_twice(database: Database) -> None:
    for _ in range(2):
        result = cli(database, "migrate")
        assert result.returncode == 0, result.stderr
        assert f"revision {HEAD_REVISION}" in result.stdout


def test_track_untrack_and_status(database: Database) -> None:
    result = cli(database, "track", "aicc", "ccqG0000014iXvGKONQO", "ccqG0000014iXvGKONQP")
    assert result.returncode == 0, result.stderr
    assert "2 new" in result.stdout
    again = cli(database, "track", "aicc", "ccqG0000014iXvGKONQO")
    assert "0 new" in again.stdout
    status = json.loads(cli(database, "status", "--json").stdout)
    assert status["tasks"] == {"aicc": {"unknown": 2}}
    gone = cli(database, "untrack", "aicc", "ccqG0000014iXvGKONQO")
    assert gone.returncode == 0 and "untracked 1" in gone.stdout
    status = json.loads(cli(database, "status", "--json").stdout)
    assert status["tasks"] == {"aicc": {"unknown": 1}}
    assert status["untracked"] == 1
    human = cli(database, "status")
    assert human.returncode == 0 and "Tracked tasks" in human.stdout


def test_enqueue_prints_id_and_honours_key(database: Database) -> None:
    first = cli(
        database, "enqueue", "secmaster", "t-1", "comment", "--comment", "checked", "--key", "k1"
    )
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip().isdigit()
    again = cli(
        database, "enqueue", "secmaster", "t-1", "comment", "--comment", "other", "--key", "k1"
    )
    assert again.stdout == first.stdout
    other = cli(database, "enqueue", "aicc", "a-1", "process", "--title", "t", "--description", "d")
    assert other.returncode == 0 and other.stdout.strip() != first.stdout.strip()
    listed = json.loads(cli(database, "actions", "--json").stdout)
    assert [(a["system"], a["kind"], a["params"]) for a in listed] == [
        ("secmaster", "comment", {"comment": "checked"}),
        ("aicc", "process", {"title": "t", "description": "d", "type": "Iternal"}),
    ]
    # enqueue tracks the task it names
    status = json.loads(cli(database, "status", "--json").stdout)
    assert status["tasks"] == {"aicc": {"unknown": 1}, "secmaster": {"unknown": 1}}


def test_enqueue_takes_creator_id_from_config(database: Database, tmp_path: Path) -> None:
    config = tmp_path / "tasksync.toml"
    config.write_text(
        '[systems.aicc]\nbase_url = "https://aicc.example.com"\nclient_id = "id"\n'
        'client_secret = "s3cr3t-value"\ncreator_id = "10gg00000148QvgpaLAm"\n'
    )
    config.chmod(0o600)
    result = cli(
        database,
        "enqueue",
        "aicc",
        "a-1",
        "process",
        "--title",
        "t",
        "--description",
        "d",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    listed = json.loads(cli(database, "actions", "--json", cwd=tmp_path).stdout)
    assert listed[0]["params"]["creator_id"] == "10gg00000148QvgpaLAm"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("enqueue", "nosuch", "t", "comment", "--comment", "x"), "unknown system 'nosuch'"),
        (("enqueue", "secmaster", "t", "explode"), "unknown secmaster action 'explode'"),
        (("enqueue", "koodrive", "t", "comment", "--comment", "x"), "koodrive tasks are read-only"),
        (("enqueue", "secmaster", "t", "comment"), "needs comment (--comment)"),
        (
            ("enqueue", "secmaster", "t", "comment", "--comment", "x", "--title", "y"),
            "does not take --title",
        ),
        (
            ("enqueue", "secmaster", "t", "comment", "--bogus", "x"),
            "unrecognized arguments: --bogus",
        ),
        (
            ("enqueue", "aicc", "t", "process", "--title", "x" * 129, "--description", "d"),
            "at most 128",
        ),
        (
            ("enqueue", "aicc", "t", "process", "--title", "x", "--description", "d" * 20001),
            "at most 20000",
        ),
        (
            (
                "enqueue",
                "aicc",
                "t",
                "process",
                "--title",
                "x",
                "--description",
                "d",
                "--attachment",
                "a" * 256,
            ),
            "at most 255",
        ),
        (("enqueue", "secmaster", "t", "delete-comment"), "needs comment_id (--comment-id)"),
        (("enqueue", "secmaster", "t", "add-attachment"), "needs attachment_id (--attachment-id)"),
        (("enqueue", "secmaster", "", "terminate"), "task id must be a non-empty string"),
        (("track", "nosuch", "t"), "unknown system"),
        (("cancel", "abc"), "whole number"),
        (("nosuchcommand",), "invalid choice"),
        (("--log-level", "loud", "status"), "--log-level"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    database: Database, args: tuple[str, ...], message: str
) -> None:
    result = cli(database, *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_bad_configuration_exits_78_naming_the_key(database: Database, tmp_path: Path) -> None:
    result = cli(database, "status", TASKSYNC_WORKER__CONCURENCY="3")
    assert result.returncode == 78
    assert "worker.concurency" in result.stderr and "unknown key" in result.stderr
    config = tmp_path / "bad.toml"
    config.write_text('[systems.secmaster]\nbase_url = "http://secmaster.example.com"\n')
    result = cli(database, "--config", str(config), "status")
    assert result.returncode == 78
    assert "systems.secmaster.base_url" in result.stderr and "https://" in result.stderr
    assert "Traceback" not in result.stderr
    missing = cli(database, "--config", str(tmp_path / "nope.toml"), "status")
    assert missing.returncode == 78 and "does not exist" in missing.stderr


def test_unreachable_database_is_one_line_exit_1(tmp_path: Path) -> None:
    result = run_cli(
        "status", env={"TASKSYNC_DATABASE__URL": "postgresql://postgres:hunter22@127.0.0.1:1/x"}
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "hunter22" not in result.stderr
    missing_dir = run_cli(
        "status", env={"TASKSYNC_DATABASE__URL": f"sqlite:///{tmp_path}/no/such/dir/x.db"}
    )
    assert missing_dir.returncode == 78 and "database.url" in missing_dir.stderr


def test_cancel_and_retry(database: Database) -> None:
    action = cli(database, "enqueue", "secmaster", "t-1", "terminate").stdout.strip()
    assert cli(database, "cancel", action).returncode == 0
    again = cli(database, "cancel", action)
    assert again.returncode == 1 and "only pending" in again.stderr
    assert cli(database, "cancel", "999999").returncode == 1
    retried = cli(database, "retry", action)
    assert retried.returncode == 1 and "only failed" in retried.stderr
    canceled = json.loads(cli(database, "actions", "--status", "canceled", "--json").stdout)
    assert [a["id"] for a in canceled] == [int(action)]


async def test_retry_requeues_a_failed_action(database: Database, store: Store) -> None:
    action = cli(database, "enqueue", "secmaster", "t-1", "terminate").stdout.strip()
    async with store.engine.begin() as conn:
        await conn.execute(
            sa.text(
                "UPDATE actions SET status = 'failed', attempts = 8, last_error = 'boom' WHERE id = :id"
            ),
            {"id": int(action)},
        )
    result = cli(database, "retry", action)
    assert result.returncode == 0, result.stderr
    row = await store.get_action(int(action))
    assert row is not None and row["status"] == "pending" and row["attempts"] == 0


async def test_row_inserted_by_sql_gets_defaults(database: Database, store: Store) -> None:
    async with store.engine.begin() as conn:
        await conn.execute(
            sa.text(
                "INSERT INTO actions (system, task_id, kind, params) VALUES "
                "('secmaster', '3e4c170e-7cc9-11f0-9216-fa163e209978', 'comment', '{\"comment\": \"checked\"}')"
            )
        )
    listed = json.loads(cli(database, "actions", "--json").stdout)
    assert len(listed) == 1
    row = listed[0]
    assert row["status"] == "pending" and row["attempts"] == 0 and row["max_attempts"] is None
    assert row["params"] == {"comment": "checked"}
    assert row["next_attempt_at"] and row["created_at"] and row["updated_at"]
    assert row["idempotency_key"] is None
    human = cli(database, "actions")
    assert "3e4c170e" in human.stdout and "pending" in human.stdout


def test_show(database: Database) -> None:
    cli(database, "enqueue", "secmaster", "t-1", "comment", "--comment", "hi")
    shown = json.loads(cli(database, "show", "secmaster", "t-1", "--json").stdout)
    assert shown["task"]["task_id"] == "t-1" and shown["snapshot"] is None
    assert [a["kind"] for a in shown["actions"]] == ["comment"]
    human = cli(database, "show", "secmaster", "t-1")
    assert human.returncode == 0 and "secmaster task t-1" in human.stdout
    unknown = cli(database, "show", "secmaster", "nope")
    assert unknown.returncode == 1 and "not known" in unknown.stderr


def test_fresh_sqlite_database_is_created_on_first_use(tmp_path: Path) -> None:
    result = run_cli("status", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "tasksync.db").exists()
    state = tmp_path / "state"
    state.mkdir()
    result = run_cli("track", "aicc", "x", cwd=tmp_path, env={"STATE_DIRECTORY": str(state)})
    assert result.returncode == 0, result.stderr
    assert (state / "tasksync.db").exists()
