"""The fleet exporter: the metrics of every process that writes to one store, read from its rollups.

A Prometheus collector that, at each scrape, sums the store's hourly rollups and exposes the same
metric names as the in-process :class:`~costwatch.metrics.MetricsSink`, so that one exporter over
PostgreSQL shows the whole fleet. Counters must never go backwards, even across exporter restarts
and although an ``abandoned`` attempt in the rollups may later flip to ``retried``:

* everything but ``abandoned`` waste is summed over all rollup hours (a flip moves tokens between
  waste reasons of the same hour, never out of the billed totals);
* ``retried`` waste is summed over all hours, as flips only ever add to it;
* ``abandoned`` waste, and failed logical requests, are summed only over *settled* hours: hours
  that ended at least the retry window ago, after which the store no longer flips their attempts.

A failing query gives a scrape with ``costwatch_up 0`` and the last good values (or none), never an
error. See ``docs/metrics.md``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .metrics import MODEL_LABEL_LIMIT, LabelCap
from .records import Outcome, TokenType, WasteReason
from .settings import default_of, load_settings
from .store import HourlyRollup, RollupTotals, SqlStore, safe_url
from .store.database import READ_ONLY_OPTION
from .store.rows import hour_of

__all__ = ["FleetCollector", "FleetSamples", "fleet_samples", "serve", "settled_before"]

log = logging.getLogger("costwatch")

_DIMENSIONS = ("model", "outcome", "error_type", "waste_reason", "workflow")
_ROLLUPS = HourlyRollup.__table__

Labels = tuple[str, ...]


def settled_before(now: datetime, retry_window: timedelta) -> datetime:
    """The first unsettled hour: every rollup hour before it ended at least ``retry_window`` ago."""
    return hour_of(now - retry_window)


@dataclass
class FleetSamples:
    """The exporter's metric values, by metric name and label values (pure data)."""

    counters: dict[str, dict[Labels, float]] = field(default_factory=dict)
    histograms: dict[str, dict[Labels, tuple[float, float]]] = field(default_factory=dict)
    """Histograms with only the ``+Inf`` bucket: label values -> (count, sum)."""

    def add(self, name: str, labels: Labels, value: float) -> None:
        """Add ``value`` to a counter sample."""
        samples = self.counters.setdefault(name, {})
        samples[labels] = samples.get(labels, 0.0) + value

    def observe(self, name: str, labels: Labels, count: float, total: float) -> None:
        """Add ``count`` observations summing to ``total`` to a histogram sample."""
        samples = self.histograms.setdefault(name, {})
        before = samples.get(labels, (0.0, 0.0))
        samples[labels] = (before[0] + count, before[1] + total)

    def at_least(self, floor: FleetSamples) -> FleetSamples:
        """These values, each raised to at least its value in ``floor``; series missing here are kept."""
        out = FleetSamples()
        for name in {*self.counters, *floor.counters}:
            mine, old = self.counters.get(name, {}), floor.counters.get(name, {})
            out.counters[name] = {k: max(mine.get(k, 0.0), old.get(k, 0.0)) for k in {*mine, *old}}
        for name in {*self.histograms, *floor.histograms}:
            mine_h, old_h = self.histograms.get(name, {}), floor.histograms.get(name, {})
            out.histograms[name] = {
                k: (
                    max(mine_h.get(k, (0.0, 0.0))[0], old_h.get(k, (0.0, 0.0))[0]),
                    max(mine_h.get(k, (0.0, 0.0))[1], old_h.get(k, (0.0, 0.0))[1]),
                )
                for k in {*mine_h, *old_h}
            }
        return out


def fleet_samples(
    totals: Iterable[RollupTotals],
    settled_abandoned: Iterable[RollupTotals],
    *,
    models_first_seen: Sequence[str],
    workflows_first_seen: Sequence[str],
    model_label_limit: int = MODEL_LABEL_LIMIT,
    workflow_label_limit: int = default_of("workflow_label_limit"),
) -> FleetSamples:
    """The metric values from rollup totals grouped by model, outcome, error_type, waste_reason, workflow.

    ``totals`` covers every hour; ``settled_abandoned`` only the ``abandoned`` rows of settled hours.
    Label caps keep the first values by the hour they first appeared in (then by name), so that two
    exporters, or one restarted, choose the same ones.
    """
    model_of = LabelCap.first_seen(models_first_seen, model_label_limit)
    workflow_of = LabelCap.first_seen(workflows_first_seen, workflow_label_limit)
    out = FleetSamples()
    for row in totals:
        model, workflow = model_of(row.group["model"]), workflow_of(row.group["workflow"])
        outcome = row.group["outcome"]
        out.add("costwatch_attempts", (model, outcome, row.group["error_type"]), row.attempts)
        for token_type in TokenType:
            out.add(
                "costwatch_billed_tokens",
                (model, token_type.value),
                getattr(row, f"billed_{token_type.value}_tokens"),
            )
        out.add("costwatch_billed_cost_usd", (model, workflow), row.billed_cost_usd)
        out.add("costwatch_estimated_output_tokens", (model,), row.estimated_output_tokens)
        out.observe("costwatch_attempt_duration_seconds", (model, outcome), row.attempts, row.duration_s)
        if outcome == Outcome.DROPPED.value:
            out.observe("costwatch_time_to_drop_seconds", (model,), row.attempts, row.duration_s)
        if outcome == Outcome.COMPLETED.value:
            out.add("costwatch_logical_requests", (model, "succeeded"), row.attempts)
        if row.group["waste_reason"] == WasteReason.RETRIED.value:
            _add_waste(out, row, model, workflow, WasteReason.RETRIED)
    for row in settled_abandoned:
        model, workflow = model_of(row.group["model"]), workflow_of(row.group["workflow"])
        _add_waste(out, row, model, workflow, WasteReason.ABANDONED)
        # Each abandoned attempt is the last attempt of a logical request that failed.
        out.add("costwatch_logical_requests", (model, "failed"), row.attempts)
    return out


def _add_waste(out: FleetSamples, row: RollupTotals, model: str, workflow: str, reason: WasteReason) -> None:
    for token_type in TokenType:
        out.add(
            "costwatch_wasted_tokens",
            (model, token_type.value, reason.value, workflow),
            getattr(row, f"wasted_{token_type.value}_tokens"),
        )
    out.add("costwatch_wasted_cost_usd", (model, reason.value, workflow), row.wasted_cost_usd)


_COUNTERS: Mapping[str, tuple[str, Labels]] = {
    "costwatch_attempts": ("HTTP attempts to the Messages API.", ("model", "outcome", "error_type")),
    "costwatch_billed_tokens": ("Tokens billed, by token type.", ("model", "token_type")),
    "costwatch_wasted_tokens": (
        "Billed tokens of failed attempts; abandoned only from settled hours.",
        ("model", "token_type", "reason", "workflow"),
    ),
    "costwatch_billed_cost_usd": ("Cost of billed tokens in US dollars.", ("model", "workflow")),
    "costwatch_wasted_cost_usd": (
        "Cost of wasted tokens in US dollars; abandoned only from settled hours.",
        ("model", "reason", "workflow"),
    ),
    "costwatch_estimated_output_tokens": (
        "Output tokens estimated from the text received before a stream was cut.",
        ("model",),
    ),
    "costwatch_logical_requests": (
        "Logical requests by result: completed attempts, and abandoned attempts of settled hours.",
        ("model", "result"),
    ),
}
_HISTOGRAMS: Mapping[str, tuple[str, Labels]] = {
    "costwatch_attempt_duration_seconds": (
        "How long attempts took (count and sum only).",
        ("model", "outcome"),
    ),
    "costwatch_time_to_drop_seconds": ("How long dropped attempts ran (count and sum only).", ("model",)),
}


def _families(samples: FleetSamples, up: bool) -> list[Metric]:
    families: list[Metric] = [
        GaugeMetricFamily(
            "costwatch_up", "Whether the last read of the store worked.", value=1.0 if up else 0.0
        )
    ]
    for name, (doc, labels) in _COUNTERS.items():
        counter = CounterMetricFamily(name, doc, labels=list(labels))
        for values, value in sorted(samples.counters.get(name, {}).items()):
            counter.add_metric(list(values), value)
        families.append(counter)
    for name, (doc, labels) in _HISTOGRAMS.items():
        histogram = HistogramMetricFamily(name, doc, labels=list(labels))
        for values, (count, total) in sorted(samples.histograms.get(name, {}).items()):
            histogram.add_metric(list(values), buckets=[("+Inf", count)], sum_value=total)
        families.append(histogram)
    return families


class FleetCollector(Collector):
    """Reads the store's rollups at scrape time and exposes them as costwatch's metrics.

    ``database_url`` defaults to ``$COSTWATCH_DATABASE_URL``. The exporter only reads: it never
    migrates or writes. ``retry_window`` must be at least the store's (how long after an attempt
    the store may still flip it to ``retried``). ``retry_window``, ``workflow_label_limit`` and
    ``model_label_limit`` default to their ``COSTWATCH_*`` settings. ``clock`` gives the current UTC
    time. :meth:`close` releases the database connections.
    """

    def __init__(
        self,
        database_url: str | None = None,
        *,
        retry_window: timedelta | None = None,
        workflow_label_limit: int | None = None,
        model_label_limit: int | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ) -> None:
        settings = load_settings()
        if retry_window is None:
            retry_window = timedelta(seconds=settings.retry_window_s)
        if workflow_label_limit is None:
            workflow_label_limit = int(settings.workflow_label_limit)
        if model_label_limit is None:
            model_label_limit = int(settings.model_label_limit)
        self.store = SqlStore(database_url, auto_migrate=False, retry_window=retry_window)
        self.retry_window = retry_window
        self.workflow_label_limit = workflow_label_limit
        self.model_label_limit = model_label_limit
        self._clock = clock
        self._lock = threading.Lock()
        self._last: FleetSamples | None = None
        self._failing = False

    def describe(self) -> Iterator[Metric]:
        """The metric families this collector exposes, without reading the database."""
        # Registering must not touch the database.
        return iter(_families(FleetSamples(), up=True))

    def collect(self) -> Iterator[Metric]:
        """The fleet's metrics read now; after a failed read, ``costwatch_up 0`` and the last values."""
        with self._lock:
            try:
                samples = self.read()
            except Exception as exc:
                if not self._failing:
                    log.warning(
                        "costwatch exporter: reading %s failed (%s: %s); reporting costwatch_up 0",
                        safe_url(self.store.url),
                        type(exc).__name__,
                        str(exc).splitlines()[0] if str(exc) else "",
                    )
                self._failing = True
                return iter(_families(self._last or FleetSamples(), up=False))
            if self._failing:
                log.warning("costwatch exporter: reading %s works again", safe_url(self.store.url))
            self._failing = False
            # A flip after the window (rare) would lower a settled sum: hold every sample at its high mark.
            self._last = samples if self._last is None else samples.at_least(self._last)
            return iter(_families(self._last, up=True))

    def close(self) -> None:
        """Close the database connections (a later scrape opens new ones)."""
        self.store.shutdown()

    def read(self) -> FleetSamples:
        """Query the rollups once and compute the metric values; raises if the database fails."""
        boundary = settled_before(self._clock(), self.retry_window)
        totals = self.store.rollup_totals(group_by=_DIMENSIONS)
        abandoned = self.store.rollup_totals(
            end=boundary, group_by=_DIMENSIONS, where={"waste_reason": WasteReason.ABANDONED.value}
        )
        with self.store.engine.connect().execution_options(**{READ_ONLY_OPTION: True}) as connection:
            models = _first_seen(connection, "model")
            workflows = _first_seen(connection, "workflow")
        return fleet_samples(
            totals,
            abandoned,
            models_first_seen=models,
            workflows_first_seen=workflows,
            model_label_limit=self.model_label_limit,
            workflow_label_limit=self.workflow_label_limit,
        )


def _first_seen(connection: sa.Connection, dimension: str) -> list[str]:
    """A dimension's values ordered by the first hour they appear in (then by value)."""
    column = _ROLLUPS.c[dimension]
    first = sa.func.min(_ROLLUPS.c.hour)
    query = sa.select(column).group_by(column).order_by(first, column)
    return [str(value) for value in connection.execute(query).scalars()]


def serve(database_url: str | None, port: int, addr: str = "127.0.0.1", *, block: bool = True) -> Any:
    """Serve the fleet's metrics on ``http://{addr}:{port}/metrics``.

    Blocks until interrupted when ``block`` is true (as the CLI runs it); otherwise returns the
    running HTTP server (call ``shutdown()`` and then ``server_close()`` on it to stop; the latter
    also closes the database connections).
    """
    registry = CollectorRegistry()
    collector = FleetCollector(database_url)
    registry.register(collector)
    try:
        server, thread = start_http_server(port, addr=addr, registry=registry)
    except BaseException:
        collector.close()
        raise
    # Closing the server (as a non-blocking caller does) closes the collector's connections too.
    close_server = server.server_close

    def server_close() -> None:
        close_server()
        collector.close()

    server.server_close = server_close  # type: ignore[method-assign]
    if not block:
        return server
    try:
        while thread.is_alive():
            thread.join(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
    return server
