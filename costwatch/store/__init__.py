"""The SQL store: every attempt as a row, and hourly rollups for reports (SQLite or PostgreSQL).

``SqlStore`` is the default sink of attempt records. ``costwatch.store.migrate`` runs the schema
migrations from code; the store also migrates its database on first use.
"""

from __future__ import annotations

from .database import DATABASE_URL_ENV, DEFAULT_DATABASE_URL, create_store_engine, database_url, safe_url
from .query import RollupTotals
from .schema import ATTEMPTS, ROLLUP_DIMENSIONS, ROLLUP_MEASURES, ROLLUPS, metadata
from .sink import DEFAULT_RETRY_WINDOW, SqlStore
from .write import BatchResult

__all__ = [
    "ATTEMPTS",
    "DATABASE_URL_ENV",
    "DEFAULT_DATABASE_URL",
    "DEFAULT_RETRY_WINDOW",
    "ROLLUPS",
    "ROLLUP_DIMENSIONS",
    "ROLLUP_MEASURES",
    "BatchResult",
    "RollupTotals",
    "SqlStore",
    "create_store_engine",
    "database_url",
    "metadata",
    "safe_url",
]
