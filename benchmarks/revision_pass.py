"""What a ``flush()`` costs the writer while N estimated attempts sit in the revision window.

An application that flushes often (after each job, say) also calibrates between flushes: every
completed stream it measures is a calibration sample, which moves the estimator a little. Before
issue 20 (c), any such change made the next revision pass read the whole window (every estimated
attempt of the last 24 h) at every flush; now a pass reads the estimates stored since the last one,
and the window again only for a model whose calibration moved by more than ``RECHECK_SHARE``.

Set-up per backend and size: a SQL store with N estimated attempts started in the last hour, none of
which the calibration would revise (the steady state), a pipeline with the store and an
:class:`~costwatch.revise.EstimateRevision` over it, and one pass already made. Each round then, in
alternating order:

* **before**: what every such flush did before issue 20 (c): the whole window read again, each page
  by the store's query of then (every estimate of the window past the page's start joined to its
  attempt, then the first ``batch_size`` taken: each page cost the whole window);
* **whole window**: the same pass with today's page query (the page's sample ids first, then their
  attempts), as a pass still reads the window after a material calibration change;
* **what changed** (now): one calibration sample that moves the factor by well under
  ``RECHECK_SHARE``, as a completed stream does in a calibrated process, then a flush.

All are timed around ``Pipeline.flush()`` (wall, and this process's CPU, the writer thread
included). The rows give each variant's median, with the estimates each read, and the paired
ratios of today's flush to the two others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
from collections.abc import Collection, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from tempfile import TemporaryDirectory
from types import MappingProxyType
from typing import Any

import sqlalchemy as sa
from measure import Measurement, Timing, alternating_runs, median_ratio, timed
from store_scale import _postgres_url, _sqlite_url

from costwatch.estimation import OutputEstimator
from costwatch.pipeline import Pipeline
from costwatch.pricing import load_prices
from costwatch.records import AttemptRecord, Outcome, Usage, WasteReason, new_id
from costwatch.revise import EstimateRevision
from costwatch.spool import Spool
from costwatch.store import SqlStore
from costwatch.store.rows import record_from_row
from costwatch.store.schema import ATTEMPTS, CALIBRATION_SAMPLES

__all__ = ["measure_revision_pass"]

_MODELS = ("claude-sonnet-4-6", "claude-haiku-4-5", "claude-opus-4-6")
_CHARS = {"text": 3_500}
_WRITE_BATCH = 5_000


class _QueryOfBefore:
    """The store's page query before issue 20 (c), for the **before** variant: one statement that
    joins every estimate of the window past ``after`` to its attempt, sorts, and takes a page."""

    def __init__(self, store: SqlStore) -> None:
        self.store = store

    def estimated_attempts(
        self,
        *,
        since: datetime,
        after: int = 0,
        limit: int = 500,
        until: int | None = None,
        models: Collection[str] | None = None,
    ) -> list[tuple[int, AttemptRecord]]:
        assert until is None and models is None, "the pass of before read the whole window"
        table = CALIBRATION_SAMPLES
        query = (
            sa.select(table.c.sample_id, table.c.chars, ATTEMPTS)
            .join(
                ATTEMPTS,
                sa.and_(
                    ATTEMPTS.c.attempt_id == table.c.attempt_id, ATTEMPTS.c.started_at == table.c.started_at
                ),
            )
            .where(
                table.c.output_tokens.is_(None),
                table.c.started_at >= since,
                ATTEMPTS.c.started_at >= since,
                table.c.sample_id > after,
                ATTEMPTS.c.output_estimated.is_(True),
            )
            .order_by(table.c.sample_id)
            .limit(limit)
        )
        with self.store.engine.connect() as connection:
            return [
                (
                    int(row["sample_id"]),
                    dataclasses.replace(
                        record_from_row(row), output_chars=MappingProxyType(_chars(row["chars"]))
                    ),
                )
                for row in connection.execute(query).mappings()
            ]


def _chars(value: Any) -> dict[str, int]:
    return {str(k): int(v) for k, v in dict(value).items()}


def _calibrated() -> OutputEstimator:
    """A calibrated estimator (20 samples a model at the defaults' ratio): it predicts 1,000 tokens."""
    estimator = OutputEstimator()
    for model in _MODELS:
        for _ in range(20):
            estimator.observe(model, _CHARS, 1_000)
    return estimator


def _estimated(n: int, estimator: OutputEstimator) -> Iterator[AttemptRecord]:
    prices = load_prices()
    now = datetime.now(timezone.utc)
    for i in range(n):
        model = _MODELS[i % len(_MODELS)]
        estimate = estimator.estimate(model, _CHARS)
        record = AttemptRecord(
            attempt_id=new_id(),
            logical_request_id=new_id(),
            attempt_number=1,
            started_at=now - timedelta(seconds=3_600 * i / max(n, 1)),
            outcome=Outcome.DROPPED,
            model_requested=model,
            model=model,
            stream=True,
            usage=Usage(
                input_tokens=2_000,
                output_tokens=estimate,
                output_estimated=True,
                estimated_output_tokens=estimate,
            ),
            wasted=True,
            waste_reason=WasteReason.ABANDONED,
            output_chars=_CHARS,
        )
        yield dataclasses.replace(record, cost=prices.cost_of(record))


def _fill(url: str, n: int, estimator: OutputEstimator) -> AttemptRecord:
    """Store ``n - 1`` estimated attempts; the last one, for the pipeline to deliver (and so start)."""
    store = SqlStore(url)
    records = _estimated(n, estimator)
    last = next(records)
    try:
        batch: list[AttemptRecord] = []
        for record in records:
            batch.append(record)
            if len(batch) == _WRITE_BATCH:
                store.write(batch)
                batch = []
        if batch:
            store.write(batch)
    finally:
        store.shutdown()
    return last


def _backend_rows(backend: str, url: str, n: int, repeats: int) -> list[Measurement]:
    estimator = _calibrated()
    last = _fill(url, n, estimator)
    store = SqlStore(url)
    revision = EstimateRevision(store, estimator, load_prices(), window_s=86_400, refresh_s=300)
    reads: dict[str, list[int]] = {"before": [], "whole window": [], "what changed": []}
    query_of_before = _QueryOfBefore(store)
    with TemporaryDirectory(prefix="costwatch-bench-") as spool:
        pipeline = Pipeline(spool=Spool(Path(spool)))
        pipeline.add_sink(store)
        pipeline.add_sink(revision)
        try:
            pipeline.submit(last)  # an application's pipeline has a writer thread: it starts it
            pipeline.flush(600)  # the first pass: reads the window once, revises nothing

            def flush(name: str) -> Timing:
                before = revision.rows_read
                timing = timed(lambda: pipeline.flush(600))
                reads[name].append(revision.rows_read - before)
                return timing

            def forget() -> None:
                # What a pass did before after any calibration change: nothing of what it read counts.
                revision._changes = None
                revision._cursor = 0
                revision._checked.clear()

            def before() -> Timing:
                forget()
                revision.source = query_of_before
                try:
                    return flush("before")
                finally:
                    revision.source = store

            def whole_window() -> Timing:
                forget()
                return flush("whole window")

            def what_changed() -> Timing:
                estimator.observe(_MODELS[0], _CHARS, 1_010)  # moves the factor by ~0.1%
                return flush("what changed")

            timings = alternating_runs(
                {"before": before, "whole window": whole_window, "what changed": what_changed}, repeats
            )
        finally:
            pipeline.shutdown()
    assert revision.revised == 0, "the steady state revises nothing"
    case = f"{backend}, {n:,} estimated attempts in the window"
    rows = []
    for name, runs in timings.items():
        rows.append(
            Measurement(
                benchmark="revision pass",
                case=f"{case}, {name}",
                metric="flush() wall time",
                value=statistics.median(t.wall_s for t in runs) * 1_000,
                unit="ms",
                detail={
                    "wall_ms": [t.wall_s * 1_000 for t in runs],
                    "cpu_ms": [t.cpu_s * 1_000 for t in runs],
                    "estimates_read_per_flush": reads[name],
                },
            )
        )
    now = timings["what changed"]
    for other in ("before", "whole window"):
        rows.append(
            Measurement(
                benchmark="revision pass",
                case=case,
                metric=f"flush() wall, what changed vs {other}",
                value=median_ratio([t.wall_s for t in now], [t.wall_s for t in timings[other]]),
                unit="ratio",
                detail={"cpu_ratio": median_ratio([t.cpu_s for t in now], [t.cpu_s for t in timings[other]])},
            )
        )
    return rows


def measure_revision_pass(
    sizes: Sequence[int], *, repeats: int, postgres_url: str | None
) -> list[Measurement]:
    """Per backend and size: ``flush()`` with a whole-window pass, with today's pass, and their ratio."""
    rows: list[Measurement] = []
    backends: list[tuple[str, contextlib.AbstractContextManager[str]]] = []
    for n in sizes:
        backends = [("sqlite", _sqlite_url())]
        if postgres_url:
            backends.append(("postgresql", _postgres_url(postgres_url)))
        for backend, database in backends:
            with database as url:
                rows.extend(_backend_rows(backend, url, n, repeats))
    return rows
