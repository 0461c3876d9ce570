"""The two SQL databases call records and rollups live in: SQLite (default) and PostgreSQL.

One `Database` names where the data is and how to talk to it: `connect()` opens a DB-API
connection in autocommit mode, `transaction()` wraps work in a transaction that also
serialises writers (SQLite: `BEGIN IMMEDIATE`; PostgreSQL: a transaction-scoped advisory
lock), and `sql()` turns the `?` placeholders the shared statements are written with into the
driver's. Only what really differs, `executemany` against `COPY` and day partitions, lives in
the backend's sink; the rollup and query statements are shared.

Connections are opened by the thread that uses them (the pipeline's writer thread, or the
thread an admin request runs a query in), one per user, never shared between threads at once.

SQLite runs in WAL mode: readers never block the writer nor the writer readers, and every
worker process of a node writes the same file, one transaction at a time (a `busy_timeout`
makes the others wait rather than fail). `synchronous=NORMAL` is durable against a crash of
the process, not of the machine, which suits logs.

Schema versions: a table `tollgate_schema(component, version)` holds, per component (call
records, rollups), how many of its migration steps have run; `migrate` runs the rest, each
step in its own transaction, so two processes starting together cannot both run one.
"""

from __future__ import annotations

import sqlite3
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import unquote, urlsplit

import psycopg

__all__ = [
    "Database",
    "PostgresDatabase",
    "SqliteDatabase",
    "migrate",
    "open_database",
    "schema_version",
]

# How long a SQLite writer waits for another process's transaction before failing.
SQLITE_BUSY_TIMEOUT_S: Final = 10.0

_SCHEMA_TABLE = (
    "CREATE TABLE IF NOT EXISTS tollgate_schema ("
    "component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
)


class Database(ABC):
    """Where call records and rollups are stored, and how to reach it."""

    kind: Literal["sqlite", "postgres"]
    blob_type: str
    json_type: str
    real_type: str
    int_type: str

    @abstractmethod
    def connect(self) -> Any:
        """A new DB-API connection in autocommit mode, for the calling thread."""

    @abstractmethod
    def transaction(self, connection: Any) -> Any:
        """A context manager: one transaction that excludes other writers until it ends."""

    @abstractmethod
    def sql(self, statement: str) -> str:
        """`statement`, written with `?` placeholders, in the driver's placeholder style."""

    def usable(self, connection: Any) -> bool:
        """Whether `connection` can still be used, or must be replaced by a new one."""
        return True


class SqliteDatabase(Database):
    kind: Literal["sqlite", "postgres"] = "sqlite"
    blob_type = "BLOB"
    json_type = "TEXT"
    real_type = "REAL"
    int_type = "INTEGER"

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)

    def connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(
            self.path,
            timeout=SQLITE_BUSY_TIMEOUT_S,
            isolation_level=None,  # autocommit; transactions are explicit
            check_same_thread=False,  # opened by one thread, used by the one that owns it
        )
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        return connection

    @contextmanager
    def transaction(self, connection: sqlite3.Connection) -> Iterator[sqlite3.Cursor]:
        cursor = connection.cursor()
        cursor.execute("BEGIN IMMEDIATE")
        try:
            yield cursor
        except BaseException:
            connection.rollback()
            raise
        else:
            connection.commit()
        finally:
            cursor.close()

    def sql(self, statement: str) -> str:
        return statement

    def __repr__(self) -> str:
        return f"SqliteDatabase({self.path!r})"


# Advisory lock keys: an arbitrary constant per purpose, the same in every process.
ADVISORY_LOCK_WRITERS: Final = zlib.crc32(b"tollgate.observe.writers")


class PostgresDatabase(Database):
    kind: Literal["sqlite", "postgres"] = "postgres"
    blob_type = "BYTEA"
    json_type = "JSONB"
    real_type = "DOUBLE PRECISION"
    int_type = "BIGINT"

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    def connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn, autocommit=True)

    @contextmanager
    def transaction(self, connection: psycopg.Connection[Any]) -> Iterator[psycopg.Cursor[Any]]:
        with connection.transaction(), connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK_WRITERS,))
            yield cursor

    def sql(self, statement: str) -> str:
        return statement.replace("?", "%s")

    def usable(self, connection: psycopg.Connection[Any]) -> bool:
        return not (connection.closed or connection.broken)  # e.g. the server restarted

    def __repr__(self) -> str:
        parts = urlsplit(self.dsn)
        where = parts.hostname or "local socket"
        return f"PostgresDatabase({where}{parts.path})"  # never the password


def open_database(url: str) -> Database:
    """`sqlite:///relative.db`, `sqlite:////absolute.db` or `postgresql://...` as a Database."""
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresDatabase(url)
    if url.startswith("sqlite://"):
        path = unquote(url[len("sqlite://") :])
        if path.startswith("/"):
            path = path[1:]  # sqlite:///rel.db is "rel.db"; sqlite:////abs.db is "/abs.db"
        if not path:
            raise ValueError(f"storage URL {url!r} names no file")
        return SqliteDatabase(path)
    raise ValueError(f"storage URL {url!r}: use sqlite:///FILE or postgresql://...")


def schema_version(database: Database, connection: Any, component: str) -> int:
    """The version `component`'s schema is at (0: none yet), read without taking a lock."""
    cursor = connection.cursor()
    try:
        cursor.execute(
            database.sql("SELECT version FROM tollgate_schema WHERE component = ?"), (component,)
        )
        row = cursor.fetchone()
    except (sqlite3.OperationalError, psycopg.errors.UndefinedTable):
        return 0  # no schema table yet
    finally:
        cursor.close()
    return int(row[0]) if row else 0


def migrate(
    database: Database, connection: Any, component: str, steps: Sequence[Sequence[str]]
) -> int:
    """Run the migration steps of `component` not yet run; the schema version it is now at.

    When the schema is current (every start but the first), this is one read and no lock:
    readers such as analytics queries call it too.
    """
    version = schema_version(database, connection, component)
    if version >= len(steps):
        return version
    for number, statements in enumerate(steps, start=1):
        with database.transaction(connection) as cursor:
            cursor.execute(_SCHEMA_TABLE)
            cursor.execute(
                database.sql("SELECT version FROM tollgate_schema WHERE component = ?"),
                (component,),
            )
            row = cursor.fetchone()
            version = row[0] if row else 0
            if version >= number:
                continue
            for statement in statements:
                cursor.execute(statement)
            cursor.execute(
                database.sql(
                    "INSERT INTO tollgate_schema (component, version) VALUES (?, ?) "
                    "ON CONFLICT (component) DO UPDATE SET version = excluded.version"
                ),
                (component, number),
            )
            version = number
    return version
