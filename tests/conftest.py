"""Shared fixtures: an instrumented SDK whose records land in memory, SDK call shapes, a PostgreSQL
schema per test, metric sample readers, and a guard against tests that leak state into the checkout."""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

import costwatch
import costwatch.pipeline
from costwatch.pipeline import Pipeline
from costwatch.pricing import load_prices
from costwatch.records import AttemptRecord, Outcome, Usage
from costwatch.sinks import MemorySink

if TYPE_CHECKING:
    # Imported where a client is built: pytest-xdist's controller loads this module and runs no test,
    # and the SDK's import is seconds of CPU.
    import anthropic

# Which tests run on every SDK line (marked ``sdk``), and the guard on the others.
pytest_plugins = ["sdk_lines"]


# -- one CA certificate instead of a bundle ---------------------------------------------------------
def _trust_one_ca_certificate() -> None:
    """Point ``SSL_CERT_FILE`` at one certificate of the CA bundle, for this process and its children.

    httpx and httpx2 load the whole bundle (about 140 certificates, 60 ms of CPU) into a new SSL context
    for every client they build, and the suite builds hundreds, here and in the processes it starts.
    Its clients speak plain HTTP to the fake server and never check a certificate; both HTTP clients
    read ``SSL_CERT_FILE`` first, so each now loads one. Without a bundle to take it from, nothing changes.
    """
    bundle = ssl.get_default_verify_paths().cafile
    if bundle is None:
        return
    with open(bundle, encoding="ascii", errors="replace") as file:
        pem = file.read()
    end = pem.find("-----END CERTIFICATE-----")
    if end < 0:
        return
    handle, path = tempfile.mkstemp(prefix="costwatch-tests-ca-", suffix=".pem")
    with os.fdopen(handle, "w", encoding="ascii") as file:
        file.write(pem[: end + len("-----END CERTIFICATE-----")] + "\n")
    atexit.register(os.unlink, path)
    os.environ["SSL_CERT_FILE"] = path


_trust_one_ca_certificate()


# -- the collector skips what was there before the first test ---------------------------------------
def pytest_collection_finish() -> None:
    """Freeze what the test process holds once it has collected (the SDK, SQLAlchemy, every test module
    and item: some 230,000 objects), so a full collection no longer walks it, only what the tests made.

    Each full collection (the fault matrix asks for one per run, the interpreter for one now and then)
    took ~0.14 CPU s over that heap, 16 of the fault matrix's 22 CPU s on 2.x. The frozen objects live
    as long as the process anyway; what a test makes is collected as before.
    """
    gc.collect()
    gc.freeze()


# -- Ctrl-C in the processes the tests start ------------------------------------------------------
def sigint_by_default() -> None:
    """``preexec_fn`` of a process a test sends SIGINT: it takes SIGINT by default, as from a shell.

    A test runner started as a background job (``pytest ... &`` in a script) ignores SIGINT, and its
    children inherit that: a program started ignoring SIGINT rightly keeps ignoring it (``costwatch
    run``'s program, ``costwatch serve``), so its test waited out its timeout instead (the SIGINT
    "hangs" of the fifth session's background runs).
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def runner_ignoring_sigint() -> Iterator[None]:
    """The test's process ignores SIGINT while the test runs, as a runner started as a background job
    does: a test that sends SIGINT to a process it starts then passes only if it starts it with
    :func:`sigint_by_default`, however the suite was started."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class ManualClock:
    """A monotonic clock the test moves by hand (``clock.now += 5``), for code that takes a ``clock``."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Accounting:
    """What an instrumented test reads: the records, after a flush."""

    pipeline: Pipeline
    sink: MemorySink

    def records(self) -> list[costwatch.AttemptRecord]:
        assert costwatch.flush(10), "records were not delivered in time"
        return self.sink.records

    def forget(self) -> None:
        """Deliver what is queued, then forget every record so far."""
        assert costwatch.flush(10)
        self.sink.clear()


@pytest.fixture
def accounting() -> Iterator[Accounting]:
    """costwatch instrumenting every client, with its records going to a MemorySink."""
    pipeline = Pipeline()
    sink = MemorySink()
    assert costwatch.instrument(pipeline=pipeline, sinks=[sink], listeners=[], prices=load_prices())
    try:
        yield Accounting(pipeline, sink)
    finally:
        costwatch.uninstrument()
        pipeline.shutdown()


def sync_client(server, **kwargs) -> anthropic.Anthropic:
    import anthropic

    return anthropic.Anthropic(base_url=server.base_url, api_key="sk-ant-test-key", **kwargs)


def async_client(server, **kwargs) -> anthropic.AsyncAnthropic:
    import anthropic

    return anthropic.AsyncAnthropic(base_url=server.base_url, api_key="sk-ant-test-key", **kwargs)


@contextlib.contextmanager
def raises_the_cut() -> Iterator[pytest.ExceptionInfo[Exception]]:
    """Expect what the SDK raises when the fake cuts the connection mid-body: the HTTP client's
    ``RemoteProtocolError`` (httpx's or httpx2's), bare as anthropic before 2.17 raises it, or as the
    direct cause of the ``APIConnectionError`` that anthropic 2.17 on wraps it in."""
    with pytest.raises(Exception) as info:
        yield info
    cut = http_client_error(info.value)
    assert type(cut).__name__ == "RemoteProtocolError", repr(info.value)
    assert type(cut).__module__ in ("httpx", "httpx2"), repr(info.value)


def http_client_error(exc: BaseException) -> BaseException:
    """The HTTP client's own error behind what the SDK raised for a cut or a stall mid-body: the cause
    of the ``APIConnectionError`` (or ``APITimeoutError``) of anthropic 2.17 on, else ``exc`` itself."""
    import anthropic

    if isinstance(exc, anthropic.APIConnectionError) and exc.__cause__ is not None:
        return exc.__cause__
    return exc


def read_stream_through_a_cut(server, i: int, model: str) -> None:
    """Stream job ``i`` through the real SDK to its end, or to the cut the fake made in its body."""
    import anthropic

    client = sync_client(server, max_retries=0)
    messages = [{"role": "user", "content": f"job {i}"}]
    try:
        for _ in client.messages.create(model=model, max_tokens=4096, messages=messages, stream=True):
            pass
    except anthropic.APIConnectionError:
        pass
    except Exception as exc:  # httpx's own RemoteProtocolError, whichever SDK line
        if "incomplete" not in str(exc) and "closed" not in str(exc):
            raise


# -- PostgreSQL -------------------------------------------------------------------------------------
POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
"""The test server's database (trust auth); each test works in a schema of its own."""


def postgres_available() -> bool:
    """Whether the PostgreSQL test server answers within two seconds."""
    try:
        engine = sa.create_engine(POSTGRES, connect_args={"connect_timeout": 2})
        with engine.connect():
            pass
        engine.dispose()
        return True
    except sa.exc.OperationalError:
        return False


def postgres_schema_url(schema: str, *, port: int = 5432, password: str | None = None) -> str:
    """A URL to the test database whose search path is ``schema``."""
    auth = f"postgres:{password}" if password else "postgres"
    return f"postgresql://{auth}@127.0.0.1:{port}/test?options=-csearch_path%3D{schema}"


@pytest.fixture
def postgres_schema() -> Iterator[str]:
    """A fresh schema in the ``test`` database, dropped afterwards, so parallel runs never collide."""
    if not postgres_available():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432")
    schema = f"cw_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(POSTGRES)
    with admin.begin() as connection:
        connection.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    try:
        yield schema
    finally:
        with admin.begin() as connection:
            connection.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty store on each backend (PostgreSQL: a schema of its own, dropped afterwards)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return postgres_schema_url(request.getfixturevalue("postgres_schema"))


@pytest.fixture(scope="session")
def sqlite_store_at_head(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite store migrated to the newest revision once per test process, for ``new_store_url``."""
    from costwatch.store.migrate import upgrade

    path = tmp_path_factory.mktemp("store-at-head") / "store.db"
    upgrade(f"sqlite:///{path}")
    assert not Path(f"{path}-wal").exists(), "the migration's last connection left a write-ahead log"
    return path


_SCHEMA_PLACEHOLDER = "cw_schema_at_head_placeholder"


def _pg_dump(schema: str, *what: str) -> str | None:
    """``pg_dump`` of one schema of the test database, without psql's meta-commands; None without it."""
    try:
        command = ["pg_dump", "-h", "127.0.0.1", "-U", "postgres", "--no-owner", "--no-privileges", *what]
        done = subprocess.run(
            [*command, "-n", schema, "test"],
            capture_output=True,
            text=True,
            timeout=300,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return "\n".join(line for line in done.stdout.splitlines() if not line.startswith("\\"))


def _create_schema_from(script: str, schema: str) -> None:
    admin = sa.create_engine(POSTGRES)
    try:
        with admin.begin() as connection:
            connection.exec_driver_sql(script.replace(_SCHEMA_PLACEHOLDER, schema))
    finally:
        admin.dispose()


def _drop_schema(schema: str) -> None:
    admin = sa.create_engine(POSTGRES)
    try:
        with admin.begin() as connection:
            connection.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
    finally:
        admin.dispose()


@pytest.fixture(scope="session")
def postgres_schema_at_head() -> str | None:
    """The SQL that makes a schema at the newest revision (``pg_dump`` of one migrated once per test
    process, its name a placeholder), checked once to dump as the migrated one does; None without
    ``pg_dump``. Replayed, it costs ~0.1 s of the server's CPU and none of the client's, where
    Alembic's run costs ~0.15 s of each."""
    from costwatch.store.migrate import upgrade

    if not postgres_available():
        return None
    migrated, replayed = (f"cw_{uuid.uuid4().hex[:12]}" for _ in range(2))
    _create_schema_from(f'CREATE SCHEMA "{_SCHEMA_PLACEHOLDER}"', migrated)  # an empty one, migrated here
    try:
        upgrade(postgres_schema_url(migrated))
        schema, data = _pg_dump(migrated, "--schema-only"), _pg_dump(migrated, "--data-only", "--inserts")
    finally:
        _drop_schema(migrated)
    if schema is None or data is None:
        return None
    script = f"{schema}\n{data}".replace(migrated, _SCHEMA_PLACEHOLDER)
    _create_schema_from(script, replayed)
    try:
        again = _pg_dump(replayed, "--schema-only")
    finally:
        _drop_schema(replayed)
    assert again is not None and again.replace(replayed, _SCHEMA_PLACEHOLDER) == schema.replace(
        migrated, _SCHEMA_PLACEHOLDER
    ), "a schema made from the dump differs from the migrated one"
    return script


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def new_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a store with nothing in it on each backend, for tests of what a store does rather than
    how it is created, at the newest revision already: on SQLite a copy of ``sqlite_store_at_head``, on
    PostgreSQL a schema of its own made by ``postgres_schema_at_head``'s SQL (Alembic's run costs ~0.15
    CPU s a store, and on PostgreSQL as much again in the server), dropped afterwards. ``store_url`` is
    the empty database, for the tests of a store's creation and migrations."""
    if request.param == "sqlite":
        path = tmp_path / "store.db"
        shutil.copyfile(request.getfixturevalue("sqlite_store_at_head"), path)
        yield f"sqlite:///{path}"
        return
    script = request.getfixturevalue("postgres_schema_at_head")
    if script is None:  # no pg_dump: an empty schema, which its first store migrates
        yield postgres_schema_url(request.getfixturevalue("postgres_schema"))
        return
    schema = f"cw_{uuid.uuid4().hex[:12]}"
    _create_schema_from(script, schema)
    try:
        yield postgres_schema_url(schema)
    finally:
        _drop_schema(schema)


# -- the clock's hours -------------------------------------------------------------------------------
HOUR_MARGIN_S = 60
"""How long before the top of an hour ``one_hour_bucket`` waits for the next: longer than any test
that uses it takes, even under load."""


@pytest.fixture
def one_hour_bucket() -> None:
    """Start the test in the first 59 minutes of an hour (UTC), waiting for the next hour if need be.

    For a test that sends traffic now and reads it back from one hourly bucket (the usage report's,
    the hourly rollups'): its traffic then stays in one hour. A test whose assertions hold across the
    top of an hour (sums over every bucket, records at fixed moments) needs none.
    """
    left = 3600 - time.time() % 3600
    if left < HOUR_MARGIN_S:
        time.sleep(left + 1)


# -- records ----------------------------------------------------------------------------------------
def completed_attempt(n: int) -> AttemptRecord:
    """A small completed attempt, the ``n``-th: its own ids, started ``n`` seconds after a fixed moment."""
    return AttemptRecord(
        attempt_id=f"att-{n}",
        logical_request_id=f"req-{n}",
        attempt_number=1,
        started_at=datetime(2025, 3, 1, tzinfo=timezone.utc) + timedelta(seconds=n),
        outcome=Outcome.COMPLETED,
        model="claude-sonnet-4-5",
        usage=Usage(input_tokens=100, output_tokens=10),
    )


# -- Prometheus samples -----------------------------------------------------------------------------
def sample_value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """A sample's value after a scrape of ``registry``; 0 for a series that does not exist (yet)."""
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def wasted_tokens(
    registry: CollectorRegistry, reason: str, token_type: str = "input", workflow: str = "", *, model: str
) -> float:
    """``costwatch_wasted_tokens_total`` for one model, waste reason, token type and workflow."""
    return sample_value(
        registry,
        "costwatch_wasted_tokens_total",
        model=model,
        token_type=token_type,
        reason=reason,
        workflow=workflow,
    )


# -- tests leave nothing behind ---------------------------------------------------------------------
_CHECKOUT_DATABASES = {(Path(__file__).resolve().parent.parent / "costwatch.db"), Path.cwd() / "costwatch.db"}


def _database_state() -> dict[Path, int | None]:
    return {path: (path.stat().st_mtime_ns if path.exists() else None) for path in _CHECKOUT_DATABASES}


@pytest.fixture(autouse=True)
def leaves_no_store_or_global_writer_behind() -> Iterator[None]:
    """Fail a test that writes ``costwatch.db`` in the checkout or starts the process-wide writer.

    Either one means the test used ``instrument()``'s defaults (the working directory's store, the
    process-wide pipeline) where it should have given its own sinks and pipeline.
    """
    databases = _database_state()
    global_pipeline = costwatch.pipeline._pipeline
    writer_was_running = global_pipeline is not None and global_pipeline._thread is not None
    yield
    problems = [
        f"wrote {path}"
        for path, mtime in _database_state().items()
        if mtime is not None and mtime != databases[path]
    ]
    global_pipeline = costwatch.pipeline._pipeline
    if not writer_was_running and global_pipeline is not None and global_pipeline._thread is not None:
        global_pipeline.shutdown(10)
        problems.append("left the process-wide costwatch-pipeline thread running")
    if problems:
        pytest.fail(f"the test {' and '.join(problems)}; give instrument() its own pipeline and sinks")
