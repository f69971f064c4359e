"""The store at scale: writer throughput, and one fleet scrape and one report at 10k to 1M attempts.

Attempts are synthetic but shaped like production: spread over the last 30 days, eight models, two
dozen workflows, about one attempt in eight failing (dropped streams most often), most failures
retried and some abandoned, every record priced, ids drawn as :func:`costwatch.records.new_id` draws
them (UUIDv7: the start time, then random bits). They go through the store's own write path
(``SqlStore.export``, batches of 500 as the pipeline sends them) in the order they started, as a
store fills in production, so the write throughput is measured on the way to each size. At the
largest size, a further batch of attempts in random order with fully random ids (old ids, or many
spools replayed at once) shows the worst case, untargeted. At each size the benchmark times a
fleet-exporter scrape (the whole ``/metrics`` text of a :class:`~costwatch.exporter.FleetCollector`)
and ``costwatch report --by model`` (the CLI in this process, output captured), on SQLite and on
PostgreSQL (a throwaway database, dropped at the end).
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import MappingProxyType

import sqlalchemy as sa
from measure import Measurement

from costwatch.pricing import PriceTable, load_prices
from costwatch.records import AttemptRecord, Outcome, Usage, WasteReason, new_id
from costwatch.settings import default_of
from costwatch.store import SqlStore

__all__ = [
    "DEFAULT_POSTGRES_URL",
    "REPORT_TARGET_S",
    "SCRAPE_TARGET_S",
    "WRITE_TARGETS",
    "measure_store",
    "synthetic_attempts",
]

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
WRITE_TARGETS = {"sqlite": 20_000.0, "postgresql": 10_000.0}
"""Attempts per second one process must write, by backend."""
SCRAPE_TARGET_S = 0.100
REPORT_TARGET_S = 1.0
PIPELINE_BATCH: int = default_of("batch_size")
"""Records a batch of the store benchmarks holds: the pipeline's default, ``COSTWATCH_BATCH_SIZE``."""
_TARGET_ROWS = 1_000_000
_SPAN = timedelta(days=30)

_MODELS = (
    ("claude-opus-4-6", 0.20),
    ("claude-sonnet-4-6", 0.35),
    ("claude-haiku-4-5", 0.25),
    ("claude-sonnet-4-5", 0.08),
    ("claude-opus-4-5", 0.05),
    ("claude-haiku-5-5", 0.04),
    ("claude-opus-4-1", 0.02),
    ("claude-sonnet-4-0", 0.01),
)
_WORKFLOWS = (*(f"workflow-{name}" for name in range(24)), "")
_FAILURES = (
    # (outcome, error type, api error type, weight)
    (Outcome.DROPPED, "RemoteProtocolError", None, 0.55),
    (Outcome.HTTP_ERROR, "OverloadedError", "overloaded_error", 0.2),
    (Outcome.STREAM_ERROR, "APIStatusError", "overloaded_error", 0.1),
    (Outcome.CONNECT_ERROR, "APIConnectionError", None, 0.05),
    (Outcome.CANCELLED, None, None, 0.1),
)


def _uuid7_hex(at: datetime) -> str:
    """An id as :func:`costwatch.records.new_id` would have drawn it at ``at``: its own, with ``at``'s
    Unix milliseconds in its first 48 bits."""
    return f"{int(at.timestamp() * 1000):012x}{new_id()[12:]}"


def synthetic_attempts(
    count: int,
    *,
    seed: int,
    start: datetime,
    end: datetime,
    prices: PriceTable,
    in_order: bool = True,
) -> list[AttemptRecord]:
    """About ``count`` attempts of logical requests with retries, started between ``start`` and ``end``.

    ``in_order``: sorted by start, with time-ordered ids; else shuffled, with fully random ids.
    """
    rng = random.Random(seed)
    models = [m for m, _ in _MODELS]
    model_weights = [w for _, w in _MODELS]
    failure_weights = [f[3] for f in _FAILURES]
    span = end - start
    made: list[AttemptRecord] = []
    while len(made) < count:
        model = rng.choices(models, model_weights)[0]
        workflow = rng.choice(_WORKFLOWS)
        tags = MappingProxyType({"workflow": workflow}) if workflow else MappingProxyType({})
        started = start + span * rng.random()
        request_id = _uuid7_hex(started) if in_order else uuid.UUID(int=rng.getrandbits(128)).hex
        fingerprint = uuid.UUID(int=rng.getrandbits(128)).hex
        input_tokens = rng.randint(200, 60_000)
        cache_read = rng.choice((0, 0, input_tokens * 2))
        failures = 0
        while rng.random() < 0.125 and failures < 3:
            failures += 1
        abandoned = failures > 0 and rng.random() < 0.15
        attempts = failures if abandoned else failures + 1
        for number in range(1, attempts + 1):
            failed = number <= failures
            outcome, error_type, api_error, billed = Outcome.COMPLETED, None, None, True
            output = rng.randint(50, 4_000)
            if failed:
                outcome, error_type, api_error, _ = rng.choices(_FAILURES, failure_weights)[0]
                billed = outcome not in (Outcome.HTTP_ERROR, Outcome.CONNECT_ERROR)
                output = rng.randint(0, output)
            usage = (
                Usage(
                    input_tokens=input_tokens,
                    cache_read_tokens=cache_read,
                    output_tokens=output,
                    output_estimated=outcome in (Outcome.DROPPED, Outcome.CANCELLED),
                    estimated_output_tokens=output if outcome in (Outcome.DROPPED, Outcome.CANCELLED) else 0,
                )
                if billed
                else Usage()
            )
            wasted = failed and usage.billed_tokens > 0
            reason = (
                (WasteReason.ABANDONED if number == attempts else WasteReason.RETRIED) if wasted else None
            )
            attempt_started = started + timedelta(seconds=(number - 1) * 20)
            made.append(
                AttemptRecord(
                    attempt_id=_uuid7_hex(attempt_started)
                    if in_order
                    else uuid.UUID(int=rng.getrandbits(128)).hex,
                    logical_request_id=request_id,
                    attempt_number=number,
                    started_at=attempt_started,
                    outcome=outcome,
                    model_requested=model,
                    model=model if billed else None,
                    stream=True,
                    request_id=f"req_{rng.getrandbits(64):016x}",
                    http_status=529
                    if outcome is Outcome.HTTP_ERROR
                    else (None if outcome is Outcome.CONNECT_ERROR else 200),
                    error_type=error_type,
                    api_error_type=api_error,
                    duration_s=rng.uniform(0.5, 90.0),
                    usage=usage,
                    cost=prices.cost(model, usage),
                    wasted=wasted,
                    waste_reason=reason,
                    tags=tags,
                    fingerprint=fingerprint,
                    events_received=output // 2,
                    bytes_received=output * 60,
                )
            )
    if in_order:
        made.sort(key=lambda record: record.started_at)
    else:
        rng.shuffle(made)
    return made


@contextlib.contextmanager
def _sqlite_url() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="costwatch-bench-") as directory:
        yield f"sqlite:///{Path(directory) / 'bench.db'}"


@contextlib.contextmanager
def _postgres_url(server_url: str) -> Iterator[str]:
    """A throwaway database on the server of ``server_url``, dropped on exit."""
    name = f"costwatch_bench_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(
        sa.make_url(server_url).set(drivername="postgresql+psycopg"),
        isolation_level="AUTOCOMMIT",
        connect_args={"connect_timeout": 5},
    )
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
        try:
            yield (
                sa.make_url(server_url)
                .set(drivername="postgresql+psycopg", database=name)
                .render_as_string(hide_password=False)
            )
        finally:
            with admin.connect() as connection:
                connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()


def _scrape_s(url: str, repeats: int) -> tuple[float, float]:
    """Median seconds of the first scrape of a new exporter (cold), and of the scrapes after it (warm)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from costwatch.exporter import FleetCollector

    cold, warm = [], []
    for _ in range(repeats):
        registry = CollectorRegistry()
        collector = FleetCollector(url)
        registry.register(collector)
        try:
            collector.store.engine.connect().close()  # connecting is not part of a scrape
            for samples in (cold, warm, warm):
                started = time.perf_counter()
                text = generate_latest(registry)
                samples.append(time.perf_counter() - started)
        finally:
            collector.store.shutdown()
        if b"costwatch_up 1.0" not in text:
            raise RuntimeError("the fleet exporter could not read the store")
    return statistics.median(cold), statistics.median(warm)


def _report_s(url: str, repeats: int) -> float:
    from costwatch import cli

    samples = []
    for _ in range(repeats):
        out = io.StringIO()
        started = time.perf_counter()
        with contextlib.redirect_stdout(out):
            status = cli.main(["report", "--by", "model", "--db", url])
        samples.append(time.perf_counter() - started)
        if status != 0 or "claude-" not in out.getvalue():
            raise RuntimeError(f"costwatch report failed (exit {status}): {out.getvalue()[-300:]!r}")
    return statistics.median(samples)


def _backend_rows(
    backend: str, url: str, sizes: Sequence[int], *, read_repeats: int, worst_case: int, seed: int
) -> list[Measurement]:
    rows: list[Measurement] = []
    store = SqlStore(url)
    store.attempt_count()  # migrate before timing any write
    prices = load_prices()
    now = datetime.now(timezone.utc)
    first = now - _SPAN
    stored = 0
    try:
        for size in sizes:
            # This step's attempts started after the previous step's: the store fills over 30 days.
            records = synthetic_attempts(
                size - stored,
                seed=seed + size,
                start=first + _SPAN * (stored / sizes[-1]),
                end=first + _SPAN * (size / sizes[-1]),
                prices=prices,
            )
            rate = _write_rate(store, records)
            target = WRITE_TARGETS[backend]
            rows.append(
                Measurement(
                    benchmark="store writes",
                    case=f"{backend}, attempts {stored:,} to {stored + len(records):,}, "
                    f"batches of {PIPELINE_BATCH}",
                    metric="writer throughput",
                    value=rate,
                    unit="attempts/s",
                    target=f">= {target:,.0f}/s",
                    met=rate >= target,
                    detail={"attempts": len(records), "seconds": len(records) / rate},
                )
            )
            stored += len(records)
            del records
            gated = size >= _TARGET_ROWS
            cold_scrape_s, warm_scrape_s = _scrape_s(url, read_repeats)
            for name, seconds, target_s in (
                ("fleet exporter scrape, first of a process (cold)", cold_scrape_s, SCRAPE_TARGET_S),
                ("fleet exporter scrape, later ones (warm)", warm_scrape_s, SCRAPE_TARGET_S),
                ("costwatch report --by model", _report_s(url, read_repeats), REPORT_TARGET_S),
            ):
                rows.append(
                    Measurement(
                        benchmark="store reads",
                        case=f"{backend}, {name}, {stored:,} attempts stored",
                        metric="median time",
                        value=seconds * 1000,
                        unit="ms",
                        target=f"< {target_s * 1000:g} ms" if gated else f"(< {target_s * 1000:g} ms at 1M)",
                        met=(seconds < target_s) if gated else None,
                        detail={
                            "attempts": stored,
                            "repeats": read_repeats,
                            "rollup_rows": _rollup_rows(store),
                        },
                    )
                )
        if worst_case:
            records = synthetic_attempts(
                worst_case, seed=seed - 1, start=first, end=now, prices=prices, in_order=False
            )
            rate = _write_rate(store, records)
            rows.append(
                Measurement(
                    benchmark="store writes",
                    case=f"{backend}, {len(records):,} more in random order with random ids, "
                    f"{stored:,} stored (worst case)",
                    metric="writer throughput",
                    value=rate,
                    unit="attempts/s",
                    detail={"attempts": len(records), "seconds": len(records) / rate},
                )
            )
    finally:
        store.shutdown()
    return rows


def _write_rate(store: SqlStore, records: Sequence[AttemptRecord]) -> float:
    """Attempts per second of writing ``records`` in pipeline-sized batches."""
    started = time.perf_counter()
    for start in range(0, len(records), PIPELINE_BATCH):
        store.export(records[start : start + PIPELINE_BATCH])
    return len(records) / (time.perf_counter() - started)


def _rollup_rows(store: SqlStore) -> int:
    from costwatch.store import ROLLUPS

    with store.engine.connect() as connection:
        return int(connection.execute(sa.select(sa.func.count()).select_from(ROLLUPS)).scalar_one())


def measure_store(
    sizes: Sequence[int],
    *,
    read_repeats: int,
    worst_case: int = 0,
    postgres_url: str | None = DEFAULT_POSTGRES_URL,
    seed: int = 7,
) -> list[Measurement]:
    """Write throughput on the way to each size in ``sizes``, then a scrape and a report at each size.

    ``worst_case``: then that many more attempts in random order with random ids (0: none).
    """
    rows: list[Measurement] = []
    with _sqlite_url() as url:
        rows += _backend_rows(
            "sqlite", url, sizes, read_repeats=read_repeats, worst_case=worst_case, seed=seed
        )
    if postgres_url:
        try:
            database = _postgres_url(postgres_url)
            url = database.__enter__()
        except Exception as exc:  # no server here: say so in the table rather than fail
            rows.append(
                Measurement(
                    benchmark="store writes",
                    case=f"postgresql skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}",
                    metric="skipped",
                    value=0.0,
                    unit="",
                )
            )
            return rows
        try:
            rows += _backend_rows(
                "postgresql", url, sizes, read_repeats=read_repeats, worst_case=worst_case, seed=seed
            )
        finally:
            database.__exit__(None, None, None)
    return rows
