"""Fixtures for the log store's integration tests: each backend in turn.

The PostgreSQL server (`postgres_server`, `postgres_dsn`) comes from tests/support/
postgres_fixtures.py, shared with the gateway's call-record tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tollgate.observe.database import Database, PostgresDatabase, SqliteDatabase


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    """Each backend in turn: a SQLite file, then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return SqliteDatabase(tmp_path / "tollgate.db")
    return PostgresDatabase(request.getfixturevalue("postgres_dsn"))
