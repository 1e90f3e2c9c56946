"""No secret ever leaves: every command, every auth mode, debug logging, faults and refused
credentials, and then a search of everything tasksync wrote for every secret value.

Secrets searched for: every configured credential (AICC client_secret; SecMaster sk, IAM
password, fixed token; KooDrive bearer token, app_secret), the wrong credentials used to provoke
401s, the database password (PostgreSQL), and every access token the sandbox issued while the
commands ran (AICC OAuth tokens, IAM X-Subject-Tokens), read from the sandbox's token stores as
they were issued. Places searched: stdout and stderr of every command (and of the daemon), the
database (every table and view dumped as text; on SQLite the raw database and WAL files too).
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import pytest
import sqlalchemy as sa

from tests.support.cli import clean_env, run_cli, tasksync_argv
from tests.support.db import Database, count
from worker.sandbox import Sandbox
from worker.sandbox.auth import TokenStore
from worker.store import Store

pytestmark = pytest.mark.anyio

DB_PASSWORD = "db-Passw0rd-never-shown-4c1d"
# Wrong credentials, used once to provoke refusals (401s recorded as errors): secrets as well.
WRONG = {
    "aicc": ("client_secret", "wrong-aicc-secret-b7e2f0"),
    "aksk": ("sk", "wrongSKf5d0c8b1a9e7d6c5b4a3f2e1d0c9"),
    "iam": ("password", "wrong-iam-password-71ac"),
    "token": ("token", "MIIwrong-secmaster-token-9e3d"),
    "kd-token": ("token", "wrong-koodrive-token-44b1"),
    "kd-app": ("app_secret", "wrong-app-secret-d2c8"),
}
# Every SecMaster mode and every KooDrive mode at least once.
COMBOS = [("aksk", "token"), ("iam", "app"), ("token", "app")]


def record_tokens(store: TokenStore, into: list[str]) -> None:
    """Keep every token the sandbox issues (its store forgets revoked ones)."""
    issue = store.issue

    def recording() -> str:
        token = issue()
        into.append(token)
        return token

    store.issue = recording  # type: ignore[method-assign]


def configured_secrets(sb: Sandbox, secmaster_auth: str, koodrive_auth: str) -> dict[str, str]:
    c = sb.credentials
    found = {"aicc client_secret": c.client_secret}
    found |= {
        "aksk": {"secmaster sk": c.sk},
        "iam": {"secmaster password": c.password},
        "token": {"secmaster token": c.secmaster_token},
    }[secmaster_auth]
    found |= {
        "token": {"koodrive token": c.koodrive_token},
        "app": {"koodrive app_secret": c.app_secret},
    }[koodrive_auth]
    return found


def forms(value: str) -> set[str]:
    """The value and the encodings it could be written in."""
    return {value, quote(value, safe=""), value.encode().hex()}


async def dump_database(store: Store, database: Database, path: Path | None) -> list[str]:
    """Every row of every table and view as text; on SQLite also the raw files."""
    texts: list[str] = []
    async with store.engine.connect() as conn:

        def names(sync_conn: Any) -> list[str]:
            inspector = sa.inspect(sync_conn)
            return [*inspector.get_table_names(), *inspector.get_view_names()]

        for name in await conn.run_sync(names):
            if database.kind == "postgres":
                query = f'SELECT CAST(t AS TEXT) FROM "{name}" t'
            else:
                query = f'SELECT * FROM "{name}"'
            for row in (await conn.execute(sa.text(query))).all():
                texts.append(f"{name}: {tuple(row)!r}")
    if path is not None:
        for file in path.parent.glob(path.name + "*"):
            texts.append(file.read_bytes().decode("latin-1"))
    return texts


@pytest.mark.parametrize(("secmaster_auth", "koodrive_auth"), COMBOS)
async def test_no_secret_in_any_output_or_in_the_database(
    database: Database,
    store: Store,
    tmp_path: Path,
    secmaster_auth: str,
    koodrive_auth: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    issued: list[str] = []
    outputs: list[tuple[str, str]] = []  # (what ran, its stdout + stderr)
    async with Sandbox(seed=51, tasks_per_system=6) as sb:
        record_tokens(sb.aicc_tokens, issued)
        record_tokens(sb.iam_tokens, issued)
        config = tmp_path / "tasksync.toml"
        config.write_text(
            sb.config_toml(secmaster_auth=secmaster_auth, koodrive_auth=koodrive_auth)  # type: ignore[arg-type]
            + "\n".join(
                [
                    "",
                    "[worker]",
                    'sync_schedule = "1s"',
                    'action_poll_interval = "0.5s"',
                    'lease = "2s"',
                    "",
                    "[retry]",
                    "base_delay = 0.01",
                    "max_delay = 0.05",
                    "max_attempts = 3",
                    "",
                ]
            )
        )
        config.chmod(0o600)
        url = database.url
        if database.kind == "postgres":  # trust authentication ignores it; we must hide it
            url = url.replace("postgresql://postgres@", f"postgresql://postgres:{DB_PASSWORD}@")
        env = {"TASKSYNC_DATABASE__URL": url}
        waiting = [
            t for t in sb.task_ids("secmaster") if sb.payload("secmaster", t)["status"] == "waiting"
        ]
        aicc = sb.task_ids("aicc")

        async def cli(*args: str, extra: dict[str, str] | None = None) -> None:
            result = await anyio.to_thread.run_sync(
                lambda: run_cli(
                    "--config", str(config), "--log-level", "debug", *args, env=env | (extra or {})
                )
            )
            outputs.append((" ".join(args), result.stdout + result.stderr))
            assert result.returncode == 0, (args, result.stderr[-2000:])
            assert "Traceback" not in result.stderr, result.stderr[-3000:]

        async def together(*commands: tuple[str, ...]) -> None:
            async with anyio.create_task_group() as tg:
                for command in commands:
                    tg.start_soon(lambda c=command: cli(*c))

        # Commands that never talk to an upstream do not care about the auth mode: they run in
        # the first combination only; the upstream commands (discover, sync, apply, run) in all.
        full = (secmaster_auth, koodrive_auth) == COMBOS[0]

        async def enqueue(system: str, task: str, kind: str, **params: str) -> None:
            if full:
                options = [f"--{k.replace('_', '-')}={v}" for k, v in params.items()]
                await cli("enqueue", system, task, kind, *options)
            else:
                await store.enqueue(system, task, kind, params)

        if full:
            await cli("migrate")
            await cli("track", "koodrive", *sb.task_ids("koodrive"))
        else:
            await store.track("koodrive", sb.task_ids("koodrive"))
        await cli("discover")
        await cli("sync")
        if full:
            await enqueue("secmaster", waiting[0], "comment", comment="first look")
            await enqueue("aicc", aicc[0], "process", title="called", description="ok")
            await cli("apply")
            await together(
                ("status", "--json"),
                ("show", "secmaster", waiting[0], "--json"),
                ("actions", "--json"),
            )

        # refused credentials: every configured secret replaced by a wrong one -> 401s
        wrong_env = {
            "TASKSYNC_SYSTEMS__AICC__CLIENT_SECRET": WRONG["aicc"][1],
            f"TASKSYNC_SYSTEMS__SECMASTER__{WRONG[secmaster_auth][0].upper()}": WRONG[
                secmaster_auth
            ][1],
            f"TASKSYNC_SYSTEMS__KOODRIVE__{WRONG['kd-' + koodrive_auth][0].upper()}": WRONG[
                "kd-" + koodrive_auth
            ][1],
        }
        await enqueue("secmaster", waiting[2], "comment", comment="refused")
        await enqueue("aicc", aicc[2], "process", title="refused", description="x")
        await cli("sync", "--all", extra=wrong_env)
        await cli("apply", extra=wrong_env)
        refused_tasks = await count(store, "tasks", "last_error LIKE '%401%'")
        tracked = await count(store, "tasks")
        refused_attempts = await count(store, "action_attempts", "error LIKE '%401%'")
        # the refused actions carry their error now (a later apply may well succeed them all,
        # which clears it): show it while it is there, so its text is scanned too
        refused_actions = await count(store, "actions", "last_error IS NOT NULL")
        if full:
            await cli("actions", "--json")

        # faults: 500s, 429s, drops, garbage, and tokens that expire every few requests
        sb.set_faults("500=0.25,429=0.1,drop=0.1,malformed=0.1,expire=3")
        await enqueue("secmaster", waiting[1], "comment", comment="under fire")
        await enqueue("aicc", aicc[1], "process", title="again", description="x")
        await cli("sync", "--all")
        await cli("apply")

        # the daemon, briefly, with faults and token expiry
        sb.set_faults("500=0.2,429=0.1,expire=5")
        await store.enqueue("secmaster", waiting[0], "comment", {"comment": "by the daemon"})
        async with store.engine.begin() as conn:  # everything due: the daemon syncs it all
            await conn.execute(sa.text("UPDATE tasks SET next_poll_at = CURRENT_TIMESTAMP"))
        daemon_log = tmp_path / "daemon.log"
        full_env = clean_env(env)
        cmd = tasksync_argv("--config", str(config), "--log-level", "debug")
        with daemon_log.open("wb") as log:
            process = await anyio.open_process([*cmd, "run"], env=full_env, stdout=log, stderr=log)
            try:
                with anyio.fail_after(30):
                    while b"sync:" not in daemon_log.read_bytes():
                        await anyio.sleep(0.1)
                    await anyio.sleep(1.5)
                    process.send_signal(signal.SIGTERM)
                    code = await process.wait()
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
        assert code == 0, daemon_log.read_text()[-3000:]
        outputs.append(("run", daemon_log.read_text(errors="replace")))
        sb.set_faults(None)
        if full:
            await together(
                ("show", "aicc", aicc[2], "--json"), ("actions", "--json"), ("status", "--json")
            )
        faults = dict(sb.faults.injected)
        auth_failures = dict(sb.requests.auth_failures)

    # the errors were really exercised: refusals and faults are recorded in the error fields
    assert refused_tasks == tracked and refused_attempts > 0, (refused_tasks, refused_attempts)
    assert await count(store, "action_attempts", "error IS NOT NULL") > refused_attempts
    assert refused_actions > 0
    assert sum(auth_failures.values()) > 0 and faults.get("expire", 0) > 0, (auth_failures, faults)
    assert len(issued) >= 2  # tokens were issued (and renewed after each expiry)

    secrets = configured_secrets(sb, secmaster_auth, koodrive_auth)
    secrets |= {f"wrong {name}": value for name, value in wrong_env.items()}
    secrets |= {f"issued token #{n}": token for n, token in enumerate(issued)}
    if database.kind == "postgres":
        secrets["database password"] = DB_PASSWORD
    sqlite_file = (
        Path(database.url.removeprefix("sqlite:///")) if database.kind == "sqlite" else None
    )
    dump = await dump_database(store, database, sqlite_file)
    places = [(f"output of `tasksync {what}`", text) for what, text in outputs]
    places += [("database", text) for text in dump]
    hits = sorted(
        {
            f"{name} in {where}"
            for name, value in secrets.items()
            for where, text in places
            if any(form in text for form in forms(value))
        }
    )
    summary = (
        f"secrets [{database.kind}, secmaster={secmaster_auth}, koodrive={koodrive_auth}]: "
        f"{len(outputs)} commands ({sum(len(t) for _, t in outputs)} chars of output), "
        f"database dump {sum(len(t) for t in dump)} chars; {len(secrets)} secret values "
        f"({len(issued)} live tokens); faults {faults}; refused credentials "
        f"{auth_failures}; hits = {len(hits)}"
    )
    with capsys.disabled():
        print("\n" + summary)
    assert hits == [], hits


async def test_secrets_from_the_environment_and_credential_files_are_hidden_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same search when the secrets come from $CREDENTIALS_DIRECTORY and the environment,
    with an upstream that refuses them (errors that might quote them)."""
    async with Sandbox(seed=52, tasks_per_system=3) as sb:
        c = sb.credentials
        creds = tmp_path / "creds"
        creds.mkdir(mode=0o700)
        wrong_sk = "credfileSKwrong0a1b2c3d4e5f6a7b8c9d0"
        (creds / "secmaster_sk").write_text(wrong_sk + "\n")
        (creds / "koodrive_token").write_text("credfile-wrong-kd-token-5e5e\n")
        config = tmp_path / "t.toml"
        config.write_text(
            "\n".join(
                line
                for line in sb.config_toml().splitlines()
                if not line.startswith(("ak =", "sk =", "token =", "client_secret ="))
            )
            + "\n"
        )
        config.chmod(0o644)  # world-readable is fine: no secret inline
        env = {
            "TASKSYNC_DATABASE__URL": f"sqlite:///{tmp_path / 'c.db'}",
            "CREDENTIALS_DIRECTORY": str(creds),
            "TASKSYNC_SYSTEMS__AICC__CLIENT_SECRET": "env-wrong-aicc-secret-31f7",
            "TASKSYNC_SYSTEMS__SECMASTER__AK": c.ak,
        }
        outputs: list[str] = []
        for args in (
            ("discover",),
            ("track", "koodrive", *sb.task_ids("koodrive")),
            ("track", "secmaster", *sb.task_ids("secmaster")),
            ("sync", "--all"),
            ("enqueue", "secmaster", sb.task_ids("secmaster")[0], "comment", "--comment", "x"),
            ("apply",),
            ("status", "--json"),
            ("actions", "--json"),
        ):
            result = await anyio.to_thread.run_sync(
                lambda a=args: run_cli("--config", str(config), "--log-level", "debug", *a, env=env)
            )
            assert "Traceback" not in result.stderr, result.stderr[-2000:]
            assert "readable" not in result.stderr
            outputs.append(result.stdout + result.stderr)
        assert sb.requests.auth_failures["secmaster"] > 0
        assert sb.requests.auth_failures["koodrive"] > 0
    store = Store.open(env["TASKSYNC_DATABASE__URL"])
    try:
        dump = await dump_database(
            store, Database("sqlite", env["TASKSYNC_DATABASE__URL"]), tmp_path / "c.db"
        )
        errors = await count(store, "tasks", "last_error IS NOT NULL")
    finally:
        await store.aclose()
    assert errors > 0
    secrets = [wrong_sk, "credfile-wrong-kd-token-5e5e", "env-wrong-aicc-secret-31f7", c.sk]
    hits = [s for s in secrets for text in [*outputs, *dump] if any(f in text for f in forms(s))]
    with capsys.disabled():
        print(
            f"\nsecrets [credentials directory + environment]: {len(outputs)} commands, "
            f"{errors} tasks with errors; hits = {len(hits)}"
        )
    assert hits == []
