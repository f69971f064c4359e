"""Writing one batch of attempt records in one transaction: rows, reclassifications and rollups.

The rules, all applied inside the caller's transaction so that rows and rollups never disagree:

* a new attempt is inserted (insert-or-ignore on ``attempt_id``, so redelivery is harmless);
* a higher ``revision`` of a stored attempt replaces the row, and the rollups move by the difference;
* a stored attempt marked ``abandoned`` whose retry has now arrived (same logical request, or same
  fingerprint, started within the retry window after the failed attempt ended) becomes ``retried``,
  whichever process wrote either of them;
* rollup rows are upserted in key order, so concurrent writers lock them in the same order;
* a record that started before the latest prune's cutoff is kept with the refused records, not
  written (``costwatch.store.retention``: a pruned attempt is never counted twice).

A batch is a handful of statements whatever its size, each with the same text every time, so
neither SQLAlchemy nor the driver compiles or parses anything per batch, and no value is formatted
one by one in Python: on PostgreSQL the rows are copied in binary (``COPY ... FROM STDIN``, encoded
by psycopg in C) into a temporary staging table and inserted from there with one ``INSERT ...
SELECT``; on SQLite they go through the driver's ``executemany``. Lists of keys are one JSON array
parameter on both (SQLite's ``json_each`` needs its JSON functions, built in since 3.38 and in
Python's own builds long before).
"""

from __future__ import annotations

import functools
import hashlib
import json
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from types import MappingProxyType
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

from ..records import AttemptRecord, WasteReason
from .all_time import ALL_TIME_COLUMNS, all_time_delta_rows
from .rejected import insert_rejected, rejected_row
from .retention import as_utc, cutoff_for_writing
from .retried import (
    StoredSummary,
    prepare_retried_statements,
    stored_summaries_parameters,
    stored_summaries_query,
    update_retried_requests,
)
from .rows import (
    ATTEMPT_COLUMNS,
    AttemptReader,
    attempt_reader,
    attempt_row,
    hour_of,
    record_from_row,
    rollup_delta_rows,
)
from .schema import (
    ALL_TIME_DIMENSIONS,
    ALL_TIME_ROLLUPS,
    ATTEMPTS,
    CALIBRATION_SAMPLES,
    RETRIED_REQUESTS,
    ROLLUP_DIMENSIONS,
    ROLLUP_MEASURES,
    ROLLUPS,
    UtcDateTime,
    insert_of,
    utc_hour,
)

__all__ = [
    "BatchResult",
    "insert_calibration_samples",
    "latest_revisions",
    "prepare_statements",
    "reconcile_calibration_samples",
    "write_batch",
]

_ROLLUP_COLUMNS = (*ROLLUP_DIMENSIONS, *ROLLUP_MEASURES)


@dataclass(frozen=True)
class BatchResult:
    """What one batch changed in the store."""

    inserted: int = 0
    """Attempts that were new to the store."""
    revised: int = 0
    """Stored attempts replaced by a higher revision from the batch."""
    reclassified: int = 0
    """Stored ``abandoned`` attempts turned ``retried`` because their retry arrived."""
    before_cutoff: int = 0
    """Records that started before the latest prune's cutoff, kept with the refused records instead
    (a pruned attempt stored again would be counted twice)."""


def latest_revisions(records: Iterable[AttemptRecord]) -> list[AttemptRecord]:
    """One record per attempt, the highest revision, ordered by ``attempt_id`` (the lock order)."""
    latest: dict[str, AttemptRecord] = {}
    for record in records:
        seen = latest.get(record.attempt_id)
        if seen is None or record.revision > seen.revision:
            latest[record.attempt_id] = record
    return [latest[key] for key in sorted(latest)]


# -- statements, built once per table and backend -------------------------------------------------
@dataclass(frozen=True)
class _BulkStatement:
    """An insert of many rows, and how the rows get to it.

    SQLite: one ``INSERT ... VALUES (?, ...)`` through the driver's ``executemany``. PostgreSQL: the
    rows are copied (``COPY ... FROM STDIN`` in binary, which psycopg encodes in C) into a temporary
    staging table, then one ``INSERT ... SELECT`` from it does what the statement does (insert or
    ignore, add to rollups): the staging table is emptied at commit.
    """

    sql: str
    convert: tuple[Callable[[Any], Any] | None, ...]
    """Per column, what SQLAlchemy's bind processing would do to a value (``None``: nothing)."""
    stage: _Stage | None = None
    """PostgreSQL: where the rows are copied first."""
    nulls: _SqliteNulls | None = None
    """SQLite: how to leave out the columns that are NULL in every row of a batch."""

    def run(
        self,
        connection: sa.Connection,
        rows: Sequence[tuple[Any, ...]],
        meanwhile: Callable[[], None] | None = None,
        *,
        bound: bool = False,
    ) -> list[Any]:
        """Insert ``rows`` (tuples in the order of the statement's columns; ``bound``: each value
        already converted as :attr:`convert` says);
        returns the first value of each row the statement returns (``RETURNING``), else nothing.
        On PostgreSQL, ``meanwhile`` is called while the server runs the insert; elsewhere, after
        it."""
        sql = self.sql
        if self.nulls is not None or (not bound and any(self.convert)):
            columns = [
                values if convert is None or bound else tuple(map(convert, values))
                for values, convert in zip(zip(*rows, strict=True), self.convert, strict=True)
            ]
            if self.nulls is not None:
                sql, columns = self.nulls.leave_out(columns)
            rows = list(zip(*columns, strict=True))
        if self.stage is None:
            result = connection.exec_driver_sql(sql, rows)
            if meanwhile is not None:
                meanwhile()
            return list(result.scalars()) if result.returns_rows else []
        return self.stage.insert(connection, self.sql, rows, meanwhile)


class _SqliteNulls:
    """A SQLite insert without the columns that are NULL in every row of a batch, whose default is NULL.

    Python's ``sqlite3`` looks for an adapter for every ``None`` it binds (two failed attribute
    lookups, each formatting an error message): a non-streaming call's attempt row has eight, a
    tenth of what its insert costs. Left out, the column takes its default, the same NULL. The
    statement of each set of columns is made once.
    """

    def __init__(
        self, table: sa.Table, names: Sequence[str], template: Callable[[Sequence[str]], str]
    ) -> None:
        self.names = tuple(names)
        self.omissible = tuple(
            table.c[name].nullable and table.c[name].server_default is None for name in names
        )
        self._template = template
        self._texts: dict[tuple[bool, ...], str] = {}

    def leave_out(self, columns: list[tuple[Any, ...]]) -> tuple[str, list[tuple[Any, ...]]]:
        """The statement and the columns of a batch (``columns``: one sequence of values per name)."""
        kept = tuple(
            not omissible or values.count(None) < len(values)
            for omissible, values in zip(self.omissible, columns, strict=True)
        )
        text = self._texts.get(kept)
        if text is None:
            text = self._texts[kept] = self._template([n for n, k in zip(self.names, kept, strict=True) if k])
        return text, [values for values, keep in zip(columns, kept, strict=True) if keep]


@dataclass(frozen=True)
class _Stage:
    """A temporary table (one per session, emptied at commit) that a batch's rows are copied into."""

    create_sql: str
    copy_sql: str
    types: tuple[str, ...]
    """The PostgreSQL type of each copied column, for the binary format."""

    def insert(
        self,
        connection: sa.Connection,
        sql: str,
        rows: Sequence[tuple[Any, ...]],
        meanwhile: Callable[[], None] | None = None,
    ) -> list[Any]:
        driver: Any = connection.connection.driver_connection
        dbapi_error = connection.dialect.loaded_dbapi.Error
        try:
            with driver.cursor() as cursor:
                # Every time: a pooler may hand the next transaction another session, and a
                # rolled-back transaction takes a table it created with it.
                cursor.execute(self.create_sql)
                with cursor.copy(self.copy_sql) as copy:
                    copy.set_types(self.types)
                    for position, row in enumerate(rows):
                        copy.write_row((*row, position))
                if meanwhile is not None and _pipelines_work():
                    # Sent without waiting for it (pipeline mode): the writer's Python and the
                    # server's insert run at once. Leaving the block waits for the results.
                    with driver.pipeline():
                        cursor.execute(sql)
                        meanwhile()
                else:
                    cursor.execute(sql)
                    if meanwhile is not None:
                        meanwhile()
                return [row[0] for row in cursor.fetchall()] if cursor.description else []
        except dbapi_error as exc:
            # As SQLAlchemy wraps what the driver raises, so a refused value is told from an outage.
            raise sa.exc.DBAPIError.instance(sql, None, exc, dbapi_error, dialect=connection.dialect) from exc


@functools.cache
def _pipelines_work() -> bool:
    """Whether psycopg's pipeline mode is there (it needs libpq 14 or later)."""
    import psycopg

    return bool(psycopg.Pipeline.is_supported())


_STAGE_POSITION = "costwatch_position"
"""The staging tables' extra column: each row's place in the batch, the order rows are inserted
(and so locked) in."""


def _stage_type(column_type: sa.types.TypeEngine[Any]) -> str:
    """The staging column's type for a column of ``column_type``.

    Integers are staged as ``bigint`` whatever the column: the server then refuses one beyond the
    column's range on insert, where the binary format of a narrower type would wrap it silently.
    JSON goes as its text (cast in the ``SELECT``): it was made once per distinct value.
    """
    if isinstance(column_type, UtcDateTime):
        return "timestamptz"
    if isinstance(column_type, sa.JSON):
        return "text"
    if isinstance(column_type, sa.Boolean):
        return "bool"
    if isinstance(column_type, sa.Integer):
        return "int8"
    if isinstance(column_type, sa.Float):
        return "float8"
    if isinstance(column_type, sa.String):
        return "text"
    raise NotImplementedError(f"no staging type for {column_type!r}")


def _json_text(value: Any) -> str | None:
    """JSON as SQLAlchemy would bind it, remembered: most attempts carry the same few tags.

    A record's mappings and tuples are taken as they are, as the plain dicts and lists a row stores
    them as (``rows.attempt_reader``): a copy of each made first cost the writer more than its text.
    """
    # The usual types by lookup: an isinstance() that fails costs several times more.
    shape = _JSON_SHAPES.get(type(value))
    if shape is None:
        if isinstance(value, Mapping):
            shape = dict
        elif isinstance(value, (list, tuple)):
            shape = list
        else:
            return None if value is None else json.dumps(value)
    if not value:
        return "{}" if shape is dict else "[]"
    key = (shape, tuple(value.items()) if shape is dict else tuple(value))
    try:
        text = _json_texts.get(key)
    except TypeError:  # an unhashable value inside
        return json.dumps(dict(key[1]) if shape is dict else value)
    if text is None:
        if len(_json_texts) >= _JSON_TEXTS_KEPT:
            _json_texts.clear()
        text = _json_texts[key] = json.dumps(dict(key[1]) if shape is dict else value)
    return text


_JSON_SHAPES: dict[type, type] = {dict: dict, MappingProxyType: dict, list: list, tuple: list}
"""The JSON container each usual Python type is written as."""
_json_texts: dict[Any, str] = {}
_JSON_TEXTS_KEPT = 4096


def _utc(value: datetime | None) -> datetime | None:
    """As :class:`UtcDateTime` binds for PostgreSQL: naive is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)


def _sqlite_utc_text(value: datetime | None) -> str | None:
    """As :class:`UtcDateTime` and SQLAlchemy bind for SQLite: naive UTC, always with microseconds
    (``YYYY-MM-DD HH:MM:SS.ffffff``, what ``isoformat(" ", "microseconds")`` gives without an offset)."""
    if value is None:
        return None
    zone = value.tzinfo
    if zone is not None and zone is not timezone.utc:
        value = value.astimezone(timezone.utc)
    # The text up to the second is made once a second: a batch's start times share a few seconds,
    # and isoformat() costs the writer more than anything else in an attempt's row.
    second = _second_text(value.year, value.month, value.day, value.hour, value.minute, value.second)
    return "%s.%06d" % (second, value.microsecond)  # noqa: UP031 (an f-string's format spec costs more)


@functools.lru_cache(maxsize=256)
def _second_text(year: int, month: int, day: int, hour: int, minute: int, second: int) -> str:
    return f"{year:04d}-{month:02d}-{day:02d} {hour:02d}:{minute:02d}:{second:02d}"


class _SqliteBooleans(dict[Any, Any]):
    """As SQLAlchemy binds a boolean for SQLite, by lookup: ``True`` and ``False`` are found (four in
    a row; a call of a Python function each cost the writer 4k instructions a row), anything else is
    made by ``__missing__``."""

    def __missing__(self, value: Any) -> int | None:
        return None if value is None else int(value)


_sqlite_boolean: Callable[[bool | None], int | None] = _SqliteBooleans({True: 1, False: 0}).__getitem__


def _bind_conversions(
    table: sa.Table, names: Sequence[str], dialect: Dialect
) -> tuple[Callable[[Any], Any] | None, ...]:
    """Per column, what SQLAlchemy's bind processing would do to a value, done in one call.

    Floats need nothing, nor do booleans for psycopg, which copies them as they are. Booleans go to
    SQLite as the integers SQLAlchemy stores: Python's driver passes an exact ``int`` straight
    through, but looks for an adapter for a ``bool`` first (two failed attribute lookups, each
    formatting an error message). JSON columns go as their text on both.
    """
    conversions: list[Callable[[Any], Any] | None] = []
    for name in names:
        column_type = table.c[name].type
        if isinstance(column_type, sa.Boolean) and dialect.name == "sqlite":
            conversions.append(_sqlite_boolean)
        elif isinstance(column_type, UtcDateTime):
            convert = _sqlite_utc_text if dialect.name == "sqlite" else _utc
            # A rollup's timestamps are whole hours, a few distinct ones per batch: remembered.
            conversions.append(convert if table is ATTEMPTS else functools.lru_cache(maxsize=1024)(convert))
        elif isinstance(column_type, sa.JSON):
            conversions.append(_json_text)
        else:
            conversions.append(None)
    return tuple(conversions)


def _bulk_insert(
    table: sa.Table, names: Sequence[str], dialect: Dialect, tail: str, *, leave_out_nulls: bool = False
) -> _BulkStatement:
    """An insert of ``names`` into ``table``, then ``tail``; with ``leave_out_nulls`` (SQLite, a
    ``tail`` that names no column), without the columns a batch leaves NULL in every row."""
    quote = dialect.identifier_preparer.quote
    columns = ", ".join(quote(name) for name in names)
    convert = _bind_conversions(table, names, dialect)
    if dialect.name == "sqlite":

        def sql_of(names: Sequence[str]) -> str:
            listed, marks = ", ".join(quote(name) for name in names), ", ".join("?" for _ in names)
            return f"INSERT INTO {quote(table.name)} ({listed}) VALUES ({marks}) {tail}"

        nulls = _SqliteNulls(table, names, sql_of) if leave_out_nulls else None
        return _BulkStatement(sql_of(names), convert, nulls=nulls)
    # PostgreSQL: a JSON parameter of every row (parsed and cast value by value by the server) or a
    # multi-row VALUES (formatted value by value by the driver in Python) cost more, on both sides,
    # than copying the rows in binary into a staging table and inserting from there.
    stage_name = quote(f"costwatch_stage_{table.name.removeprefix('costwatch_')}")
    types = tuple(_stage_type(table.c[name].type) for name in names)
    definitions = ", ".join(f"{quote(name)} {kind}" for name, kind in zip(names, types, strict=True))
    selected = ", ".join(
        f"CAST({quote(name)} AS JSON)" if isinstance(table.c[name].type, sa.JSON) else quote(name)
        for name in names
    )
    stage = _Stage(
        create_sql=f"CREATE TEMPORARY TABLE IF NOT EXISTS {stage_name} ({definitions}, "
        f"{_STAGE_POSITION} int8) ON COMMIT DELETE ROWS",
        copy_sql=f"COPY {stage_name} ({columns}, {_STAGE_POSITION}) FROM STDIN (FORMAT BINARY)",
        types=(*types, "int8"),
    )
    sql = (
        f"INSERT INTO {quote(table.name)} ({columns}) SELECT {selected} FROM {stage_name} "
        f"ORDER BY {_STAGE_POSITION} {tail}"
    )
    return _BulkStatement(sql, convert, stage)


@dataclass(frozen=True)
class _Statements:
    insert_attempts: _BulkStatement
    upsert_rollups: _BulkStatement
    upsert_all_time: _BulkStatement


_statements: dict[str, _Statements] = {}


def _driver_key(dialect: Dialect) -> str:
    """What the statements compiled for ``dialect`` are kept under: the database and its driver."""
    return f"{dialect.name}+{dialect.driver}"


def _statements_for(dialect: Dialect) -> _Statements:
    key = _driver_key(dialect)
    found = _statements.get(key)
    if found is not None:
        return found
    if dialect.name not in ("postgresql", "sqlite"):
        raise NotImplementedError(f"costwatch's store supports SQLite and PostgreSQL, not {dialect.name}")
    quote = dialect.identifier_preparer.quote
    # On PostgreSQL the insert says which rows were new; on SQLite the writer has read that first.
    # PostgreSQL's key holds the partition key too (migration 0013): every revision of an attempt
    # carries its first's start time, so (attempt_id, started_at) still names one attempt.
    attempts_tail = (
        f"ON CONFLICT ({quote('attempt_id')}, {quote('started_at')}) DO NOTHING "
        f"RETURNING {quote('attempt_id')}"
        if dialect.name == "postgresql"
        else ""
    )

    def add_measures(table: sa.Table, keys: Sequence[str], *also: str) -> str:
        name = quote(table.name)
        sets = [*also, *(f"{quote(m)} = {name}.{quote(m)} + excluded.{quote(m)}" for m in ROLLUP_MEASURES)]
        return f"ON CONFLICT ({', '.join(quote(key) for key in keys)}) DO UPDATE SET {', '.join(sets)}"

    first_hour, all_time = quote("first_hour"), quote(ALL_TIME_ROLLUPS.name)
    earliest = "min" if dialect.name == "sqlite" else "least"  # SQLite's two-argument min() is scalar
    found = _Statements(
        insert_attempts=_bulk_insert(ATTEMPTS, ATTEMPT_COLUMNS, dialect, attempts_tail, leave_out_nulls=True),
        upsert_rollups=_bulk_insert(
            ROLLUPS, _ROLLUP_COLUMNS, dialect, add_measures(ROLLUPS, ROLLUP_DIMENSIONS)
        ),
        upsert_all_time=_bulk_insert(
            ALL_TIME_ROLLUPS,
            ALL_TIME_COLUMNS,
            dialect,
            add_measures(
                ALL_TIME_ROLLUPS,
                ALL_TIME_DIMENSIONS,
                f"{first_hour} = {earliest}({all_time}.{first_hour}, excluded.{first_hour})",
            ),
        ),
    )
    _statements[key] = found
    return found


# -- reading what is stored ------------------------------------------------------------------------
def _among(
    connection: sa.Connection, column: sa.ColumnElement[Any], values: Sequence[str] | sa.BindParameter[str]
) -> sa.ColumnElement[bool]:
    """``column`` is one of ``values``, given as one JSON array parameter (so one statement text), or
    one of the values of a named parameter that each execution binds to such an array (:func:`_listed`).

    SQLAlchemy would otherwise expand an ``IN`` list into hundreds of parameters, and psycopg format
    an array parameter element by element, both in Python, for every batch.
    """
    if isinstance(values, sa.BindParameter):
        listed = values
    elif not values:
        return sa.false()
    else:
        listed = sa.bindparam(None, _listed(values), type_=sa.String())
    if connection.dialect.name == "postgresql":
        # = ANY(ARRAY(...)), not IN (SELECT ...): inside an OR, only the array form is an index scan.
        elements = sa.select(sa.func.json_array_elements_text(sa.cast(listed, sa.JSON)))
        return column == sa.any_(sa.func.array(elements.scalar_subquery()))
    return column.in_(sa.select(sa.func.json_each(listed).table_valued("value").c.value))


def _started_within(
    connection: sa.Connection, first: datetime | None, last: datetime | None
) -> sa.ColumnElement[bool]:
    """Attempts that started in ``[first, last]`` (``None``: unbounded), stated on PostgreSQL only.

    There it lets the planner skip the partitions of other days (a lookup by key alone would probe
    every day's index); on SQLite, where nothing is partitioned, the lookups stay as they were.
    """
    if connection.dialect.name != "postgresql":
        return sa.true()
    conditions = []
    if first is not None:
        conditions.append(ATTEMPTS.c.started_at >= first)
    if last is not None:
        conditions.append(ATTEMPTS.c.started_at <= last)
    return sa.and_(sa.true(), *conditions)


def _select_rows(
    connection: sa.Connection, *matching: sa.ColumnElement[bool], lock: bool = True
) -> list[AttemptRecord]:
    """The stored rows matching any of ``matching``, locked on PostgreSQL (unless ``lock`` is false)
    in ``attempt_id`` order (the lock order).

    On PostgreSQL each condition is a statement of its own: asked for an ``OR`` of lookups by
    different indexes (logical request, fingerprint), the planner would rather read the whole partial
    index of abandoned attempts of every recent day and test each row against every key, which at
    ten million attempts took 0.4 s a batch; one condition each is one index probed per key (the
    rows they lock were already serialised by the batch's advisory locks, so locking them in two
    statements' orders cannot deadlock). SQLite has no row locks (the writer holds the database's)
    and no order is asked of it: with statistics, its planner would rather walk the whole primary key
    in order than probe the key indexes and sort.
    """
    if connection.dialect.name != "postgresql":
        return _records(connection.execute(sa.select(ATTEMPTS).where(sa.or_(*matching))))
    found: dict[tuple[str, datetime], AttemptRecord] = {}
    for condition in matching:
        query = sa.select(ATTEMPTS).where(condition).order_by(ATTEMPTS.c.attempt_id)
        if lock:
            query = query.with_for_update()
        for row in connection.execute(query).mappings():
            record = record_from_row(row)
            found.setdefault((record.attempt_id, record.started_at), record)
    return [found[key] for key in sorted(found)]


def _records(result: sa.CursorResult[Any]) -> list[AttemptRecord]:
    return [record_from_row(row) for row in result.mappings()]


def _listed(values: Sequence[str]) -> str:
    """``values`` as the JSON array that :func:`_among` reads them from (the text ``json.dumps`` writes)."""
    # Ids and fingerprints are hex digits, which JSON holds as they are: joined, unless a value has a
    # character JSON escapes (json.dumps escapes character by character, ~45 instructions each).
    plain = "".join(values)
    if not plain.isascii() or plain.encode().translate(None, _AS_THEY_ARE):
        return json.dumps(list(values))
    return '["' + '", "'.join(values) + '"]' if values else "[]"


_AS_THEY_ARE = bytes(range(0x20, 0x7F)).replace(b'"', b"").replace(b"\\", b"")
"""The characters a JSON string holds unescaped that :func:`_listed` joins as they are: printable
ASCII but the quote and the backslash."""


@dataclass(frozen=True)
class _SqliteLookups:
    """The lookups of a batch on SQLite, built once with named parameters.

    A batch then only binds its values: SQLAlchemy neither builds nor keys a statement per batch, which
    cost more than running both (a non-streaming call's batch is a few records).
    """

    stored: sa.Select[Any]
    """The stored attempts among ``ids`` (a JSON array)."""
    landed: _DriverQuery
    """What a batch's landed attempts look up once stored, in one statement
    (:func:`_sqlite_landed_query`)."""


_SUMMARY = "summary_"
"""The prefix of the summaries' columns in :attr:`_SqliteLookups.landed`."""
_SUMMARY_COLUMNS = tuple(_SUMMARY + name for name in StoredSummary._fields)

_lookups: dict[str, _SqliteLookups] = {}
"""By :func:`_driver_key`: :attr:`_SqliteLookups.landed` is compiled for its driver."""


def _sqlite_lookups(connection: sa.Connection) -> _SqliteLookups:
    key = _driver_key(connection.dialect)
    found = _lookups.get(key)
    if found is None:
        ids = sa.bindparam("ids", type_=sa.String())
        found = _lookups[key] = _SqliteLookups(
            stored=sa.select(ATTEMPTS).where(_among(connection, ATTEMPTS.c.attempt_id, ids)),
            landed=_DriverQuery.of(_sqlite_landed_query(connection), connection.dialect),
        )
    return found


def _sqlite_landed_query(connection: sa.Connection) -> sa.CompoundSelect:
    """The stored abandoned attempts of the logical requests ``request_ids``, then those of the
    ``fingerprints`` that ended at or after ``since``, then the stored summaries of ``request_ids``
    (their columns named ``summary_*``, NULL in the attempts' rows, whose columns are NULL in theirs).

    Each part walks its JSON array of keys and probes one index by each (the logical requests',
    ``ix_costwatch_attempts_abandoned_fingerprint``: a partial index on abandoned rows, so the
    query states its condition as a literal; the summaries' key): a key in a list of several is
    an ``IN`` that SQLite first copies into an index of its own, which cost as much again.
    ``tests/test_store_writes.py`` checks that each part probes its index. An attempt found by
    both its request and its fingerprint comes twice. PostgreSQL reads them otherwise:
    :func:`_postgres_abandoned`, :func:`~costwatch.store.retried.stored_summaries_query`.
    """
    listed = functools.partial(sa.bindparam, type_=sa.String())
    request_ids = listed("request_ids")

    def keyed(keys: sa.BindParameter[str], column: sa.Column[Any]) -> sa.Join:
        each = sa.func.json_each(keys).table_valued("value")
        return each.join(column.table, column == each.c.value)

    abandoned = (ATTEMPTS.c.waste_reason == _ABANDONED, ATTEMPTS.c.wasted.is_(True))
    summary = [RETRIED_REQUESTS.c[name] for name in StoredSummary._fields]
    no_summary = [sa.type_coerce(sa.null(), c.type).label(_SUMMARY + c.name) for c in summary]
    since = sa.bindparam("since", type_=ATTEMPTS.c.started_at.type)
    return sa.union_all(
        sa.select(ATTEMPTS, *no_summary)
        .select_from(keyed(request_ids, ATTEMPTS.c.logical_request_id))
        .where(*abandoned),
        sa.select(ATTEMPTS, *no_summary)
        .select_from(keyed(listed("fingerprints"), ATTEMPTS.c.fingerprint))
        .where(*abandoned, _ended_since(connection, since)),
        sa.select(*(sa.null() for _ in ATTEMPTS.c), *summary).select_from(
            keyed(request_ids, RETRIED_REQUESTS.c.logical_request_id)
        ),
    )


def _sqlite_landed_lookup(
    connection: sa.Connection, landed: Sequence[AttemptRecord], window: timedelta
) -> tuple[list[AttemptRecord], dict[str, StoredSummary]]:
    """On SQLite, once the batch's ``landed`` attempts are stored: the stored abandoned attempts their
    keys match (these among them), and the stored summaries of their logical requests, read in one
    statement (:attr:`_SqliteLookups.landed`)."""
    if not landed:
        return [], {}
    since = min(record.started_at for record in landed) - window
    request_ids = sorted({record.logical_request_id for record in landed})
    fingerprints = sorted({record.fingerprint for record in landed if record.fingerprint is not None})
    rows = _sqlite_lookups(connection).landed.run(
        connection,
        {"request_ids": _listed(request_ids), "fingerprints": _listed(fingerprints), "since": since},
    )
    abandoned: dict[str, AttemptRecord] = {}
    summaries: dict[str, StoredSummary] = {}
    for row in rows:
        if row[_SUMMARY + "logical_request_id"] is None:
            if row["attempt_id"] not in abandoned:  # found by its request and by its fingerprint
                abandoned[row["attempt_id"]] = record_from_row(row)
        else:
            summary = StoredSummary._make(row[name] for name in _SUMMARY_COLUMNS)
            summaries[summary.logical_request_id] = summary
    return list(abandoned.values()), summaries


def prepare_statements(connection: sa.Connection) -> None:
    """Build the statements a batch runs and have SQLAlchemy compile its lookups, looking up nothing.

    Both are once per process: :meth:`costwatch.store.SqlStore.prepare` does them where
    ``instrument()`` pays for them, not the writer's first batch, beside the application.
    """
    _statements_for(connection.dialect)
    prepare_retried_statements(connection)
    if connection.dialect.name == "postgresql":
        _read_ahead_queries(connection.dialect)
    if connection.dialect.name == "sqlite":  # (on PostgreSQL the cutoff's read would wait for a prune)
        cutoff_for_writing(connection)
        lookups, nothing = _sqlite_lookups(connection), _listed([])
        connection.execute(lookups.stored, {"ids": nothing})
        landed = {"request_ids": nothing, "fingerprints": nothing, "since": datetime.now(timezone.utc)}
        lookups.landed.run(connection, landed)


# -- the steps of a batch --------------------------------------------------------------------------
def _insert_new(
    connection: sa.Connection,
    records: Sequence[AttemptRecord],
    meanwhile: Callable[[], None] | None = None,
    *,
    rows: Sequence[tuple[Any, ...]] | None = None,
) -> tuple[list[AttemptRecord], list[AttemptRecord]]:
    """Insert the attempts not stored yet; returns (those inserted, stored revisions of the others).

    ``meanwhile`` is called once the rows are sent (on PostgreSQL, while the server inserts them).
    ``rows`` (PostgreSQL): the records' rows already made, by :func:`_attempt_rows`.
    """
    statement = _statements_for(connection.dialect).insert_attempts
    if connection.dialect.name == "postgresql":
        # Insert-or-ignore says which rows were new (RETURNING); then lock and read the others.
        if rows is None:
            rows = _attempt_rows(connection.dialect, records)
        new_ids = set(statement.run(connection, rows, meanwhile, bound=True))
        others = [record for record in records if record.attempt_id not in new_ids]
        stored: list[AttemptRecord] = []
        if others:
            # A stored revision started when its attempt did: only those days' partitions are read.
            among = _among(connection, ATTEMPTS.c.attempt_id, [record.attempt_id for record in others])
            starts = [record.started_at for record in others]
            stored = _select_rows(
                connection, sa.and_(among, _started_within(connection, min(starts), max(starts)))
            )
        return [record for record in records if record.attempt_id in new_ids], stored
    # SQLite: this transaction holds the database's write lock, so what is stored now stays so until
    # commit. The usual batch is all new: it is inserted as it is, under a savepoint, and nothing is
    # read first (that lookup cost ~5k instructions a record). If an attempt was stored already (a
    # redelivery, a revision), the insert is undone, the stored ones read and the rest inserted.
    rows = _attempt_rows(connection.dialect, records)
    new = list(records)
    stored = []
    driver: Any = connection.connection.driver_connection
    driver.execute("SAVEPOINT costwatch_insert")
    try:
        statement.run(connection, rows, bound=True)
    except sa.exc.IntegrityError:  # a stored attempt_id (or a refusal, which the next insert repeats)
        driver.execute("ROLLBACK TO costwatch_insert")
        ids = [record.attempt_id for record in records]
        stored = _records(connection.execute(_sqlite_lookups(connection).stored, {"ids": _listed(ids)}))
        stored_ids = {record.attempt_id for record in stored}
        kept = [record.attempt_id not in stored_ids for record in records]
        new = [record for record, keep in zip(records, kept, strict=True) if keep]
        rows = [row for row, keep in zip(rows, kept, strict=True) if keep]
        if rows:
            statement.run(connection, rows, bound=True)  # a plain insert: a conflict now would be a bug
    driver.execute("RELEASE costwatch_insert")
    if meanwhile is not None:
        meanwhile()
    return new, stored


def _attempt_rows(dialect: Dialect, records: Sequence[AttemptRecord]) -> list[tuple[Any, ...]]:
    """The records' attempt rows as the insert binds them (each value through
    :attr:`_BulkStatement.convert` too).

    Made row by row in one step, so that no batch-long list holds rows with the tags' dicts (tracked
    by the garbage collector): those reached its oldest generation by the thousand each batch, and
    full collections of the process's heap came that much sooner (benchmarks/README.md, row 9). The
    rows kept are tuples of plain values (JSON as its text), which the collector untracks.
    """
    key = _driver_key(dialect)
    read = _attempt_readers.get(key)
    if read is None:
        read = _attempt_readers[key] = attempt_reader(_statements_for(dialect).insert_attempts.convert)
    return [read(record) for record in records]


_attempt_readers: dict[str, AttemptReader] = {}
"""Per driver, as the statements whose conversions they follow (:func:`_statements_for`)."""


@functools.cache
def _stored_update(postgresql: bool) -> sa.Update:
    """An update of stored attempts' rows, executed over parameter rows made by :func:`_row_of`:
    each names its row by the stored attempt's key (on PostgreSQL the whole key: one partition is
    probed), and its other parameters are the columns it sets. Built once: a statement built per
    row cost SQLAlchemy its construction, cache key and compilation each time, many times what the
    update itself costs (benchmarks/README.md, "revision-cost (tenth session)")."""
    c = ATTEMPTS.c
    where = c.attempt_id == sa.bindparam("stored_attempt_id", type_=c.attempt_id.type)
    if postgresql:
        where = sa.and_(where, c.started_at == sa.bindparam("stored_started_at", type_=c.started_at.type))
    return sa.update(ATTEMPTS).where(where)


def _row_of(stored: AttemptRecord, postgresql: bool, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (the columns to set) as a parameter row of :func:`_stored_update` for ``stored``'s row."""
    values["stored_attempt_id"] = stored.attempt_id
    if postgresql:
        values["stored_started_at"] = stored.started_at
    return values


def _apply_revisions(
    connection: sa.Connection, records: Sequence[AttemptRecord], stored: Sequence[AttemptRecord]
) -> tuple[list[AttemptRecord], list[AttemptRecord]]:
    """Replace stored attempts with higher revisions; returns (new revisions, replaced revisions)."""
    incoming = {record.attempt_id: record for record in records}
    added: list[AttemptRecord] = []
    removed: list[AttemptRecord] = []
    postgresql = connection.dialect.name == "postgresql"
    rows: list[dict[str, Any]] = []
    for old in stored:
        record = incoming[old.attempt_id]
        if record.revision <= old.revision:
            continue
        row = attempt_row(record)
        del row["attempt_id"]
        rows.append(_row_of(old, postgresql, row))
        added.append(record)
        removed.append(old)
    if rows:
        connection.execute(_stored_update(postgresql), rows)
    return added, removed


_LONGEST_DURATION_S = 7 * 24 * 3600.0
"""The longest duration of an attempt that retry matching believes; longer ones count as this long."""


def _retry_wait(abandoned: AttemptRecord, window: timedelta) -> timedelta:
    """From an abandoned attempt's start to the last moment its retry may start: its duration plus
    ``window``. A duration that is not a number or negative counts as zero, one over
    :data:`_LONGEST_DURATION_S` as that (as :func:`_ended_since` counts it in SQL)."""
    duration = abandoned.duration_s
    if not 0 <= duration <= _LONGEST_DURATION_S:  # also true for NaN
        duration = _LONGEST_DURATION_S if duration > 0 else 0.0
    return timedelta(seconds=duration) + window


def _is_retry_of(later: AttemptRecord, abandoned: AttemptRecord, window: timedelta) -> bool:
    if later.attempt_id == abandoned.attempt_id:
        return False
    # The window runs from the end of the failed attempt: a stream may run for many minutes
    # before it drops, and its retry can only start after that.
    if later.started_at > abandoned.started_at + _retry_wait(abandoned, window):
        return False
    if later.logical_request_id == abandoned.logical_request_id:
        return (later.started_at, later.attempt_number) > (abandoned.started_at, abandoned.attempt_number)
    # The same request sent again by a process that lost track of the first one (a restart, a
    # different worker); the window above keeps every later repeat from counting as its retry.
    return (
        abandoned.fingerprint is not None
        and later.fingerprint == abandoned.fingerprint
        and abandoned.started_at < later.started_at
    )


def _ended_since(
    connection: sa.Connection, since: datetime | sa.BindParameter[datetime]
) -> sa.ColumnElement[bool]:
    """Rows of attempts that ended (``started_at + duration_s``) at or after ``since`` (a moment, or on
    SQLite a named parameter of the start time's type that each execution binds).

    The duration is clamped to ``[0, _LONGEST_DURATION_S]`` first: PostgreSQL refuses to make an
    interval of a NaN or huge number of seconds (and orders NaN above every number, so a stored NaN
    counts as the longest here: a superset of what :func:`_retry_wait` accepts, which decides).
    """
    if connection.dialect.name == "postgresql":
        duration = sa.func.least(sa.func.greatest(ATTEMPTS.c.duration_s, 0.0), _LONGEST_DURATION_S)
        ended = ATTEMPTS.c.started_at + duration * sa.literal_column("interval '1 second'")
        return ended >= since
    # SQLite keeps timestamps as text; julianday() reads them as (fractional) days. A second of
    # slack absorbs its rounding; _is_retry_of decides exactly. (A filter on the rows the key
    # indexes found, so it costs no index.)
    if not isinstance(since, sa.BindParameter):
        since = sa.literal(since, ATTEMPTS.c.started_at.type)
    duration = sa.func.min(sa.func.max(ATTEMPTS.c.duration_s, 0.0), _LONGEST_DURATION_S)
    return sa.func.julianday(ATTEMPTS.c.started_at) + (duration + 1.0) / 86400.0 >= sa.func.julianday(since)


_ABANDONED: sa.ColumnElement[str] = sa.literal_column(f"'{WasteReason.ABANDONED.value}'")
"""``'abandoned'`` as a literal: a partial index is used only when the query states its condition."""


def _postgres_text_array(values: Sequence[str]) -> str:
    """``values`` as a PostgreSQL array literal (``{"a","b"}``), for a ``text[]`` parameter: psycopg
    would dump a list element by element in Python (~3 us an element)."""
    joined = '","'.join(values)
    if "\\" in joined or '"' in joined:
        joined = '","'.join(value.replace("\\", "\\\\").replace('"', '\\"') for value in values)
    return '{"' + joined + '"}' if values else "{}"


@functools.cache
def _postgres_abandoned() -> sa.Select[Any]:
    """On PostgreSQL, the stored abandoned attempts of the logical requests ``request_ids``, or of the
    ``fingerprints`` that ended at or after ``since``, started in ``[first, last]``: one statement,
    built once, locking them in ``attempt_id`` order.

    It reads every abandoned attempt of those days (the partial index on abandoned attempts: a few
    percent of the rows) and tests each against the batch's keys, hashed once (the keys are an array
    parameter). Probing the indexes by key instead, as SQLite does, costs a descent per key and per
    day partition the 7-day bound spans: ~16,000 a batch of 2,000, and at ten million attempts 61 ms
    a batch for the two lookups against 18-41 ms for this one (benchmarks/README.md, row 9).
    """
    c = ATTEMPTS.c
    keys = sa.cast(sa.bindparam("request_ids"), sa.ARRAY(sa.Text()))
    fingerprints = sa.cast(sa.bindparam("fingerprints"), sa.ARRAY(sa.Text()))
    started = functools.partial(sa.bindparam, type_=c.started_at.type)
    duration = sa.func.least(sa.func.greatest(c.duration_s, 0.0), _LONGEST_DURATION_S)
    ended = c.started_at + duration * sa.literal_column("interval '1 second'")
    return (
        sa.select(ATTEMPTS)
        .where(
            c.waste_reason == _ABANDONED,
            c.wasted.is_(True),
            c.started_at >= started("first"),
            c.started_at <= started("last"),
            sa.or_(
                c.logical_request_id == sa.any_(keys),
                sa.and_(c.fingerprint == sa.any_(fingerprints), ended >= started("since")),
            ),
        )
        .order_by(c.attempt_id)
        .with_for_update()
    )


def _abandoned_parameters(records: Sequence[AttemptRecord], window: timedelta) -> dict[str, Any]:
    """The parameters of :func:`_postgres_abandoned` for a batch of ``records``.

    An abandoned attempt's retry starts at most _retry_wait after it, and after it: none started
    earlier than ``first`` or later than the batch's last can have one among the batch (and only
    the partitions of those days are planned and read).
    """
    since = min(record.started_at for record in records) - window
    return {
        "request_ids": _postgres_text_array(sorted({record.logical_request_id for record in records})),
        "fingerprints": _postgres_text_array(
            sorted({record.fingerprint for record in records if record.fingerprint is not None})
        ),
        "since": since,
        "first": since - timedelta(seconds=_LONGEST_DURATION_S),
        "last": max(record.started_at for record in records),
    }


@dataclass(frozen=True)
class _DriverQuery:
    """A query compiled once to the driver's SQL, so that it can be sent in a pipeline (SQLAlchemy
    reads a result as soon as it executes), or run without SQLAlchemy keying it in its statement cache
    (:meth:`run`): its parameters and rows processed as SQLAlchemy would, by the dialect's
    implementation of each type (``dialect_impl``), as its own execution does."""

    sql: str
    compiled: sa.engine.Compiled
    binds: Mapping[str, Callable[[Any], Any]]
    types: tuple[sa.types.TypeEngine[Any], ...]
    """The selected columns' types as the dialect implements them."""
    results: dict[tuple[Any, ...], tuple[Callable[[Any], Any] | None, ...]]
    """The columns' result processors, by the type codes the driver reported (some, as PostgreSQL's
    floats, depend on them): made at the first result, as SQLAlchemy makes them at each."""

    @classmethod
    def of(cls, query: sa.Select[Any] | sa.CompoundSelect, dialect: Dialect) -> _DriverQuery:
        compiled = query.compile(dialect=dialect)
        binds = {}
        for bind, name in compiled.bind_names.items():
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if process is not None:
                binds[name] = process
        types = tuple(column.type.dialect_impl(dialect) for column in query.selected_columns)
        return cls(compiled.string, compiled, binds, types, {})

    def parameters(self, values: dict[str, Any]) -> dict[str, Any] | tuple[Any, ...]:
        """Every parameter of the query, ``values`` among them, bound as SQLAlchemy binds them: by name,
        or in their order where the driver takes them by position (SQLite)."""
        parameters = dict(self.compiled.construct_params(values) or {})
        for name, process in self.binds.items():
            parameters[name] = process(parameters[name])
        positions = self.compiled.positiontup  # type: ignore[attr-defined]
        return parameters if positions is None else tuple(parameters[name] for name in positions)

    def send(self, cursor: Any, values: dict[str, Any]) -> None:
        """Execute on a driver ``cursor`` (in a pipeline: send)."""
        cursor.execute(self.sql, self.parameters(values))

    def mappings(self, cursor: Any) -> list[dict[str, Any]]:
        """The rows ``cursor`` holds, keyed by column."""
        description = cursor.description
        names = [column[0] for column in description]
        codes = tuple(column[1] for column in description)
        results = self.results.get(codes)
        if results is None:
            dialect = self.compiled.dialect
            results = self.results[codes] = tuple(
                kind.result_processor(dialect, code) for kind, code in zip(self.types, codes, strict=True)
            )
        return [
            {
                name: value if process is None else process(value)
                for name, value, process in zip(names, row, results, strict=True)
            }
            for row in cursor.fetchall()
        ]

    def run(self, connection: sa.Connection, values: dict[str, Any]) -> list[dict[str, Any]]:
        """Execute on ``connection``'s driver connection, in its transaction; returns the rows keyed by
        column, and raises what the driver raises as SQLAlchemy wraps it. (SQLAlchemy's execution
        keys the statement in its cache, hashing the whole query each time: for a query of many
        columns, more than all the rest of its Python.)"""
        dbapi_error = connection.dialect.loaded_dbapi.Error
        cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            self.send(cursor, values)
            return self.mappings(cursor)
        except dbapi_error as exc:
            raise sa.exc.DBAPIError.instance(
                self.sql, None, exc, dbapi_error, dialect=connection.dialect
            ) from exc
        finally:
            cursor.close()


_read_ahead_compiled: dict[str, tuple[_DriverQuery, _DriverQuery]] = {}


def _read_ahead_queries(dialect: Dialect) -> tuple[_DriverQuery, _DriverQuery]:
    """:func:`_read_ahead`'s two queries, compiled once per driver (as :func:`_statements_for`)."""
    key = _driver_key(dialect)
    found = _read_ahead_compiled.get(key)
    if found is None:
        found = _read_ahead_compiled[key] = (
            _DriverQuery.of(_postgres_abandoned(), dialect),
            _DriverQuery.of(stored_summaries_query(dialect.name), dialect),
        )
    return found


@dataclass(frozen=True)
class _ReadAhead:
    """What a batch's later steps read, read before its insert (PostgreSQL)."""

    abandoned: list[AttemptRecord]
    """The stored abandoned attempts the batch's keys match, locked (:func:`_postgres_abandoned`)."""
    summaries: dict[str, StoredSummary]
    """The stored summaries of the batch's logical requests (``update_retried_requests``'s ``stored``)."""


def _read_ahead(
    connection: sa.Connection,
    batch: Sequence[AttemptRecord],
    window: timedelta,
    work: Callable[[], list[tuple[Any, ...]]],
) -> tuple[_ReadAhead, list[tuple[Any, ...]]]:
    """Read what :func:`write_batch` reads after the insert, before it, while ``work`` runs (its
    result is returned beside): the two lookups go in one pipeline, so the server runs them while
    the writer's Python builds the rows, and they cost one round trip.

    Taken after the batch's advisory locks, what they read cannot change before the batch commits
    but by the batch itself: its insert and revisions (:func:`_abandoned_after_insert`) and its
    summaries' update, which runs last.
    """
    abandoned, summaries = _read_ahead_queries(connection.dialect)
    driver: Any = connection.connection.driver_connection
    dbapi_error = connection.dialect.loaded_dbapi.Error
    requests = stored_summaries_parameters(sorted({record.logical_request_id for record in batch}))
    with driver.cursor() as found, driver.cursor() as stored:
        try:
            if _pipelines_work():
                with driver.pipeline():
                    abandoned.send(found, _abandoned_parameters(batch, window))
                    summaries.send(stored, requests)
                    built = work()
            else:
                abandoned.send(found, _abandoned_parameters(batch, window))
                summaries.send(stored, requests)
                built = work()
            records = [record_from_row(row) for row in abandoned.mappings(found)]
            by_request = {
                row["logical_request_id"]: StoredSummary(**row) for row in summaries.mappings(stored)
            }
        except dbapi_error as exc:
            # As SQLAlchemy wraps what the driver raises, so a refused value is told from an outage,
            # with the query that failed: the first whose result did not come (a pipeline raises
            # at its end, whichever failed).
            failed = summaries if _has_result(found) else abandoned
            raise sa.exc.DBAPIError.instance(
                failed.sql, None, exc, dbapi_error, dialect=connection.dialect
            ) from exc
    return _ReadAhead(records, by_request), built


def _has_result(cursor: Any) -> bool:
    """Whether a psycopg ``cursor`` holds its query's rows (not an error, nor nothing yet)."""
    import psycopg

    result = cursor.pgresult
    return result is not None and result.status == psycopg.pq.ExecStatus.TUPLES_OK


def _abandoned_after_insert(
    landed: Sequence[AttemptRecord], found: Sequence[AttemptRecord], replaced: Sequence[AttemptRecord]
) -> list[AttemptRecord]:
    """What :func:`_postgres_abandoned` would find after the batch's insert and revisions, from what it
    found before them (``found``, for the batch's keys: a superset of the landed attempts' keys,
    whose extra rows ``_is_retry_of`` then turns down) and the batch itself.

    A row the batch replaced (``replaced``: the stored revisions) is found as its new revision is,
    and every landed attempt that is abandoned is found: it matches its own keys and days.
    """
    gone = {(record.attempt_id, record.started_at) for record in replaced}
    kept = [record for record in found if (record.attempt_id, record.started_at) not in gone]
    landed_abandoned = [
        record for record in landed if record.wasted and record.waste_reason is WasteReason.ABANDONED
    ]
    return sorted([*kept, *landed_abandoned], key=operator.attrgetter("attempt_id"))


def _retries_matching(
    connection: sa.Connection, abandoned: Sequence[AttemptRecord], window: timedelta
) -> list[sa.ColumnElement[bool]]:
    """Which stored attempts may be retries of the just-landed ``abandoned`` attempts: one condition
    per index.

    Those of the same logical request, and those of the same fingerprint that started in an hour
    between an abandoned attempt's start and its end plus ``window``
    (``ix_costwatch_attempts_hour_fingerprint``, probed by hour and fingerprint).
    """
    request_ids = sorted({record.logical_request_id for record in abandoned})
    # A retry starts after the attempt it retries, and at most _retry_wait after it.
    started = _started_within(
        connection,
        min(record.started_at for record in abandoned),
        max(record.started_at + _retry_wait(record, window) for record in abandoned),
    )
    by_request = sa.and_(_among(connection, ATTEMPTS.c.logical_request_id, request_ids), started)
    hours: set[datetime] = set()
    fingerprints: set[str] = set()
    for record in abandoned:
        if record.fingerprint is None:
            continue
        fingerprints.add(record.fingerprint)
        first = hour_of(record.started_at)
        wait = _retry_wait(record, window)
        hours.update(first + timedelta(hours=n) for n in range(int(wait / timedelta(hours=1)) + 2))
    if not fingerprints:
        return [by_request]
    hour_column = utc_hour(ATTEMPTS.c.started_at)
    in_hours: sa.ColumnElement[bool]
    if connection.dialect.name == "sqlite":
        stored = sorted(str(_sqlite_utc_text(hour))[:13] for hour in hours)  # as utc_hour reads them
        in_hours = _among(connection, hour_column, stored)
    else:
        naive = sorted(hour.replace(tzinfo=None) for hour in hours)  # timestamp without time zone
        in_hours = hour_column == sa.any_(sa.bindparam(None, naive, type_=sa.ARRAY(sa.DateTime())))
    by_fingerprint = sa.and_(
        in_hours, _among(connection, ATTEMPTS.c.fingerprint, sorted(fingerprints)), started
    )
    return [by_request, by_fingerprint]


def _reclassify_retried(
    connection: sa.Connection,
    landed: Sequence[AttemptRecord],
    window: timedelta,
    abandoned: Sequence[AttemptRecord],
) -> tuple[list[AttemptRecord], list[AttemptRecord]]:
    """Turn stored ``abandoned`` attempts whose retry is now stored into ``retried``.

    ``abandoned``: the stored abandoned attempts the ``landed`` attempts' keys match, as stored after
    the batch's insert and revisions (PostgreSQL: :func:`_abandoned_after_insert` of what
    :func:`_read_ahead` found; SQLite: :func:`_sqlite_landed_lookup`).
    """
    if not landed or not abandoned:
        return [], []
    landed_ids = {record.attempt_id for record in landed}
    # A newly landed abandoned attempt may be the one whose retry was stored first, by another process.
    new_abandoned = [record for record in abandoned if record.attempt_id in landed_ids]
    others: list[AttemptRecord] = []
    if new_abandoned:
        others = _select_rows(connection, *_retries_matching(connection, new_abandoned, window), lock=False)
    # Only attempts sharing a found attempt's logical request or fingerprint can be its retry: the
    # candidates are gathered for those keys alone (a batch's thousands of attempts are not indexed).
    wanted_requests = {record.logical_request_id for record in abandoned}
    wanted_fingerprints = {record.fingerprint for record in abandoned if record.fingerprint is not None}
    by_request: dict[str, list[AttemptRecord]] = {}
    by_fingerprint: dict[str, list[AttemptRecord]] = {}
    candidates_by_id: dict[str, AttemptRecord] = {}
    for record in [*others, *landed]:
        # A landed revision replaces the stored one it revises, whichever of them is a candidate.
        if record.logical_request_id in wanted_requests or record.fingerprint in wanted_fingerprints:
            candidates_by_id[record.attempt_id] = record
        else:
            candidates_by_id.pop(record.attempt_id, None)
    for record in candidates_by_id.values():
        if record.logical_request_id in wanted_requests:
            by_request.setdefault(record.logical_request_id, []).append(record)
        if record.fingerprint in wanted_fingerprints:
            by_fingerprint.setdefault(record.fingerprint, []).append(record)
    added: list[AttemptRecord] = []
    removed: list[AttemptRecord] = []
    postgresql = connection.dialect.name == "postgresql"
    rows: list[dict[str, Any]] = []
    for stored in abandoned:
        # Only attempts sharing its logical request or its fingerprint can be its retry.
        candidates = by_request.get(stored.logical_request_id, [])
        if stored.fingerprint is not None:
            candidates = [*candidates, *by_fingerprint.get(stored.fingerprint, [])]
        if not any(_is_retry_of(later, stored, window) for later in candidates):
            continue
        retried = stored.with_waste(WasteReason.RETRIED)
        values = {"wasted": True, "waste_reason": WasteReason.RETRIED.value, "revision": retried.revision}
        rows.append(_row_of(stored, postgresql, values))
        added.append(retried)
        removed.append(stored)
    if rows:
        connection.execute(_stored_update(postgresql), rows)
    return added, removed


def _apply_rollups(connection: sa.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    if not rows:
        return
    statements = _statements_for(connection.dialect)
    statements.upsert_rollups.run(connection, rows)
    # After the hourly rows (the lock order), the same deltas summed over the hours, in key order.
    statements.upsert_all_time.run(connection, all_time_delta_rows(rows))


_KEY_PREFIXES = {
    kind: hashlib.blake2b(f"costwatch:{kind}:".encode(), digest_size=8) for kind in ("request", "fingerprint")
}
"""Each kind of lock key's hash, fed its prefix once: a copy fed the value is the hash of the whole."""


def _lock_keys(kind: str, values: Iterable[str]) -> set[int]:
    """The advisory-lock keys of ``values``: the first 8 bytes of ``blake2b("costwatch:<kind>:<value>")``
    as a signed integer. Every costwatch writer sharing a store must compute the same keys."""
    prefix = _KEY_PREFIXES[kind]
    keys = set()
    for value in values:
        hashed = prefix.copy()
        hashed.update(value.encode())
        keys.add(int.from_bytes(hashed.digest(), "big", signed=True))
    return keys


def _lock_requests(connection: sa.Connection, records: Sequence[AttemptRecord]) -> None:
    """On PostgreSQL, serialise writers of the same logical request or fingerprint.

    Under READ COMMITTED, an abandoned attempt and its retry written at the same moment by two
    processes would each miss the other's uncommitted row, and the attempt would stay abandoned.
    Transaction-scoped advisory locks, taken in one sorted order (so never deadlocking), make the
    second writer wait and then see the first. SQLite needs none: ``BEGIN IMMEDIATE`` already
    serialises writers.
    """
    if connection.dialect.name != "postgresql":
        return
    keys = _lock_keys("request", {record.logical_request_id for record in records})
    keys |= _lock_keys("fingerprint", {record.fingerprint for record in records if record.fingerprint})
    # The keys as one array literal: psycopg would format a list parameter element by element.
    connection.execute(
        sa.text("SELECT count(pg_advisory_xact_lock(k)) FROM unnest(CAST(:keys AS bigint[])) AS t(k)"),
        {"keys": "{" + ",".join(map(str, sorted(keys))) + "}"},
    )


def write_batch(
    connection: sa.Connection, records: Sequence[AttemptRecord], *, retry_window: timedelta
) -> BatchResult:
    """Write ``records`` inside the caller's open transaction and keep the rollups in step."""
    batch = latest_revisions(records)
    if not batch:
        return BatchResult()
    cutoff = cutoff_for_writing(connection)
    too_old = [] if cutoff is None else [record for record in batch if as_utc(record.started_at) < cutoff]
    if cutoff is not None and too_old:
        reason = (
            f"started before the store's retention cutoff ({cutoff.isoformat()}): a pruned attempt may "
            "have been counted already, so it is not counted again"
        )
        now = datetime.now(timezone.utc)
        insert_rejected(connection, [rejected_row(record, reason, now) for record in too_old])
        kept_apart = {record.attempt_id for record in too_old}
        batch = [record for record in batch if record.attempt_id not in kept_apart]
        if not batch:
            return BatchResult(before_cutoff=len(too_old))
    _lock_requests(connection, batch)
    read_ahead: _ReadAhead | None = None
    rows: list[tuple[Any, ...]] | None = None
    if connection.dialect.name == "postgresql":
        # What the batch's later steps read (its keys' abandoned attempts, its requests' summaries)
        # does not depend on its insert: the server reads it while the writer builds the rows.
        read_ahead, rows = _read_ahead(
            connection, batch, retry_window, lambda: _attempt_rows(connection.dialect, batch)
        )
    # The usual batch is all new attempts, nothing reclassified: its rollup deltas are summed while
    # the server inserts it (they are then the very sums computed below), and used if so.
    every_new: list[list[tuple[Any, ...]]] = []
    inserted, stored = _insert_new(
        connection, batch, lambda: every_new.append(rollup_delta_rows(batch)), rows=rows
    )
    revised, replaced = _apply_revisions(connection, batch, stored)
    landed = [*inserted, *revised]
    if read_ahead is not None:
        found = _abandoned_after_insert(landed, read_ahead.abandoned, replaced)
        summaries = read_ahead.summaries
    else:  # SQLite: both lookups in one statement, after the insert
        found, summaries = _sqlite_landed_lookup(connection, landed, retry_window)
    retried, abandoned = _reclassify_retried(connection, landed, retry_window, found)
    if len(inserted) == len(batch) and not retried:
        deltas = every_new[0]
    else:
        deltas = rollup_delta_rows([*landed, *retried], [*replaced, *abandoned])
    _apply_rollups(connection, deltas)
    update_retried_requests(connection, landed, replaced, stored=summaries)
    return BatchResult(
        inserted=len(inserted), revised=len(revised), reclassified=len(retried), before_cutoff=len(too_old)
    )


def insert_calibration_samples(
    connection: sa.Connection, records: Sequence[AttemptRecord], writer: str
) -> int:
    """Store the output characters of the records that carry them (once per attempt); returns how many
    rows the batch offered."""
    # Only the attempts some revision of which carries characters can have a row: their latest
    # revisions are those of all the records, found among far fewer (a few in a batch of hundreds).
    with_chars = {record.attempt_id for record in records if record.output_chars}
    if not with_chars:
        return 0
    sampled = [
        record
        for record in latest_revisions(record for record in records if record.attempt_id in with_chars)
        if record.output_chars and record.model_name
    ]
    if not sampled:
        return 0
    dialect = connection.dialect.name
    if dialect == "sqlite":
        # Bound here as SQLAlchemy would bind them (the start time as text, the characters as JSON
        # text), through the driver: SQLAlchemy's execution of the rows cost the writer more.
        key = _driver_key(connection.dialect)
        bulk = _SQLITE_INSERT_SAMPLES.get(key)
        if bulk is None:
            tail = "ON CONFLICT (attempt_id) DO NOTHING"
            bulk = _bulk_insert(CALIBRATION_SAMPLES, _SAMPLE_COLUMNS, connection.dialect, tail)
            _SQLITE_INSERT_SAMPLES[key] = bulk
        bulk.run(
            connection,
            [
                (
                    record.attempt_id,
                    _sqlite_utc_text(record.started_at),
                    record.model_name,
                    None if record.usage.output_estimated else record.usage.output_tokens,
                    record.output_source.value,
                    json.dumps(dict(record.output_chars)),
                    writer,
                )
                for record in sampled
            ],
            bound=True,
        )
        return len(sampled)
    rows = [
        {
            "attempt_id": record.attempt_id,
            "started_at": record.started_at,
            "model": record.model_name,
            "output_tokens": None if record.usage.output_estimated else record.usage.output_tokens,
            "output_source": record.output_source.value,
            "chars": dict(record.output_chars),
            "writer": writer,
        }
        for record in sampled
    ]
    statement = _INSERT_SAMPLES.get(dialect)
    if statement is None:
        insert = insert_of(dialect)(CALIBRATION_SAMPLES)
        statement = _INSERT_SAMPLES[dialect] = insert.on_conflict_do_nothing(index_elements=["attempt_id"])
    connection.execute(statement, rows)
    return len(rows)


_SAMPLE_COLUMNS = ("attempt_id", "started_at", "model", "output_tokens", "output_source", "chars", "writer")
_SQLITE_INSERT_SAMPLES: dict[str, _BulkStatement] = {}
_INSERT_SAMPLES: dict[str, Any] = {}
"""The calibration samples' insert on each backend, built at its first use: a batch binds only its
rows. A revision of the same attempt (a waste flip, a redelivered batch) carries the same counts, so
a conflict is ignored."""


def reconcile_calibration_samples(
    connection: sa.Connection, records: Sequence[AttemptRecord], writer: str
) -> int:
    """Give the stored samples of these attempts, whose output the bill corrected, that output (flagged
    ``reconciled``); returns how many samples changed.

    A changed sample is written anew rather than updated: it gets a new ``sample_id``, so processes
    that refresh their calibration past the ids they have read take it too. Idempotent: a sample
    that already holds the attempt's output is left as it is.
    """
    table = CALIBRATION_SAMPLES
    wanted = {record.attempt_id: record for record in records}
    stored = connection.execute(
        sa.select(table).where(_among(connection, table.c.attempt_id, sorted(wanted)))
    ).mappings()
    rows = [
        {
            "attempt_id": row["attempt_id"],
            "started_at": row["started_at"],
            "model": row["model"],
            "output_tokens": wanted[row["attempt_id"]].usage.output_tokens,
            "output_source": wanted[row["attempt_id"]].output_source.value,
            "chars": row["chars"],
            "writer": writer,
        }
        for row in stored
        if (row["output_tokens"], row["output_source"])
        != (wanted[row["attempt_id"]].usage.output_tokens, wanted[row["attempt_id"]].output_source.value)
    ]
    if rows:
        changed = sorted(row["attempt_id"] for row in rows)
        connection.execute(sa.delete(table).where(_among(connection, table.c.attempt_id, changed)))
        connection.execute(sa.insert(table), rows)
    return len(rows)
