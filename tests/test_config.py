"""Configuration: discovery order, environment, credentials, durations, errors naming keys."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from worker.config import ConfigError, load_config, parse_duration, parse_schedule

AICC = '[systems.aicc]\nbase_url = "https://aicc.example.com"\nclient_id = "id"\nclient_secret = "s3cret-aicc"\n'


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (30, 30.0),
        (1.5, 1.5),
        ("90s", 90.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("250ms", 0.25),
        ("2d", 172800.0),
        (" 10 ", 10.0),
    ],
)
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["", "5x", "m5", "-1", True, None, "1h garbage", float("nan")])
def test_bad_durations(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


def test_schedules() -> None:
    assert parse_schedule("*/5 * * * *").cron == "*/5 * * * *"
    assert parse_schedule("30s").interval == 30.0
    with pytest.raises(ValueError, match="cron"):
        parse_schedule("61 * * * *")
    with pytest.raises(ValueError):
        parse_schedule("every tuesday")


def test_defaults_without_any_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    loaded = load_config(environ={})
    assert loaded.path is None
    assert loaded.settings.database.url == f"sqlite:///{tmp_path.resolve()}/tasksync.db"
    assert loaded.settings.systems.aicc is None and loaded.settings.worker.concurrency == 32


def test_discovery_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    local = write(tmp_path / "tasksync.toml", "[worker]\nconcurrency = 1\n")
    env_file = write(tmp_path / "env.toml", "[worker]\nconcurrency = 2\n")
    explicit = write(tmp_path / "explicit.toml", "[worker]\nconcurrency = 3\n")
    assert load_config(environ={}).path == Path("tasksync.toml")
    assert load_config(environ={"TASKSYNC_CONFIG": str(env_file)}).settings.worker.concurrency == 2
    assert (
        load_config(
            str(explicit), environ={"TASKSYNC_CONFIG": str(env_file)}
        ).settings.worker.concurrency
        == 3
    )
    assert local.exists()


def test_environment_overrides_and_enables(tmp_path: Path) -> None:
    config = write(tmp_path / "c.toml", AICC + '[worker]\npoll_interval = "10m"\n')
    loaded = load_config(
        str(config),
        environ={
            "TASKSYNC_WORKER__POLL_INTERVAL": "90s",
            "TASKSYNC_SYSTEMS__KOODRIVE__BASE_URL": "https://cn.myhuaweicloud-koodrive.com",
            "TASKSYNC_SYSTEMS__KOODRIVE__TOKEN": "tok-123456",
            "TASKSYNC_TEST_POSTGRES_URL": "ignored: no double underscore",
        },
    )
    assert loaded.settings.worker.poll_interval == 90.0
    koodrive = loaded.settings.systems.koodrive
    assert koodrive is not None and koodrive.token is not None
    assert koodrive.token.get_secret_value() == "tok-123456"
    assert "tok-123456" not in repr(loaded.settings)


def test_credentials_directory_fills_secrets(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "aicc_client_secret").write_text("from-credential\n")
    (creds / "secmaster_sk").write_text("sk-for-a-system-not-configured")
    (creds / "database_url").write_text("postgresql://u:pw@db.example/tasksync\n")
    config = write(tmp_path / "c.toml", AICC.replace('client_secret = "s3cret-aicc"\n', ""))
    loaded = load_config(str(config), environ={"CREDENTIALS_DIRECTORY": str(creds)})
    aicc = loaded.settings.systems.aicc
    assert aicc is not None and aicc.client_secret.get_secret_value() == "from-credential"
    assert loaded.settings.systems.secmaster is None  # a credential never enables a system
    assert loaded.settings.database.url == "postgresql://u:pw@db.example/tasksync"


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("[worker]\nconcurency = 3\n", {}, "worker.concurency"),
        (
            "",
            {"TASKSYNC_RETRY__MAX_ATTEMPT": "3"},
            "retry.max_attempt (from TASKSYNC_RETRY__MAX_ATTEMPT): unknown key",
        ),
        (
            '[systems.aicc]\nbase_url = "https://a.example"\n',
            {},
            "systems.aicc.client_id: required key is missing",
        ),
        (AICC.replace("https://", "http://"), {}, "systems.aicc.base_url"),
        (
            '[systems.secmaster]\nbase_url = "https://s.example"\nproject_id = "p"\nworkspace_id = "w"\nak = "a"\nsk = "b"\ntoken = "t"\n',
            {},
            "two auth modes",
        ),
        (
            '[systems.secmaster]\nbase_url = "https://s.example"\nproject_id = "p"\nworkspace_id = "w"\nak = "a"\n',
            {},
            "needs sk",
        ),
        ('[systems.koodrive]\nbase_url = "https://k.example"\n', {}, "no credentials"),
        ("[worker]\nconcurrency = 0\n", {}, "worker.concurrency"),
        ('[worker]\npoll_interval = "soon"\n', {}, "worker.poll_interval"),
        ("[systems.nosuch]\nx = 1\n", {}, "systems.nosuch"),
        ("not toml [", {}, "not valid TOML"),
        (AICC + 'timezone = "Mars/Olympus"\n', {}, "unknown time zone"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, env: dict[str, str], message: str) -> None:
    config = write(tmp_path / "c.toml", text)
    with pytest.raises(ConfigError, match=None) as info:
        load_config(str(config), environ=env)
    assert message in str(info.value)
    assert "s3cret-aicc" not in str(info.value)


def test_loopback_http_is_allowed(tmp_path: Path) -> None:
    for host in ("127.0.0.1:8080", "localhost", "[::1]:9"):
        config = write(
            tmp_path / "c.toml", AICC.replace("https://aicc.example.com", f"http://{host}")
        )
        assert load_config(str(config), environ={}).settings.systems.aicc is not None


def test_world_readable_inline_secrets_warn(tmp_path: Path) -> None:
    config = write(tmp_path / "c.toml", AICC, mode=0o644)
    warnings = load_config(str(config), environ={}).warnings
    assert len(warnings) == 1 and "systems.aicc.client_secret" in warnings[0]
    assert "s3cret-aicc" not in warnings[0]
    private = write(tmp_path / "p.toml", AICC, mode=0o600)
    assert load_config(str(private), environ={}).warnings == []


def test_state_directory_resolves_sqlite_paths(tmp_path: Path) -> None:
    loaded = load_config(
        environ={"STATE_DIRECTORY": str(tmp_path), "TASKSYNC_DATABASE__URL": "sqlite:///x.db"}
    )
    assert loaded.settings.database.url == f"sqlite:///{tmp_path.resolve()}/x.db"
    absolute = load_config(environ={"TASKSYNC_DATABASE__URL": "sqlite:////var/tmp/y.db"})
    assert absolute.settings.database.url == "sqlite:////var/tmp/y.db"
    assert os.path.isabs(absolute.settings.database.url.removeprefix("sqlite:///"))
