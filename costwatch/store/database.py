"""Where the store lives and how to connect to it: URL resolution and engine setup per backend.

SQLite is the zero-configuration default. Several processes may write one SQLite file: the file is
put in WAL mode, every connection waits (busy timeout) instead of failing when another process
holds the write lock, and every transaction starts with ``BEGIN IMMEDIATE`` so a transaction takes
the write lock before it reads what it is about to change. PostgreSQL goes through psycopg 3.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.pool import StaticPool
from sqlalchemy.util import asbool

from ..settings import SettingsError
from .schema import declare_for

__all__ = [
    "DATABASE_URL_ENV",
    "DEFAULT_DATABASE_URL",
    "POSTGRES_CONNECT_TIMEOUT_S",
    "READ_ONLY_OPTION",
    "SQLITE_BUSY_TIMEOUT_S",
    "SQLITE_WAL_CHECKPOINT_PAGES",
    "SUPPORTED_BACKENDS",
    "checked_database_url",
    "create_store_engine",
    "database_url",
    "safe_url",
    "sqlite_path",
]

DATABASE_URL_ENV = "COSTWATCH_DATABASE_URL"
"""The environment variable naming the store's database."""

DEFAULT_DATABASE_URL = "sqlite:///costwatch.db"
"""A SQLite file in the working directory, created and migrated on first use."""

SQLITE_BUSY_TIMEOUT_S = 30.0
"""How long a SQLite writer waits for another process's write lock before failing."""

SQLITE_WAL_CHECKPOINT_PAGES = 10_000
"""WAL pages (4 KiB each) before a commit copies them back into the database file. The default
(1,000) made nearly every batch of 500 attempts pay for a checkpoint; fewer, larger checkpoints
write a page touched by several batches once."""

READ_ONLY_OPTION = "costwatch_read_only"
"""Execution option marking a connection that only reads, so on SQLite it does not take the write lock."""

POSTGRES_CONNECT_TIMEOUT_S = 5
"""How long connecting to PostgreSQL may take, so an unreachable server fails fast and records spool."""


def database_url(url: str | URL | None = None) -> URL:
    """The store's URL: ``url``, else ``$COSTWATCH_DATABASE_URL``, else a SQLite file here.

    ``postgresql://`` and ``postgres://`` URLs are normalised to the psycopg 3 driver.
    """
    raw = url if url is not None else (os.environ.get(DATABASE_URL_ENV) or DEFAULT_DATABASE_URL)
    parsed = make_url(raw) if isinstance(raw, str) else raw
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


SUPPORTED_BACKENDS = ("sqlite", "postgresql")
"""The databases the store can live in."""

_URL_EXAMPLES = "use e.g. sqlite:///costwatch.db or postgresql://user@host:5432/db"


def checked_database_url(
    url: str | URL | None = None, *, name: str | None = None, directory_must_exist: bool = True
) -> URL:
    """:func:`database_url`, refused at once if the store could never use it.

    Raises :class:`~costwatch.settings.SettingsError` in one line (never echoing a password) for
    text that is not a URL or has a non-numeric port, a backend other than SQLite or PostgreSQL, and
    a SQLite file whose directory does not exist (unless ``directory_must_exist`` is false: a store
    built for later, whose directory may yet appear), rather than at the first write. ``name`` is what
    the message calls the URL (default: ``database_url``, or its variable when it came from there).
    """
    from_environment = url is None or url == os.environ.get(DATABASE_URL_ENV)
    where = name or (f"{DATABASE_URL_ENV} (database_url)" if from_environment else "database_url")
    try:
        parsed = database_url(url)
    except (sa.exc.ArgumentError, ValueError):
        # The text may hold a password in a shape make_url cannot parse, so it is not echoed.
        raise SettingsError(
            f"{where} is not a database URL (or its port is not a number); {_URL_EXAMPLES}"
        ) from None
    backend = parsed.get_backend_name()
    shown = safe_url(parsed)
    if backend not in SUPPORTED_BACKENDS:
        raise SettingsError(
            f"{where}={shown} is a {backend} database; costwatch stores in SQLite or PostgreSQL: "
            f"{_URL_EXAMPLES}"
        )
    path = sqlite_path(parsed)
    if directory_must_exist and path is not None:
        folder = Path(path).absolute().parent
        if not folder.is_dir():
            raise SettingsError(
                f"{where}={shown}: the directory {folder} does not exist; create it or choose another path"
            )
    return parsed


def safe_url(url: str | URL) -> str:
    """The URL as text with any password masked, for logs and error messages."""
    return make_url(url).render_as_string(hide_password=True)


def sqlite_path(url: URL) -> str | None:
    """The path of the SQLite file ``url`` names, as written there (relative to the working directory
    if relative); ``None`` for another backend and for an in-memory database (no path, or ``:memory:``).

    A ``file:`` URI (``sqlite:///file:PATH?uri=true``, https://sqlite.org/uri.html) gives the path
    it names, percent-decoded; with ``mode=memory`` or no path it is in memory.
    """
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    database = str(url.database)
    uri = url.query.get("uri")
    if not (database.startswith("file:") and isinstance(uri, str) and asbool(uri)):
        return database
    if url.query.get("mode") == "memory":
        return None
    path = unquote(urlsplit(database).path)
    return None if path in ("", ":memory:") else path


def create_store_engine(url: str | URL | None = None) -> Engine:
    """An engine for the store's database, configured for concurrent writers on its backend."""
    resolved = database_url(url)
    backend = resolved.get_backend_name()
    declare_for(backend)  # the partial indexes' WHERE, in this backend's DDL only
    if backend == "sqlite":
        return _sqlite_engine(resolved)
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if backend == "postgresql" and "connect_timeout" not in resolved.query:
        kwargs["connect_args"] = {"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S}
    return sa.create_engine(resolved, **kwargs)


def _sqlite_engine(url: URL) -> Engine:
    connect_args: dict[str, Any] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
    kwargs: dict[str, Any] = {}
    in_memory = sqlite_path(url) is None
    if in_memory:
        # One shared connection, or every thread would see its own empty database.
        connect_args["check_same_thread"] = False
        kwargs["poolclass"] = StaticPool
    engine = sa.create_engine(url, connect_args=connect_args, **kwargs)

    @sa.event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        # The driver's own implicit BEGIN would be DEFERRED; take over transaction control.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
            if not in_memory:
                cursor.execute("PRAGMA journal_mode = WAL")
                cursor.execute("PRAGMA synchronous = NORMAL")
                cursor.execute(f"PRAGMA wal_autocheckpoint = {SQLITE_WAL_CHECKPOINT_PAGES}")
        finally:
            cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(connection: sa.Connection) -> None:
        # Writers take the write lock up front: a DEFERRED transaction that reads then writes can
        # fail with SQLITE_BUSY, without waiting, when another process commits in between.
        if connection.get_execution_options().get(READ_ONLY_OPTION):
            connection.exec_driver_sql("BEGIN")
        else:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine
