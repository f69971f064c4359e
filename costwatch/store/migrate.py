"""Schema migrations run from code (no ``alembic.ini``): upgrade, downgrade, and the current revision.

Every migration runs in one transaction under a lock, so many workers starting at once against a
fresh database migrate it exactly once: PostgreSQL takes a transaction-scoped ``pg_advisory_lock``
(keyed by schema), SQLite takes its write lock (``BEGIN IMMEDIATE``).
"""

from __future__ import annotations

import importlib.resources
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine

from .database import READ_ONLY_OPTION, create_store_engine, safe_url
from .schema import VERSION_TABLE

if TYPE_CHECKING:
    from alembic.config import Config

# Alembic is imported where it is used: a process whose database is already at head never needs it
# (importing it takes ~0.1-0.3 s of a process start).

__all__ = [
    "at_head",
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
    from alembic.config import Config

    config = Config()
    # ConfigParser interpolation would read a '%' in the path as a placeholder.
    config.set_main_option("script_location", str(migrations_path()).replace("%", "%%"))
    config.attributes["connection"] = connection
    return config


def head() -> str:
    """The newest revision the migration scripts define."""
    from alembic.script import ScriptDirectory

    revision = ScriptDirectory.from_config(_config()).get_current_head()
    assert revision is not None, "the migration scripts define no revision"
    return revision


def _engine_for(url: str | URL | Engine | None) -> tuple[Engine, bool]:
    if isinstance(url, Engine):
        return url, False
    return create_store_engine(url), True


def _current_on(connection: sa.Connection) -> str | None:
    from alembic.migration import MigrationContext

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


def at_head(url: str | URL | Engine | None = None) -> bool:
    """Whether the database is at the newest revision, decided without Alembic where it plainly is
    (``False`` also when unsure: ask :func:`current` then); raises if the database cannot be reached."""
    engine, owned = _engine_for(url)
    try:
        return _at_scripted_head(engine)
    finally:
        if owned:
            engine.dispose()


def _migrate(url: str | URL | Engine | None, revision: str, *, up: bool) -> None:
    from alembic import command

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
    if _at_scripted_head(engine):
        return
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
    from alembic.script import ScriptDirectory

    return {script.revision for script in ScriptDirectory.from_config(_config()).walk_revisions()}


# The common case, a database already at head, is decided without Alembic: its ScriptDirectory
# imports every migration module (~40 ms at each process start) and its MigrationContext logs a few
# INFO lines. Anything unusual (no version table, several rows, a script this reading cannot parse)
# falls through to Alembic, which stays the authority; a test holds the two heads equal.
_REVISION_LINE = re.compile(
    r"^(down_revision|revision)\b[^=\n]*=\s*(None|[\"']([^\"']+)[\"'])\s*$", re.MULTILINE
)


def _scripted_head() -> str | None:
    """The head revision read from the scripts' ``revision``/``down_revision`` lines; None if unsure."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for script in (migrations_path() / "versions").glob("*.py"):
        found = {name: value for name, _, value in _REVISION_LINE.findall(script.read_text("utf-8"))}
        if "revision" not in found or not found["revision"] or "down_revision" not in found:
            return None
        revisions.add(found["revision"])
        if found["down_revision"]:
            parents.add(found["down_revision"])
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 and parents <= revisions else None


def _at_scripted_head(engine: Engine) -> bool:
    """Whether the version table holds exactly the scripts' head (False when unsure: Alembic decides).

    Raises what connecting raises: Alembic's reading would only connect again, and a server that
    does not answer makes each try wait out the connect timeout.
    """
    head_revision = _scripted_head()
    if head_revision is None:
        return False
    query = sa.select(sa.column("version_num", sa.String)).select_from(sa.table(VERSION_TABLE))
    with engine.connect().execution_options(**{READ_ONLY_OPTION: True}) as connection:
        try:
            rows = connection.execute(query).scalars().all()
        except sa.exc.DBAPIError:  # no version table yet (a fresh database)
            return False
    return rows == [head_revision]
