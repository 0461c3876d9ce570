"""Pytest fixtures for a private PostgreSQL server, shared by every test directory.

Registered as a plugin by tests/conftest.py, so that the log store's tests and the gateway's
call-record tests start one server per session between them.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from postgres_server import PostgresServer, find_bin_dir


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    if find_bin_dir() is None:
        pytest.skip("PostgreSQL server binaries are not installed")
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> str:
    """A fresh, empty database on the session's server."""
    return postgres_server.create_database()
