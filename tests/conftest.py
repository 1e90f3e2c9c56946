"""Shared fixtures. Database fixtures live in tests/dbfixtures.py (imported below)."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    # aiohttp and SQLAlchemy's async engine are asyncio libraries: anyio runs on asyncio only.
    return "asyncio"
