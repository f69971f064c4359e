"""9. PostgreSQL at retention scale: sustained writes, a scrape and a report, and pruning a month.

A throwaway PostgreSQL database is filled with the store benchmark's synthetic attempts spread over
the last ``days`` days (60: two months), with a day partition for each of those days as a store
running that long has made them. The first day is written through the store's own write path
(``SqlStore.export``, batches of ``COSTWATCH_BATCH_SIZE`` as the pipeline sends them); the days up
to the last tenth are copies of it made in SQL (:mod:`bulk_fill`: not the writer, but the store the
writer makes of those copies), or with ``fill="writer"`` written through the writer too; the last
tenth of the days is written through the writer, in order, 100,000 attempts made and written at a
time. Rows:

* writer throughput on the first day (an empty store) and on the last tenth (sustained: on top of
  nearly the whole store), and the copies' rate (no target: not the writer);
* a fleet-exporter scrape (first of a process, and later ones) and ``costwatch report --by model``
  at that size, and the 99th percentile of a scrape's latency with ``scrapers`` concurrent scrapers
  (50: the scrape-load benchmark's, row 8) scraping ``costwatch serve`` once a second each;
* ``SqlStore.prune_before`` at a day boundary ``days/2`` days after the first attempt: a month of
  day partitions detached (target < 1 s), ``SqlStore.drop_pruned`` after it (the detached days
  dropped, their disk given back: no target), then half a day more (the rows of the day the cutoff
  falls in deleted: no target, for scale); and, for each, the longest a second store writing
  batches of 10 new attempts meanwhile waited for one batch (what their locks cost the writers).

The issue's size is 10M attempts (``python benchmarks/run.py --only retention --retention-attempts
10000000``, ~10 GB of disk); a full run does 2M.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta, timezone

from bulk_fill import copy_day, replicated
from measure import Measurement
from scrape_load import scrape_load_rows
from store_scale import (
    DEFAULT_POSTGRES_URL,
    PIPELINE_BATCH,
    REPORT_TARGET_S,
    SCRAPE_TARGET_S,
    WRITE_TARGETS,
    _postgres_url,
    _report_s,
    _scrape_s,
    synthetic_attempts,
)

from costwatch.pricing import load_prices
from costwatch.records import AttemptRecord
from costwatch.store import SqlStore
from costwatch.store.partitions import ensure_day_partitions

__all__ = ["PRUNE_TARGET_S", "measure_retention"]

PRUNE_TARGET_S = 1.0
"""Pruning a month of attempts (dropping its day partitions) must take less than this."""

_CHUNK = 100_000
_WRITER_BATCH = 10


@contextlib.contextmanager
def _writing_beside(url: str, records: Sequence[AttemptRecord]) -> Iterator[list[float]]:
    """A second store writing ``records`` in small batches, as a running service would, while the
    block runs; yields the seconds of each batch that ended after the block began (filled on exit)."""
    writer = SqlStore(url)
    writer.export(list(records[:_WRITER_BATCH]))  # connected and its partitions checked before
    stop, began, waits = threading.Event(), threading.Event(), []

    def write() -> None:
        for start in range(_WRITER_BATCH, len(records), _WRITER_BATCH):
            if stop.is_set():
                return
            started = time.perf_counter()
            writer.export(list(records[start : start + _WRITER_BATCH]))
            if began.is_set():
                waits.append(time.perf_counter() - started)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    time.sleep(0.2)
    began.set()
    try:
        yield waits
        time.sleep(0.1)  # the batch the prune held up, if any, ends
    finally:
        stop.set()
        thread.join()
        writer.shutdown()


def measure_retention(
    attempts: int,
    *,
    read_repeats: int,
    scrapers: int = 50,
    scrapes: int = 10,
    days: int = 60,
    postgres_url: str | None = DEFAULT_POSTGRES_URL,
    seed: int = 9,
    fill: str = "bulk",
    log: Callable[[str], None] | None = None,
) -> list[Measurement]:
    """The rows above for a store of ``attempts`` over ``days`` days (a "skipped" row without PostgreSQL).

    ``log``, if given, gets a progress line after each 100,000 attempts written (a long run can be
    read while it runs: how far it got, its rates, the machine's load)."""
    try:
        database = _postgres_url(postgres_url or "")
        url = database.__enter__()
    except Exception as exc:  # no server here: say so in the table rather than fail
        return [
            Measurement(
                benchmark="retention",
                case=f"postgresql skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}",
                metric="skipped",
                value=0.0,
                unit="",
            )
        ]
    try:
        return _measure(
            url,
            attempts,
            read_repeats=read_repeats,
            scrapers=scrapers,
            scrapes=scrapes,
            days=days,
            seed=seed,
            fill=fill,
            log=log,
        )
    finally:
        database.__exit__(None, None, None)


def _write(store: SqlStore, records: Sequence[AttemptRecord]) -> float:
    """Seconds to write ``records`` through the store's writer, in the pipeline's batches."""
    started = time.perf_counter()
    for start in range(0, len(records), PIPELINE_BATCH):
        store.export(records[start : start + PIPELINE_BATCH])
    return time.perf_counter() - started


def _fill(
    store: SqlStore,
    attempts: int,
    *,
    days: int,
    first: datetime,
    now: datetime,
    seed: int,
    fill: str,
    log: Callable[[str], None] | None,
) -> tuple[int, float, list[Measurement]]:
    """Fill the store with ~``attempts`` from ``first`` to ``now``; returns how many, the seconds
    and the rows.

    The first day is written through the writer; the days up to the last tenth are copies of it
    (``fill="bulk"``: copied in SQL by :mod:`bulk_fill`; ``"writer"``: the same copies written
    through the writer, for comparing the two); the last tenth of the days (at least one) is written
    through the writer on top of them, 100,000 attempts at a time: the sustained rate.
    """
    prices = load_prices()
    copied_days = days - max(1, days // 10)  # the template day and its copies
    per_day = max(1, round(attempts / ((now - first) / timedelta(days=1))))
    template = synthetic_attempts(
        per_day, seed=seed, start=first, end=first + timedelta(days=1, minutes=-1), prices=prices
    )
    template_s = _write(store, template)
    if fill == "bulk":
        started = time.perf_counter()
        copied = copy_day(store.engine, first.date(), copied_days - 1, log=log)
        copies_s = time.perf_counter() - started
    else:
        copied, copies_s = 0, 0.0
        for days_later in range(1, copied_days):
            copies = [replicated(record, days_later) for record in template]
            copies_s += _write(store, copies)
            copied += len(copies)
    written = len(template) + copied
    if log is not None:
        log(f"  {written:,} attempts stored for days 1-{copied_days} (load average {_load_average()})")
    start = first + timedelta(days=copied_days)
    later = max(1, attempts - written)
    chunks = max(1, round(later / _CHUNK))
    sustained, sustained_s = 0, 0.0
    for chunk in range(chunks):
        records = synthetic_attempts(
            later // chunks,
            seed=seed + 1 + chunk,
            start=start + (now - start) * chunk / chunks,
            end=start + (now - start) * (chunk + 1) / chunks - timedelta(minutes=1),
            prices=prices,
        )
        seconds = _write(store, records)
        sustained, sustained_s = sustained + len(records), sustained_s + seconds
        if log is not None:
            log(
                f"  {written + sustained:,} of ~{attempts:,} stored, {len(records) / seconds:,.0f}/s "
                f"for the last {len(records):,} (the writer; load average {_load_average()})"
            )
    target = WRITE_TARGETS["postgresql"]
    batches = f"batches of {PIPELINE_BATCH}, day partitions"
    how = "copied in SQL (bulk_fill.py, not the writer)" if fill == "bulk" else "written again by the writer"
    rows = [
        Measurement(
            benchmark="retention",
            case=f"postgresql, writer: day 1 of {days}, empty store ({len(template):,} attempts), {batches}",
            metric="writer throughput",
            value=len(template) / template_s,
            unit="attempts/s",
            target=f">= {target:,.0f}/s",
            met=len(template) / template_s >= target,
            detail={"attempts": len(template), "seconds": template_s},
        ),
        Measurement(
            benchmark="retention",
            case=f"postgresql, days 2-{copied_days}: day 1's attempts and rollups {how} ({copied:,})",
            metric="fill throughput" if fill == "bulk" else "writer throughput",
            value=copied / copies_s if copies_s else 0.0,
            unit="attempts/s",
            detail={"attempts": copied, "seconds": copies_s, "fill": fill},
        ),
        Measurement(
            benchmark="retention",
            case=(
                f"postgresql, writer: days {copied_days + 1}-{days} ({sustained:,} attempts) on top of "
                f"{written:,} stored (sustained), {batches}"
            ),
            metric="writer throughput",
            value=sustained / sustained_s,
            unit="attempts/s",
            target=f">= {target:,.0f}/s",
            met=sustained / sustained_s >= target,
            detail={"attempts": sustained, "seconds": sustained_s, "stored_before": written},
        ),
    ]
    return written + sustained, template_s + copies_s + sustained_s, rows


def _pruned_rows(what: str, waits: list[float]) -> list[Measurement]:
    return [
        Measurement(
            benchmark="retention",
            case=f"postgresql, a writer's longest batch ({_WRITER_BATCH} attempts) during the {what}",
            metric="writer wait",
            value=max(waits, default=0.0) * 1000,
            unit="ms",
            detail={"batches": len(waits), "median_ms": statistics.median(waits) * 1000 if waits else 0.0},
        )
    ]


def _load_average() -> str:
    try:
        with open("/proc/loadavg") as file:
            return " ".join(file.read().split()[:3])
    except OSError:
        return "unknown"


def _measure(
    url: str,
    attempts: int,
    *,
    read_repeats: int,
    scrapers: int,
    scrapes: int,
    days: int,
    seed: int,
    fill: str,
    log: Callable[[str], None] | None,
) -> list[Measurement]:
    store = SqlStore(url)
    now = datetime.now(timezone.utc)
    first = (now - timedelta(days=days)).replace(hour=0, minute=0, second=0, microsecond=0)
    try:
        store.attempt_count()  # migrated before any write is timed
        with store.engine.begin() as connection:
            ensure_day_partitions(connection, first.date(), now.date())
        written, fill_s, rows = _fill(
            store, attempts, days=days, first=first, now=now, seed=seed, fill=fill, log=log
        )
        cold_s, warm_s = _scrape_s(url, read_repeats)
        for name, seconds, target_s in (
            ("fleet exporter scrape, first of a process (cold)", cold_s, SCRAPE_TARGET_S),
            ("fleet exporter scrape, later ones (warm)", warm_s, SCRAPE_TARGET_S),
            ("costwatch report --by model", _report_s(url, read_repeats), REPORT_TARGET_S),
        ):
            rows.append(
                Measurement(
                    benchmark="retention",
                    case=f"postgresql, {name}, {written:,} attempts stored",
                    metric="median time",
                    value=seconds * 1000,
                    unit="ms",
                    target=f"< {target_s * 1000:g} ms",
                    met=seconds < target_s,
                    detail={"attempts": written, "repeats": read_repeats},
                )
            )
        rows += [
            dataclasses.replace(row, benchmark="retention")
            for row in scrape_load_rows(url, written, scrapers=scrapers, scrapes=scrapes, fill_s=fill_s)
        ]
        month_end = first + timedelta(days=days // 2)
        fresh = synthetic_attempts(
            20_000, seed=seed - 1, start=now - timedelta(hours=1), end=now, prices=load_prices()
        )
        for name, cutoff, target_s in (
            (f"{days // 2} days (whole day partitions detached)", month_end, PRUNE_TARGET_S),
            ("half a day more (the cutoff's day: rows deleted)", month_end + timedelta(hours=12), None),
        ):
            with _writing_beside(url, fresh) as waits:
                started = time.perf_counter()
                removed = store.prune_before(cutoff)
                seconds = time.perf_counter() - started
            rows += _pruned_rows(f"prune {name}", waits)
            rows.append(
                Measurement(
                    benchmark="retention",
                    case=f"postgresql, prune {name}, of {written:,} attempts",
                    metric="prune time",
                    value=seconds * 1000,
                    unit="ms",
                    target="" if target_s is None else f"< {target_s * 1000:g} ms",
                    met=None if target_s is None else seconds < target_s,
                    detail={"rows_removed": removed, "rows_per_s": removed / seconds if seconds else 0.0},
                )
            )
            with _writing_beside(url, fresh) as waits:
                started = time.perf_counter()
                freed = store.drop_pruned()
                seconds = time.perf_counter() - started
            if freed:
                rows += _pruned_rows(f"drop_pruned after the prune of {name}", waits)
                rows.append(
                    Measurement(
                        benchmark="retention",
                        case=f"postgresql, drop_pruned: the detached days dropped, {freed / 1e6:,.0f} MB",
                        metric="drop time",
                        value=seconds * 1000,
                        unit="ms",
                        detail={"bytes": freed},
                    )
                )
    finally:
        store.shutdown()
    return rows
