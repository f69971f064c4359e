"""8. `costwatch serve` under load: many distinct model/workflow pairs, many concurrent scrapers.

A SQLite store is filled with the store benchmark's synthetic attempts (30 days, retries, failures),
each given one of ``pairs`` model/workflow pairs (``sqrt(pairs)`` models x ``sqrt(pairs)``
workflows), through the store's own write path in batches of 500. ``costwatch serve``'s server
(``costwatch serve`` in a process of its own) then answers ``scrapers`` threads that each scrape
``/metrics`` over HTTP once a second, ``scrapes`` times (50 scrapers: 50 scrapes a second, the load
under which nearly every scrape timed out before). The row is the 99th percentile of a scrape's
latency as a scraper sees it; ``detail`` has the median, the reads of the store they caused, and the
time of one uncached read (a new exporter's first scrape).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import MappingProxyType

import sqlalchemy as sa
from measure import Measurement
from sqlalchemy.engine import make_url
from store_scale import (
    _MODELS,
    _WORKFLOWS,
    PIPELINE_BATCH,
    SCRAPE_TARGET_S,
    _postgres_url,
    synthetic_attempts,
)

from costwatch.pricing import load_prices
from costwatch.records import AttemptRecord
from costwatch.store import SqlStore

__all__ = ["measure_scrape_load", "scrape_load_rows"]


def _fill(url: str, attempts: int, pairs: int) -> None:
    side = max(1, math.isqrt(pairs))
    now = datetime.now(timezone.utc)
    start = now - timedelta(days=30)
    chunks = max(1, attempts // _CHUNK)
    store = SqlStore(url)
    try:
        # Made and written a slice of the 30 days at a time, in order: memory stays bounded at 1M.
        for chunk in range(chunks):
            records = synthetic_attempts(
                attempts // chunks,
                seed=18 + chunk,
                start=start + (now - start) * chunk / chunks,
                end=start + (now - start) * (chunk + 1) / chunks - timedelta(minutes=1),
                prices=load_prices(),
            )
            for first in range(0, len(records), PIPELINE_BATCH):
                store.write([_paired(record, side) for record in records[first : first + PIPELINE_BATCH]])
    finally:
        store.shutdown()


_CHUNK = 100_000


def _kept_postgres_database(server_url: str, name: str, attempts: int, pairs: int) -> str:
    """The URL of database ``name`` on the server of ``server_url``, created and filled if missing.

    Filled under another name and renamed once full, so that an interrupted fill is never reused.
    """
    server = sa.make_url(server_url).set(drivername="postgresql+psycopg")
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    try:
        with admin.connect() as connection:
            exists = sa.text("SELECT 1 FROM pg_database WHERE datname = :name")
            if not connection.execute(exists, {"name": name}).scalar():
                filling = f"{name}_filling"
                connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{filling}" WITH (FORCE)')
                connection.exec_driver_sql(f'CREATE DATABASE "{filling}"')
                _fill(server.set(database=filling).render_as_string(hide_password=False), attempts, pairs)
                connection.exec_driver_sql(f'ALTER DATABASE "{filling}" RENAME TO "{name}"')
    finally:
        admin.dispose()
    return server.set(database=name).render_as_string(hide_password=False)


def _paired(record: AttemptRecord, side: int) -> AttemptRecord:
    """The record with one of ``side`` x ``side`` model/workflow pairs, the same for its retries."""
    pair = int(record.logical_request_id[-8:], 16) % (side * side)
    return dataclasses.replace(
        record,
        model=f"claude-bench-{pair % side}",
        tags=MappingProxyType({"workflow": f"wf-{pair // side}"}),
    )


_SERVE = "import sys; from costwatch.cli import main; sys.exit(main(sys.argv[1:]))"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_until_serving(url: str, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            _scrape(url)
            return
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("costwatch serve did not start") from None
            time.sleep(0.1)


def _scrape(url: str) -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as response:
        body = response.read()
    if b"costwatch_up 1.0" not in body:
        raise RuntimeError("the exporter could not read the store")
    return time.perf_counter() - started


def measure_scrape_load(
    attempts: int,
    *,
    pairs: int,
    scrapers: int,
    scrapes: int,
    database: Path | None = None,
    postgres_url: str | None = None,
    postgres_database: str | None = None,
) -> list[Measurement]:
    """p99 scrape latency of ``scrapers`` concurrent scrapers over a store of ``attempts``.

    ``database``: a SQLite file to keep the filled store in; when it exists it is used as it is
    (filling 1M attempts takes minutes), so it must have been filled with the same sizes.
    ``postgres_url``: the store in a throwaway database on that PostgreSQL server instead, or in
    ``postgres_database`` there, kept: created and filled when missing, else used as it is.
    """
    with contextlib.ExitStack() as stack:
        fill_started = time.perf_counter()
        if postgres_url and postgres_database:
            url = _kept_postgres_database(postgres_url, postgres_database, attempts, pairs)
        elif postgres_url:
            url = stack.enter_context(_postgres_url(postgres_url))
            _fill(url, attempts, pairs)
        else:
            scratch = stack.enter_context(tempfile.TemporaryDirectory())
            path = database or Path(scratch) / "scrape.db"
            url = f"sqlite:///{path}"
            if not path.exists():
                filling = path.with_name(path.name + ".filling")  # an interrupted fill is not reused
                _fill(f"sqlite:///{filling}", attempts, pairs)
                filling.rename(path)
        fill_s = time.perf_counter() - fill_started
        return scrape_load_rows(url, attempts, pairs=pairs, scrapers=scrapers, scrapes=scrapes, fill_s=fill_s)
    raise AssertionError("unreachable")  # mypy: ExitStack may swallow exceptions


def scrape_load_rows(
    url: str, attempts: int, *, scrapers: int, scrapes: int, fill_s: float, pairs: int | None = None
) -> list[Measurement]:
    """The row above for the store at ``url``, already filled with ``attempts`` attempts (``pairs``:
    its model/workflow pairs, for the row's name; ``None``: the store benchmark's own)."""
    if pairs is None:
        pairs = len(_MODELS) * len(_WORKFLOWS)
    from costwatch.exporter import FleetCollector

    cold = FleetCollector(url)
    try:
        started = time.perf_counter()
        list(cold.collect())
        read_s = time.perf_counter() - started
    finally:
        cold.close()
    port = _free_port()
    # `costwatch serve` in a process of its own, as it runs: the scrapers' threads here do not
    # compete with it for the GIL.
    server = subprocess.Popen(
        [sys.executable, "-c", _SERVE, "serve", "--db", url, "--port", str(port)],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        metrics_url = f"http://127.0.0.1:{port}/metrics"
        _wait_until_serving(metrics_url, server)  # and the first answer rendered: a running exporter
        latencies: list[float] = []
        lock = threading.Lock()

        def scraper(phase: float) -> None:
            # One scrape a second each, so ``scrapers`` scrapes per second in all, spread out.
            mine = []
            next_at = time.monotonic() + phase
            for _ in range(scrapes):
                time.sleep(max(0.0, next_at - time.monotonic()))
                mine.append(_scrape(metrics_url))
                next_at += 1.0
            with lock:
                latencies.extend(mine)

        threads = [threading.Thread(target=scraper, args=(n / scrapers,)) for n in range(scrapers)]
        wall = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - wall
    finally:
        server.terminate()
        server.wait(30)
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, math.ceil(0.99 * len(latencies)) - 1)]
    return [
        Measurement(
            benchmark="scrape load",
            case=f"{make_url(url).get_backend_name()}, {attempts:,} attempts, "
            f"{pairs:,} model/workflow pairs, {scrapers} scrapers at 1/s each",
            metric="scrape latency p99",
            value=p99 * 1e3,
            unit="ms",
            target=f"< {SCRAPE_TARGET_S * 1e3:g} ms",
            met=p99 < SCRAPE_TARGET_S,
            detail={
                "p50_ms": statistics.median(latencies) * 1e3,
                "max_ms": latencies[-1] * 1e3,
                "scrapes": len(latencies),
                "scrapes_per_s": len(latencies) / wall,
                "uncached_read_ms": read_s * 1e3,
                "fill_s": fill_s,
            },
        )
    ]
