"""The systemd units and the example configuration agree with the code and pass the unit lint."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from pydantic import BaseModel

from worker import config
from worker.config import SECRET_KEYS, load_config, parse_duration

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "systemd"
SERVICES = ("tasksync.service", "tasksync-sync.service")
EXAMPLE = SYSTEMD / "tasksync.toml"


def _values(unit: str, key: str) -> list[str]:
    text = (SYSTEMD / unit).read_text(encoding="utf-8")
    return re.findall(rf"^{key}=(.*)$", text, flags=re.MULTILINE)


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None and os.environ.get("CI") != "true",
    reason="systemd-analyze is not installed (CI=true makes this a failure)",
)
def test_lint_units_passes() -> None:
    result = subprocess.run(
        ["bash", str(ROOT / ".ci" / "lint-units")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "exposure" in result.stdout


@pytest.mark.parametrize("unit", SERVICES)
def test_every_secret_the_code_reads_is_loaded_as_a_credential(unit: str) -> None:
    expected = {f"{system}_{key}" for system, keys in SECRET_KEYS.items() for key in keys}
    expected.add("database_url")
    loaded = dict(line.split(":", 1) for line in _values(unit, "LoadCredential"))
    assert set(loaded) == expected
    # a relative source is searched in /etc/credstore and skipped when missing
    assert all(source == f"tasksync.{name}" for name, source in loaded.items())


def test_stop_timeout_leaves_room_for_the_drain_budget() -> None:
    (stop,) = _values("tasksync.service", "TimeoutStopSec")
    assert parse_duration(stop) > config.WorkerSettings().shutdown_timeout


def test_example_configuration_shows_every_key() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    sections: dict[str, type[BaseModel]] = {
        "database": config.DatabaseSettings,
        "worker": config.WorkerSettings,
        "retry": config.RetrySettings,
        "metrics": config.MetricsSettings,
        "aicc": config.AiccSettings,
        "secmaster": config.SecMasterSettings,
        "koodrive": config.KooDriveSettings,
    }
    missing = []
    for section, model in sections.items():
        secrets = SECRET_KEYS.get(section, ())
        for name in model.model_fields:
            # a secret is shown as the credential it comes from, any other key as `key =`
            shown = f"tasksync.{section}_{name}" if name in secrets else None
            if shown is not None and shown not in text:
                missing.append(shown)
            elif shown is None and not re.search(rf"^[# ]*{name} =", text, re.MULTILINE):
                missing.append(f"{section}.{name}")
    assert not missing, f"{EXAMPLE.name} does not show: {', '.join(missing)}"


def test_example_configuration_loads_as_shipped() -> None:
    loaded = load_config(str(EXAMPLE), environ={})
    assert loaded.settings.systems.aicc is None
    assert loaded.settings.worker.shutdown_timeout == 20.0
    # the listener is on, on loopback, on the one port the daemon's unit lets it bind
    listen = loaded.settings.metrics.listen
    assert listen is not None and listen.startswith("127.0.0.1:")
    unit = (SYSTEMD / "tasksync.service").read_text(encoding="utf-8")
    assert f"SocketBindAllow=tcp:{listen.rpartition(':')[2]}\n" in unit
    assert "SocketBindDeny=any\n" in unit


def test_example_configuration_loads_with_every_system_uncommented(tmp_path: Path) -> None:
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# [systems."))
    enabled = lines[:start] + [line.removeprefix("#").removeprefix(" ") for line in lines[start:]]
    path = tmp_path / "tasksync.toml"
    path.write_text("\n".join(enabled) + "\n", encoding="utf-8")
    path.chmod(0o600)
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    for name in ("aicc_client_secret", "secmaster_ak", "secmaster_sk", "koodrive_token"):
        (credentials / name).write_text(f"value-of-{name}\n", encoding="utf-8")
    loaded = load_config(str(path), environ={"CREDENTIALS_DIRECTORY": str(credentials)})
    systems = loaded.settings.systems
    assert systems.aicc is not None and systems.secmaster is not None
    assert systems.koodrive is not None
    assert systems.aicc.client_secret.get_secret_value() == "value-of-aicc_client_secret"
    assert systems.secmaster.auth_mode == "aksk"
    assert systems.koodrive.auth_mode == "token"
