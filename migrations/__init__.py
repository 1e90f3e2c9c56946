"""Alembic revisions; shipped inside the wheel as `worker.migrations`."""
