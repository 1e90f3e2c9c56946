"""Configuration: TOML file + `TASKSYNC_<SECTION>__<KEY>` environment + `$CREDENTIALS_DIRECTORY`.

Validation is pydantic; the merging of the three sources is written here rather than with
pydantic-settings because its secrets directory maps only top-level field names (systemd
credentials here are named `aicc_client_secret`, i.e. nested keys) and because every error must
name the key *and where it came from* (file, environment variable or credential file).
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

ENV_PREFIX = "TASKSYNC_"
DEFAULT_PATHS = (Path("tasksync.toml"), Path("/etc/tasksync/tasksync.toml"))
EX_CONFIG = 78

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")
MAX_DURATION = 10 * 365 * 86400.0  # beyond this, timestamps computed from it overflow
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class ConfigError(Exception):
    """Bad configuration: the message names the key. The CLI exits 78 on it."""


def parse_duration(value: object) -> float:
    """Seconds from a number or a string such as "90s", "5m", "1h30m", "250ms"."""
    if isinstance(value, bool):
        raise ValueError('expected a duration such as 30, "90s", "5m" or "1h"')
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        try:
            seconds = float(text)
        except ValueError:
            pos, seconds = 0, 0.0
            for match in _DURATION_PART.finditer(text):
                if match.start() != pos and text[pos : match.start()].strip():
                    break
                seconds += float(match.group(1)) * _UNITS[match.group(2)]
                pos = match.end()
            if pos == 0 or text[pos:].strip():
                raise ValueError(
                    f'{value!r} is not a duration: use seconds or a string like "90s", "5m", "1h"'
                ) from None
    else:
        raise ValueError('expected a duration such as 30, "90s", "5m" or "1h"')
    if seconds < 0 or seconds != seconds or seconds == float("inf"):
        raise ValueError("a duration must be a finite number of seconds, zero or more")
    if seconds > MAX_DURATION:
        raise ValueError(f"{value!r} is longer than ten years, the longest duration accepted")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


@dataclass(frozen=True, slots=True)
class Schedule:
    """When a loop starts: a cron expression or a fixed interval."""

    cron: str | None = None
    interval: float | None = None

    def __str__(self) -> str:
        return self.cron if self.cron is not None else f"every {self.interval:g}s"


def parse_schedule(value: object) -> Schedule:
    if isinstance(value, Schedule):
        return value
    if isinstance(value, str) and len(value.split()) == 5:
        # Validated with the trigger that will run it, so a bad field fails at start-up.
        from apscheduler.triggers.cron import CronTrigger

        try:
            CronTrigger.from_crontab(value, timezone="UTC")
        except ValueError as exc:
            raise ValueError(f"{value!r} is not a valid cron expression: {exc}") from None
        return Schedule(cron=value)
    try:
        seconds = parse_duration(value)
    except ValueError:
        raise ValueError(
            f'{value!r} is neither a 5-field cron expression nor a duration such as "30s"'
        ) from None
    if seconds <= 0:
        raise ValueError("an interval schedule must be longer than zero")
    return Schedule(interval=seconds)


ScheduleField = Annotated[Schedule, BeforeValidator(parse_schedule)]


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_base_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s) URL")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise ValueError(
            f"{url!r} uses http:// to a non-loopback host: secrets would cross the network in "
            "clear text; use https://"
        )
    if parts.username or parts.password:
        raise ValueError("the URL must not carry credentials: use the credential keys")
    return url.rstrip("/")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatabaseSettings(_Section):
    url: str = "sqlite:///tasksync.db"


class WorkerSettings(_Section):
    sync_schedule: ScheduleField = Schedule(cron="*/5 * * * *")
    poll_interval: Duration = 300.0
    terminal_poll_interval: Duration = 86400.0
    concurrency: int = Field(default=32, ge=1, le=4096)
    lease: Duration = Field(default=60.0, gt=0)
    discover_schedule: ScheduleField = Schedule(cron="0 * * * *")
    # additions beyond the contract
    batch_size: int = Field(default=500, ge=1, le=10_000)  # tasks claimed and written per batch
    shutdown_timeout: Duration = 20.0  # drain budget on SIGTERM; below the unit's TimeoutStopSec
    action_poll_interval: Duration = Field(default=2.0, gt=0)  # wake-up when no notification
    max_poll_backoff: Duration = 3600.0  # cap of the backoff of a failing task


class RetrySettings(_Section):
    max_attempts: int = Field(default=8, ge=1, le=1000)
    base_delay: Duration = 2.0
    max_delay: Duration = 600.0


PositiveDuration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]


class RetentionSettings(_Section):
    """What `prune` may delete. Every key optional: an absent age keeps that data forever."""

    snapshots: PositiveDuration | None = None  # a task's newest snapshot is never deleted
    events: PositiveDuration | None = None
    actions: PositiveDuration | None = None  # finished ones, with their attempts
    sync_runs: PositiveDuration | None = None
    untracked: PositiveDuration | None = None  # untracked this long: the task and all its rows
    # when `run` prunes; absent: daily at 03:30 UTC, but only once some age above is set
    schedule: ScheduleField = Schedule(cron="30 3 * * *")
    batch_size: int = Field(default=2000, ge=1, le=10_000)  # rows per delete transaction

    @property
    def configured(self) -> bool:
        return any(
            v is not None
            for v in (self.snapshots, self.events, self.actions, self.sync_runs, self.untracked)
        )


class _SystemSettings(_Section):
    base_url: str
    rate_limit: float | None = Field(default=None, gt=0)
    timeout: Duration = Field(default=30.0, gt=0)
    max_body_bytes: int = Field(default=5_000_000, ge=1024)
    ca_file: str | None = None  # extra CA bundle; TLS verification itself cannot be turned off

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_base_url(value)


class AiccSettings(_SystemSettings):
    client_id: str
    client_secret: SecretStr
    creator_id: str | None = None
    discover: bool = False
    timezone: str = "UTC"

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value


class SecMasterSettings(_SystemSettings):
    project_id: str
    workspace_id: str
    discover: bool = False
    # which ListTasks lists discovery walks: to-dos still waiting, and/or those dealt with
    discover_query_types: tuple[Literal["my_todo", "all_handled"], ...] = ("my_todo",)
    ak: str | None = None
    sk: SecretStr | None = None
    iam_url: str | None = None
    username: str | None = None
    password: SecretStr | None = None
    domain: str | None = None
    region: str | None = None
    token: SecretStr | None = None

    @field_validator("discover_query_types", mode="before")
    @classmethod
    def _query_types(cls, value: object) -> object:
        if isinstance(value, str):  # from the environment: "my_todo,all_handled"
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list | tuple):
            if not value:
                raise ValueError("must name at least one list (my_todo, all_handled)")
            return tuple(dict.fromkeys(value))
        return value

    @field_validator("iam_url")
    @classmethod
    def _iam(cls, value: str | None) -> str | None:
        return None if value is None else check_base_url(value)

    @model_validator(mode="after")
    def _one_auth_mode(self) -> SecMasterSettings:
        modes = {
            "ak/sk": ("ak", "sk"),
            "iam": ("iam_url", "username", "password", "domain"),
            "token": ("token",),
        }
        _check_auth_modes(self, modes)
        if self.iam_url and not self.region:
            raise ValueError("region is required with iam_url (the IAM token is scoped to it)")
        return self

    @property
    def auth_mode(self) -> Literal["aksk", "iam", "token"]:
        if self.ak is not None:
            return "aksk"
        return "iam" if self.iam_url is not None else "token"


class KooDriveSettings(_SystemSettings):
    token: SecretStr | None = None
    app_id: str | None = None
    app_secret: SecretStr | None = None
    user_id: str | None = None

    @model_validator(mode="after")
    def _one_auth_mode(self) -> KooDriveSettings:
        _check_auth_modes(self, {"token": ("token",), "app": ("app_id", "app_secret", "user_id")})
        return self

    @property
    def auth_mode(self) -> Literal["token", "app"]:
        return "token" if self.token is not None else "app"


def _check_auth_modes(section: BaseModel, modes: Mapping[str, tuple[str, ...]]) -> None:
    given = {
        name: [k for k in keys if getattr(section, k) is not None] for name, keys in modes.items()
    }
    used = [name for name, keys in given.items() if keys]
    if len(used) > 1:
        keys = ", ".join(k for name in used for k in given[name])
        raise ValueError(f"two auth modes at once ({' and '.join(used)}: {keys}); keep one")
    if not used:
        options = " or ".join("+".join(keys) for keys in modes.values())
        raise ValueError(f"no credentials: set {options}")
    missing = [k for k in modes[used[0]] if getattr(section, k) is None]
    if missing:
        raise ValueError(f"{used[0]} auth needs {', '.join(missing)} too")


class SystemsSettings(_Section):
    aicc: AiccSettings | None = None
    secmaster: SecMasterSettings | None = None
    koodrive: KooDriveSettings | None = None


def split_listen(value: str) -> tuple[str, int]:
    """("127.0.0.1", 9464) from "127.0.0.1:9464"; IPv6 in brackets: "[::1]:9464"."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f'{value!r} is not host:port, e.g. "127.0.0.1:9464"')
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            raise ValueError(f"{value!r}: an IPv6 address goes in brackets, e.g. [::1]:9464")
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{value!r}: put an IPv6 address in brackets, e.g. [::1]:9464")
    number = int(port)
    if not 0 <= number <= 65535:
        raise ValueError(f"{value!r}: port {number} is out of range (0 to 65535)")
    return host, number


class MetricsSettings(_Section):
    listen: str | None = None  # host:port of `run`'s /metrics, /livez, /readyz; None: off

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        if value is None:
            return None
        split_listen(value.strip())
        return value.strip()


class Settings(_Section):
    database: DatabaseSettings = DatabaseSettings()
    worker: WorkerSettings = WorkerSettings()
    retry: RetrySettings = RetrySettings()
    retention: RetentionSettings = RetentionSettings()
    systems: SystemsSettings = SystemsSettings()
    metrics: MetricsSettings = MetricsSettings()


# Keys that hold secrets, per system: these may come from $CREDENTIALS_DIRECTORY/<system>_<key>.
SECRET_KEYS: dict[str, tuple[str, ...]] = {
    "aicc": ("client_secret",),
    "secmaster": ("ak", "sk", "password", "token"),
    "koodrive": ("token", "app_secret"),
}


@dataclass(frozen=True)
class LoadedConfig:
    settings: Settings
    path: Path | None
    warnings: list[str] = field(default_factory=list)


def find_config_file(explicit: str | None, environ: Mapping[str, str]) -> Path | None:
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"config file {explicit} does not exist")
        return path
    env_path = environ.get("TASKSYNC_CONFIG")
    if env_path:
        path = Path(env_path)
        if not path.is_file():
            raise ConfigError(f"config file {env_path} (from TASKSYNC_CONFIG) does not exist")
        return path
    for candidate in DEFAULT_PATHS:
        if candidate.is_file():
            return candidate
    return None


def load_config(
    explicit: str | None = None, environ: Mapping[str, str] | None = None
) -> LoadedConfig:
    """Read, merge and validate the configuration. Raises ConfigError naming the key."""
    env = os.environ if environ is None else environ
    path = find_config_file(explicit, env)
    data: dict[str, Any] = {}
    origin: dict[tuple[str, ...], str] = {}
    warnings: list[str] = []
    if path is not None:
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8"
            ) from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        _mark_origin(data, (), str(path), origin)
        warnings += _inline_secret_warnings(path, data)

    _apply_credentials(data, env, origin)
    _apply_environment(data, env, origin)
    _resolve_database_path(data, env)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, origin)) from None
    return LoadedConfig(settings=settings, path=path, warnings=warnings)


def _mark_origin(
    node: Any, prefix: tuple[str, ...], source: str, origin: dict[tuple[str, ...], str]
) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            _mark_origin(value, (*prefix, str(key)), source, origin)
    else:
        origin[prefix] = source


def _set_path(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path)}: {part} is not a section")
        node = child
    node[path[-1]] = value


def _apply_environment(
    data: dict[str, Any], env: Mapping[str, str], origin: dict[tuple[str, ...], str]
) -> None:
    for name, value in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        path = tuple(part.lower() for part in name[len(ENV_PREFIX) :].split("__"))
        if any(not part for part in path):
            raise ConfigError(f"{name}: malformed variable name (empty section or key)")
        _set_path(data, path, value)
        origin[path] = name


def _apply_credentials(
    data: dict[str, Any], env: Mapping[str, str], origin: dict[tuple[str, ...], str]
) -> None:
    directory = env.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return
    base = Path(directory)
    systems = data.get("systems") if isinstance(data.get("systems"), dict) else {}
    for system, keys in SECRET_KEYS.items():
        for key in keys:
            file = base / f"{system}_{key}"
            if not file.is_file():
                continue
            section = systems.get(system) if isinstance(systems, dict) else None
            # A credential fills a key; it does not enable a system on its own (a unit may
            # load credentials for systems it has not configured).
            if section is None and not any(
                n.startswith(f"{ENV_PREFIX}SYSTEMS__{system.upper()}__") for n in env
            ):
                continue
            try:
                secret = file.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(
                    f"systems.{system}.{key}: cannot read credential file {file}: {exc}"
                ) from None
            _set_path(data, ("systems", system, key), secret)
            origin[("systems", system, key)] = f"credential {file}"
    db_file = base / "database_url"
    if db_file.is_file():
        _set_path(data, ("database", "url"), db_file.read_text(encoding="utf-8").strip())
        origin[("database", "url")] = f"credential {db_file}"


def _resolve_database_path(data: dict[str, Any], env: Mapping[str, str]) -> None:
    """Relative SQLite paths resolve against $STATE_DIRECTORY when set, else the working dir."""
    database = data.get("database")
    url = database.get("url") if isinstance(database, dict) else None
    if url is None:
        url = DatabaseSettings().url
    if not isinstance(url, str):
        return
    for prefix in ("sqlite:///", "sqlite+aiosqlite:///"):
        if url.startswith(prefix):
            rest = url[len(prefix) :]
            if rest and not rest.startswith("/") and not rest.startswith(":memory:"):
                base = Path(env.get("STATE_DIRECTORY", "").split(":")[0] or os.getcwd())
                url = prefix + str((base / rest).resolve())
                _set_path(data, ("database", "url"), url)
            break


def _inline_secret_warnings(path: Path, data: dict[str, Any]) -> list[str]:
    try:
        mode = path.stat().st_mode
    except OSError:
        return []
    if not mode & (stat.S_IROTH | stat.S_IRGRP):
        return []
    systems = data.get("systems")
    found = []
    if isinstance(systems, dict):
        for system, keys in SECRET_KEYS.items():
            section = systems.get(system)
            if isinstance(section, dict):
                found += [f"systems.{system}.{k}" for k in keys if k in section]
    if not found:
        return []
    who = "everyone" if mode & stat.S_IROTH else "its group"
    return [
        f"{path} is readable by {who} and holds secrets inline ({', '.join(found)}); "
        f"chmod 600 it or move them to $CREDENTIALS_DIRECTORY (LoadCredential=)"
    ]


def _describe(exc: ValidationError, origin: Mapping[tuple[str, ...], str]) -> str:
    lines = []
    for error in exc.errors(include_url=False, include_input=False):
        loc = tuple(str(p) for p in error["loc"])
        key = ".".join(loc) or "(top level)"
        source = origin.get(loc)
        where = f" (from {source})" if source else ""
        if error["type"] == "extra_forbidden":
            lines.append(f"{key}{where}: unknown key")
        elif error["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        else:
            message = str(error["msg"]).removeprefix("Value error, ")
            lines.append(f"{key}{where}: {message}")
    return "; ".join(lines)
