"""The contract suite's fixtures: its own simulator, and databases of both kinds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.contract_sim import ContractSim
from tests.support.db import IN_CI, PG_URL, Database, fresh_database


@pytest.fixture
def sim() -> Iterator[ContractSim]:
    s = ContractSim().start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'contract.db'}"


@pytest.fixture
def pg_database(tmp_path: Path, _templates: dict[str, str]) -> Iterator[Database | None]:
    """A clean, migrated PostgreSQL database, or None without a server (CI=true: a failure)."""
    if not PG_URL and not IN_CI:
        yield None
        return
    with fresh_database("postgres", _templates, tmp_path) as db:
        yield db
