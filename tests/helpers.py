"""Names kept importable from here for tests that use them; they live in tests/support/."""

from tests.support.db import count, rows
from tests.support.sandbox import clients, settings_for, track_all

__all__ = ["clients", "count", "rows", "settings_for", "track_all"]
