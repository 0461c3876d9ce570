"""Retention: raw call records are kept `records_days`, rollups longer, then deleted.

`apply_retention` is one blocking call, for a background task to run in a thread now and
then (hourly is plenty): `await asyncio.to_thread(apply_retention, database, now=...)`. It
opens its own connections, so it never shares one with the log writer. On PostgreSQL raw
records go a whole day partition at a time; on SQLite in small transactions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from tollgate.observe.database import Database, PostgresDatabase, SqliteDatabase
from tollgate.observe.rollups import DAY, prune_rollups
from tollgate.observe.sinks import postgres, sqlite

__all__ = ["DEFAULT_RECORDS_DAYS", "RetentionResult", "apply_retention"]

DEFAULT_RECORDS_DAYS: Final = 14.0


@dataclass(frozen=True, slots=True)
class RetentionResult:
    records_deleted: int  # SQLite: rows deleted
    partitions_dropped: tuple[str, ...]  # PostgreSQL: day partitions dropped
    rollup_rows_deleted: int


def apply_retention(
    database: Database,
    *,
    now: float,
    records_days: float = DEFAULT_RECORDS_DAYS,
    minute_days: float = 7,
    hour_days: float = 90,
    day_days: float | None = None,
) -> RetentionResult:
    """Delete raw records older than `records_days` and rollups past their own retention."""
    cutoff = now - records_days * DAY
    deleted = 0
    dropped: tuple[str, ...] = ()
    if isinstance(database, PostgresDatabase):
        dropped = tuple(postgres.drop_partitions_before(database, cutoff))
    elif isinstance(database, SqliteDatabase):
        deleted = sqlite.delete_records_before(database, cutoff)
    rollups = prune_rollups(
        database, now, minute_days=minute_days, hour_days=hour_days, day_days=day_days
    )
    return RetentionResult(deleted, dropped, rollups)
