"""Schema migrations run from code (no ``alembic.ini``): upgrade, downgrade, and the current revision.

Every migration runs in one transaction under a lock, so many workers starting at once against a
fresh database migrate it exactly once: PostgreSQL takes a transaction-scoped ``pg_advisory_lock``
(keyed by schema), SQLite takes its write lock (``BEGIN IMMEDIATE``).
"""

from __future__ import annotations

import importlib.resources
import logging
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import URL, Engine

from .database import READ_ONLY_OPTION, create_store_engine, safe_url
from .schema import VERSION_TABLE

__all__ = [
    "current",
    "downgrade",
    "ensure_migrated",
    "head",
    "migrations_path",
    "upgrade",
]

log = logging.getLogger("costwatch")

_LOCK_SQL = sa.text("SELECT pg_advisory_xact_lock(hashtext('costwatch.migrate:' || current_schema()))")


def migrations_path() -> Path:
    """The Alembic scripts: packaged as ``costwatch/_migrations`` in a wheel, else the repository's."""
    packaged = importlib.resources.files("costwatch") / "_migrations"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "migrations"


def _config(connection: sa.Connection | None = None) -> Config:
    config = Config()
    # ConfigParser interpolation would read a '%' in the path as a placeholder.
    config.set_main_option("script_location", str(migrations_path()).replace("%", "%%"))
    config.attributes["connection"] = connection
    return config


def head() -> str:
    """The newest revision the migration scripts define."""
    revision = ScriptDirectory.from_config(_config()).get_current_head()
    assert revision is not None, "the migration scripts define no revision"
    return revision


def _engine_for(url: str | URL | Engine | None) -> tuple[Engine, bool]:
    if isinstance(url, Engine):
        return url, False
    return create_store_engine(url), True


def _current_on(connection: sa.Connection) -> str | None:
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


def current(url: str | URL | Engine | None = None) -> str | None:
    """The revision the database is at; ``None`` before the first migration."""
    engine, owned = _engine_for(url)
    try:
        with engine.connect().execution_options(**{READ_ONLY_OPTION: True}) as connection:
            return _current_on(connection)
    finally:
        if owned:
            engine.dispose()


def _migrate(url: str | URL | Engine | None, revision: str, *, up: bool) -> None:
    engine, owned = _engine_for(url)
    try:
        with engine.connect() as connection, connection.begin():
            if connection.dialect.name == "postgresql":
                connection.execute(_LOCK_SQL)
            before = _current_on(connection)
            config = _config(connection)
            if up:
                command.upgrade(config, revision)
            else:
                command.downgrade(config, revision)
            after = _current_on(connection)
            if after != before:
                log.info(
                    "costwatch: migrated %s from %s to %s",
                    safe_url(engine.url),
                    before or "base",
                    after or "base",
                )
    finally:
        if owned:
            engine.dispose()


def upgrade(url: str | URL | Engine | None = None, revision: str = "head") -> None:
    """Migrate the database up to ``revision`` (by default the newest)."""
    _migrate(url, revision, up=True)


def downgrade(url: str | URL | Engine | None, revision: str) -> None:
    """Migrate the database down to ``revision`` (``"base"`` removes the store's tables)."""
    _migrate(url, revision, up=False)


def ensure_migrated(engine: Engine) -> None:
    """Bring the database to the newest revision unless it is there already (the cheap common case).

    A database migrated by a newer costwatch (a revision these scripts do not know) is left alone.
    """
    at = current(engine)
    if at == head():
        return
    if at is not None and at not in _known_revisions():
        log.warning(
            "costwatch: %s is at schema revision %s, newer than this costwatch knows; not migrating",
            safe_url(engine.url),
            at,
        )
        return
    upgrade(engine)


def _known_revisions() -> set[str]:
    return {script.revision for script in ScriptDirectory.from_config(_config()).walk_revisions()}
