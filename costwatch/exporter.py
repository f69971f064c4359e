"""The fleet exporter: the metrics of every process that writes to one store, read from its rollups.

A Prometheus collector that, at each scrape, reads the store's all-time rollups (the hourly rollups
summed over every hour, kept by the writer) and the ``abandoned`` rows of the recent hours, and
exposes the same metric names as the in-process :class:`~costwatch.metrics.MetricsSink`, so that
one exporter over PostgreSQL shows the whole fleet. Counters must never go backwards, even across
exporter restarts and although an ``abandoned`` attempt in the rollups may later flip to ``retried``:

* everything but ``abandoned`` waste is summed over all rollup hours (a flip moves tokens between
  waste reasons of the same hour, never out of the billed totals);
* ``retried`` waste is summed over all hours, as flips only ever add to it;
* ``abandoned`` waste, and failed logical requests, are summed only over *settled* hours: hours
  that ended at least the retry window ago, after which the store no longer flips their attempts
  (all-time minus the hours not settled yet).

A failing query gives a scrape with ``costwatch_up 0`` and the last good values (or none), never an
error. See ``docs/metrics.md``.
"""

from __future__ import annotations

import logging
import operator
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from . import metric_names as m
from .metrics import MODEL_LABEL_LIMIT, OTHER, LabelCap, platform_label
from .records import Outcome, OutputSource, TokenType, WasteReason
from .settings import default_of, load_settings
from .store import RollupTotals, SqlStore, safe_url
from .store.database import READ_ONLY_OPTION
from .store.database import database_url as store_database_url
from .store.query import capped_all_time_with_recent_query, kept_labels_query, settled_before
from .store.retention import PruneLockTimeout
from .store.schema import ALL_TIME_DIMENSIONS, RECONCILIATIONS, REJECTED_ATTEMPTS, ROLLUP_MEASURES

__all__ = [
    "PRUNE_AGAIN_S",
    "PRUNE_EVERY_S",
    "RECONCILED_WINDOW",
    "SCRAPE_CACHE_S",
    "FleetCollector",
    "FleetSamples",
    "fleet_samples",
    "reconciliation_gauges",
    "serve",
    "settled_before",
]

log = logging.getLogger("costwatch")

_DIMENSIONS = ALL_TIME_DIMENSIONS
"""The label dimensions of a rollup group, in the order the store's queries give them."""
_LABELS = operator.itemgetter(
    *map(_DIMENSIONS.index, ("model", "outcome", "error_type", "waste_reason", "workflow", "platform"))
)
"""A group's model, outcome, error type, waste reason, workflow and platform, found by name."""
_MODEL, _WASTE_REASON, _WORKFLOW = map(_DIMENSIONS.index, ("model", "waste_reason", "workflow"))

Labels = tuple[str, ...]


@dataclass
class FleetSamples:
    """The exporter's metric values, by metric name and label values (pure data)."""

    counters: dict[str, dict[Labels, float]] = field(default_factory=dict)
    histograms: dict[str, dict[Labels, tuple[float, float]]] = field(default_factory=dict)
    """Histograms with only the ``+Inf`` bucket: label values -> (count, sum)."""
    gauges: dict[str, dict[Labels, float]] = field(default_factory=dict)
    """Values that may go down: the ``abandoned`` waste still pending in unsettled hours."""

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
        # Pending waste falls as hours settle (into the counters above): gauges are never held.
        out.gauges = {name: dict(values) for name, values in self.gauges.items()}
        return out


def fleet_samples(
    totals: Iterable[RollupTotals],
    settled_abandoned: Iterable[RollupTotals],
    *,
    models_first_seen: Sequence[str],
    workflows_first_seen: Sequence[str],
    model_label_limit: int = MODEL_LABEL_LIMIT,
    workflow_label_limit: int = default_of("workflow_label_limit"),
    pending_abandoned: Iterable[RollupTotals] = (),
) -> FleetSamples:
    """The metric values from rollup totals grouped by model, outcome, error_type, waste_reason, workflow,
    platform (``ALL_TIME_DIMENSIONS``).

    ``totals`` covers every hour; ``settled_abandoned`` only the ``abandoned`` rows of settled hours,
    ``pending_abandoned`` those of the hours not settled yet.
    Label caps keep the first values by the hour they first appeared in (then by name), so that two
    exporters, or one restarted, choose the same ones.
    """
    return _samples(
        [_group_of(row) for row in totals],
        [_group_of(row) for row in settled_abandoned],
        model_of=LabelCap.first_seen(models_first_seen, model_label_limit),
        workflow_of=LabelCap.first_seen(workflows_first_seen, workflow_label_limit),
        pending_abandoned=[_group_of(row) for row in pending_abandoned],
    )


_MEASURES = ROLLUP_MEASURES
"""The rollup measures a group's values list: every measure column, in the table's order."""

_TOKEN_TYPES = tuple(token_type.value for token_type in TokenType)
_AT = {name: index for index, name in enumerate(_MEASURES)}
# Where each metric's measures stand among a group's values, looked up by column name.
_ATTEMPTS = _AT["attempts"]
_BILLED = tuple((token_type, _AT[f"billed_{token_type}_tokens"]) for token_type in _TOKEN_TYPES)
_WASTED = tuple((token_type, _AT[f"wasted_{token_type}_tokens"]) for token_type in _TOKEN_TYPES)
_BILLED_COST = _AT["billed_cost_usd"]
_WASTED_COST = _AT["wasted_cost_usd"]
_ESTIMATED = _AT["estimated_output_tokens"]
_DURATION = _AT["duration_s"]
_UNPRICED = _AT["unpriced_attempts"]
_SOURCES = tuple((source.value, _AT[f"{source.value}_output_tokens"]) for source in OutputSource)

Group = tuple[Labels, Sequence[float]]
"""One rollup group: its values of ``_DIMENSIONS`` and its sums of ``_MEASURES``."""


def _group_of(row: RollupTotals) -> Group:
    """The group of a :class:`RollupTotals` grouped by every one of ``ALL_TIME_DIMENSIONS``."""
    return tuple(row.group[name] for name in _DIMENSIONS), [getattr(row, name) for name in _MEASURES]


def _samples(
    totals: Sequence[Group],
    settled_abandoned: Sequence[Group],
    *,
    model_of: Callable[[str], str],
    workflow_of: Callable[[str], str],
    pending_abandoned: Sequence[Group] = (),
) -> FleetSamples:
    """The metric values of :func:`fleet_samples`, from groups as tuples (the exporter's hot path)."""
    attempts: dict[Labels, float] = {}
    billed_tokens: dict[Labels, float] = {}
    billed_cost: dict[Labels, float] = {}
    estimated: dict[Labels, float] = {}
    output_by_source: dict[Labels, float] = {}
    unpriced: dict[Labels, float] = {}
    platform_attempts: dict[Labels, float] = {}
    platform_tokens: dict[Labels, float] = {}
    platform_cost: dict[Labels, float] = {}
    platform_unpriced: dict[Labels, float] = {}
    logical: dict[Labels, float] = {}
    wasted_tokens: dict[Labels, float] = {}
    wasted_cost: dict[Labels, float] = {}
    durations: dict[Labels, tuple[float, float]] = {}
    drops: dict[Labels, tuple[float, float]] = {}
    models: dict[str, str] = {}
    workflows: dict[str, str] = {}

    def add(samples: dict[Labels, float], labels: Labels, value: float) -> None:
        samples[labels] = samples.get(labels, 0.0) + value

    def observe(
        histogram: dict[Labels, tuple[float, float]], labels: Labels, count: float, total: float
    ) -> None:
        before = histogram.get(labels, (0.0, 0.0))
        histogram[labels] = (before[0] + count, before[1] + total)

    def waste(values: Sequence[float], model: str, workflow: str, reason: str) -> None:
        for token_type, index in _WASTED:
            add(wasted_tokens, (model, token_type, reason, workflow), values[index])
        add(wasted_cost, (model, reason, workflow), values[_WASTED_COST])

    def labels_of(raw_model: str, raw_workflow: str) -> tuple[str, str]:
        model, workflow = models.get(raw_model), workflows.get(raw_workflow)
        if model is None:
            model = models[raw_model] = model_of(raw_model)
        if workflow is None:
            workflow = workflows[raw_workflow] = workflow_of(raw_workflow)
        return model, workflow

    # In key order, so that float sums do not depend on the order the database returned the groups in.
    for key, values in sorted(totals):
        raw_model, outcome, error_type, waste_reason, raw_workflow, raw_platform = _LABELS(key)
        model, workflow = labels_of(raw_model, raw_workflow)
        platform = platform_label(raw_platform)
        count = values[_ATTEMPTS]
        add(attempts, (model, outcome, error_type), count)
        add(platform_attempts, (platform, outcome), count)
        for token_type, index in _BILLED:
            add(billed_tokens, (model, token_type), values[index])
            add(platform_tokens, (platform, token_type), values[index])
        add(billed_cost, (model, workflow), values[_BILLED_COST])
        add(platform_cost, (platform,), values[_BILLED_COST])
        add(estimated, (model,), values[_ESTIMATED])
        for source, index in _SOURCES:
            if values[index]:
                add(output_by_source, (model, source), values[index])
        if values[_UNPRICED]:
            add(unpriced, (model,), values[_UNPRICED])
            add(platform_unpriced, (platform,), values[_UNPRICED])
        observe(durations, (model, outcome), count, values[_DURATION])
        if outcome == Outcome.DROPPED.value:
            observe(drops, (model,), count, values[_DURATION])
        if outcome == Outcome.COMPLETED.value:
            add(logical, (model, "succeeded"), count)
        # Retried and cancelled waste is final when written, unlike abandoned.
        if waste_reason in (WasteReason.RETRIED.value, WasteReason.CANCELLED.value):
            waste(values, model, workflow, waste_reason)
    for key, values in sorted(settled_abandoned):
        model, workflow = labels_of(key[_MODEL], key[_WORKFLOW])
        waste(values, model, workflow, WasteReason.ABANDONED.value)
        # Each abandoned attempt is the last attempt of a logical request that failed.
        add(logical, (model, "failed"), values[_ATTEMPTS])
    pending_attempts: dict[Labels, float] = {}
    pending_cost: dict[Labels, float] = {}
    for key, values in sorted(pending_abandoned):
        model, _workflow = labels_of(key[_MODEL], key[_WORKFLOW])
        add(pending_attempts, (model,), values[_ATTEMPTS])
        add(pending_cost, (model,), values[_WASTED_COST])
    counters = {
        m.ATTEMPTS.name: attempts,
        m.BILLED_TOKENS.name: billed_tokens,
        m.BILLED_COST.name: billed_cost,
        m.ESTIMATED_OUTPUT_TOKENS.name: estimated,
        m.OUTPUT_TOKENS.name: output_by_source,
        m.UNPRICED_ATTEMPTS.name: unpriced,
        m.PLATFORM_ATTEMPTS.name: platform_attempts,
        m.PLATFORM_BILLED_TOKENS.name: platform_tokens,
        m.PLATFORM_BILLED_COST.name: platform_cost,
        m.PLATFORM_UNPRICED_ATTEMPTS.name: platform_unpriced,
        m.LOGICAL_REQUESTS.name: logical,
        m.WASTED_TOKENS.name: wasted_tokens,
        m.WASTED_COST.name: wasted_cost,
    }
    histograms = {m.ATTEMPT_DURATION.name: durations, m.TIME_TO_DROP.name: drops}
    return FleetSamples(
        counters={name: values for name, values in counters.items() if values},
        histograms={name: values for name, values in histograms.items() if values},
        gauges={
            m.PENDING_ABANDONED_ATTEMPTS.name: pending_attempts,
            m.PENDING_ABANDONED_COST.name: pending_cost,
        },
    )


_COUNTERS = (
    m.ATTEMPTS,
    m.BILLED_TOKENS,
    m.WASTED_TOKENS,
    m.BILLED_COST,
    m.WASTED_COST,
    m.ESTIMATED_OUTPUT_TOKENS,
    m.OUTPUT_TOKENS,
    m.UNPRICED_ATTEMPTS,
    m.PLATFORM_ATTEMPTS,
    m.PLATFORM_BILLED_TOKENS,
    m.PLATFORM_BILLED_COST,
    m.PLATFORM_UNPRICED_ATTEMPTS,
    m.LOGICAL_REQUESTS,
    # The in-process counter: the fleet alert on refused records sees the exporter's series too.
    m.STORE_REJECTED_RECORDS,
)
_GAUGES = (
    m.PENDING_ABANDONED_ATTEMPTS,
    m.PENDING_ABANDONED_COST,
    m.RECONCILED_COVERAGE,
    m.UNSEEN_COST,
    m.LAST_RECONCILIATION,
    m.RECONCILED_DROPPED_OUTPUT,
    m.RECONCILED_WASTED_COST,
)
RECONCILED_WINDOW = timedelta(hours=24)
"""How far back the reconciliation gauges look (by bucket start)."""
_HISTOGRAMS = (m.ATTEMPT_DURATION, m.TIME_TO_DROP)
"""Served with only the ``+Inf`` bucket: count and sum."""


def _families(samples: FleetSamples, up: bool) -> list[Metric]:
    families: list[Metric] = [GaugeMetricFamily(m.UP.name, m.UP.help, value=1.0 if up else 0.0)]
    for metric in _COUNTERS:
        counter = CounterMetricFamily(metric.name, metric.help, labels=list(metric.labels))
        for values, value in sorted(samples.counters.get(metric.name, {}).items()):
            counter.add_metric(list(values), value)
        families.append(counter)
    for metric in _GAUGES:
        gauge = GaugeMetricFamily(metric.name, metric.help, labels=list(metric.labels))
        for values, value in sorted(samples.gauges.get(metric.name, {}).items()):
            gauge.add_metric(list(values), value)
        families.append(gauge)
    for metric in _HISTOGRAMS:
        histogram = HistogramMetricFamily(metric.name, metric.help, labels=list(metric.labels))
        for values, (count, total) in sorted(samples.histograms.get(metric.name, {}).items()):
            histogram.add_metric(list(values), buckets=[("+Inf", count)], sum_value=total)
        families.append(histogram)
    return families


SCRAPE_CACHE_S = 2.0
"""How long ``costwatch serve`` answers scrapes with the text it last rendered before rendering anew
(Prometheus scrapes every 15 s or more; a burst of scrapers, or several Prometheus servers, share
one read of the store). Meanwhile scrapers get the previous answer, so values lag by up to this
plus one read."""


class _Flight:
    """One read of the store in progress, and the families it produced, for the scrapes that wait on it."""

    __slots__ = ("done", "families")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.families: list[Metric] = []


class FleetCollector(Collector):
    """Reads the store's rollups at scrape time and exposes them as costwatch's metrics.

    ``database_url`` defaults to ``$COSTWATCH_DATABASE_URL``. The exporter only reads: it never
    migrates or writes. ``retry_window`` must be at least the store's (how long after an attempt
    the store may still flip it to ``retried``). ``retry_window``, ``workflow_label_limit`` and
    ``model_label_limit`` default to their ``COSTWATCH_*`` settings. ``clock`` gives the current UTC
    time. :meth:`close` releases the database connections.

    Concurrent scrapes share one read (single flight): a scrape that arrives while a read is under
    way waits for it and answers with its result, so the database sees one query at a time however
    many scrapers there are. A scrape within ``cache_s`` seconds of the last read answers with it
    (``serve`` uses :data:`SCRAPE_CACHE_S`; 0, the default here, reads every time).
    """

    def __init__(
        self,
        database_url: str | None = None,
        *,
        retry_window: timedelta | None = None,
        workflow_label_limit: int | None = None,
        model_label_limit: int | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
        cache_s: float = 0.0,
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
        self.cache_s = cache_s
        self._flight_lock = threading.Lock()
        self._flight: _Flight | None = None
        self._cached: tuple[float, list[Metric]] | None = None
        self._kept: dict[str, tuple[str, ...]] = {}
        self.reads = 0
        """Reads of the store so far (each shared by every scrape that waited on it)."""

    def describe(self) -> Iterator[Metric]:
        """The metric families this collector exposes, without reading the database."""
        # Registering must not touch the database.
        return iter(_families(FleetSamples(), up=True))

    def collect(self) -> Iterator[Metric]:
        """The fleet's metrics read now (or by the read under way, or within ``cache_s``); after a
        failed read, ``costwatch_up 0`` and the last values."""
        with self._flight_lock:
            cached = self._cached
            if cached is not None and time.monotonic() - cached[0] < self.cache_s:
                return iter(cached[1])
            flight = self._flight
            leading = flight is None
            if flight is None:
                flight = self._flight = _Flight()
        if not leading:
            flight.done.wait()
            return iter(flight.families)
        try:
            flight.families = self._read_families()
        finally:
            with self._flight_lock:
                self._flight = None
                self._cached = (time.monotonic(), flight.families)
            flight.done.set()
        return iter(flight.families)

    def _read_families(self) -> list[Metric]:
        self.reads += 1
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
                return _families(self._last or FleetSamples(), up=False)
            if self._failing:
                log.warning("costwatch exporter: reading %s works again", safe_url(self.store.url))
            self._failing = False
            # A flip after the window (rare) would lower a settled sum: hold every sample at its high mark.
            self._last = samples if self._last is None else samples.at_least(self._last)
            return _families(self._last, up=True)

    def close(self) -> None:
        """Close the database connections (a later scrape opens new ones)."""
        self.store.shutdown()

    def read(self) -> FleetSamples:
        """Query the rollups once and compute the metric values; raises if the database fails.

        The label caps are applied by the database, which returns one row per combination of kept
        labels (and ``other``): the work after the query is bounded by the exporter's output, not
        by how many distinct models and workflows the store holds.
        """
        boundary = settled_before(self._clock(), self.retry_window)
        caps = {"model": self.model_label_limit, "workflow": self.workflow_label_limit}
        with self.store.engine.connect().execution_options(**{READ_ONLY_OPTION: True}) as connection:
            for name, cap in caps.items():
                # Finding the kept labels costs a pass over the all-time rollups: once a dimension
                # has its full set, later values only ever read `other`, so the set is read once.
                if name not in self._kept:
                    found = tuple(connection.execute(kept_labels_query(name, cap)).scalars())
                    if len(found) == cap:
                        self._kept[name] = found
            # Nothing else is cached: the rollups of settled hours still change (a late record
            # replayed from a spool, a revision, a retry written by another process flipping an
            # attempt). The all-time rollups follow every such change; settled = all-time - recent.
            # A set not yet full is found again inside the query, so one statement sees one snapshot.
            query = capped_all_time_with_recent_query(
                boundary,
                caps=caps,
                other=OTHER,
                measures=_MEASURES,
                recent_where={"waste_reason": WasteReason.ABANDONED.value},
                kept=self._kept,
            )
            rows = connection.execute(query).all()
            rejected = connection.execute(sa.select(sa.func.count()).select_from(REJECTED_ATTEMPTS)).scalar()
            reconciled = connection.execute(_reconciled_query(self._clock() - RECONCILED_WINDOW)).all()
            last = connection.execute(sa.select(sa.func.max(RECONCILIATIONS.c.reconciled_at))).scalar()
        totals, settled_abandoned, pending = _combine_all_time(rows)
        samples = _samples(
            totals, settled_abandoned, model_of=_as_is, workflow_of=_as_is, pending_abandoned=pending
        )
        samples.counters[m.STORE_REJECTED_RECORDS.name] = {(): float(rejected or 0)}
        # The reconciliation's models get the labels the capped rollups gave out, others ``other``:
        # a model only Anthropic saw adds no series.
        labelled = {str(key[_MODEL]) for key, _ in totals}
        samples.gauges.update(
            reconciliation_gauges(reconciled, last, model_of=lambda m: m if m in labelled else OTHER)
        )
        return samples


def _reconciled_query(since: datetime) -> sa.Select[Any]:
    """Per model, over the stored reconciliation rows of buckets from ``since``: the sums of both
    sides by token type, the unseen dollars, and the estimated and billed output (and wasted
    dollars) of dropped attempts in the fully seen buckets; each column labelled by what it is."""
    table = RECONCILIATIONS
    matched = table.c.residual_output_tokens.is_not(None)
    corrected = table.c.billed_wasted_cost_usd.is_not(None)
    # What costwatch estimated, also for the attempts the bill has corrected since (rows stored
    # before migration 0012 have only the estimates still standing).
    estimated = sa.func.coalesce(
        table.c.dropped_estimated_output_tokens, table.c.recorded_output_estimated_tokens
    )
    sides = [f"{side}_{t}_tokens" for side in ("reported", "recorded") for t in _TOKEN_TYPES]
    return (
        sa.select(
            table.c.model,
            *(sa.func.sum(table.c[name]).label(name) for name in [*sides, "unseen_cost_usd"]),
            sa.func.sum(sa.case((matched, estimated), else_=0)).label("dropped_estimated"),
            sa.func.sum(sa.case((matched, table.c.residual_output_tokens), else_=0)).label("dropped_billed"),
            sa.func.sum(sa.case((corrected, table.c.estimated_wasted_cost_usd), else_=0.0)).label(
                "wasted_estimated"
            ),
            sa.func.sum(sa.case((corrected, table.c.billed_wasted_cost_usd), else_=0.0)).label(
                "wasted_billed"
            ),
        )
        .where(table.c.bucket_start >= since)
        .group_by(table.c.model)
    )


def reconciliation_gauges(
    rows: Iterable[sa.Row[Any]], last: datetime | None, *, model_of: Callable[[str], str]
) -> dict[str, dict[Labels, float]]:
    """The reconciliation gauges from :func:`_reconciled_query`'s rows and the last reconciliation time."""
    reported: dict[Labels, float] = {}
    recorded: dict[Labels, float] = {}
    dropped: dict[Labels, float] = {}
    wasted: dict[Labels, float] = {}
    unseen_usd = 0.0
    for row in rows:
        model = model_of(str(row.model))
        values = {name: float(value or 0) for name, value in row._mapping.items() if name != "model"}
        for token_type in _TOKEN_TYPES:
            key = (model, token_type)
            reported[key] = reported.get(key, 0.0) + values[f"reported_{token_type}_tokens"]
            recorded[key] = recorded.get(key, 0.0) + values[f"recorded_{token_type}_tokens"]
        unseen_usd += values["unseen_cost_usd"]
        for source in ("estimated", "billed"):
            dropped[(model, source)] = dropped.get((model, source), 0.0) + values[f"dropped_{source}"]
            wasted[(model, source)] = wasted.get((model, source), 0.0) + values[f"wasted_{source}"]
    gauges: dict[str, dict[Labels, float]] = {
        m.RECONCILED_COVERAGE.name: {
            key: recorded[key] / value for key, value in reported.items() if value > 0
        },
        m.RECONCILED_DROPPED_OUTPUT.name: dropped,
        m.RECONCILED_WASTED_COST.name: wasted,
        m.UNSEEN_COST.name: {(): unseen_usd},
    }
    if last is not None:
        stamp = last if last.tzinfo is not None else last.replace(tzinfo=timezone.utc)
        gauges[m.LAST_RECONCILIATION.name] = {(): stamp.timestamp()}
    return gauges


def _as_is(value: str) -> str:
    return value


def _combine_all_time(rows: Iterable[Sequence[Any]]) -> tuple[list[Group], list[Group], list[Group]]:
    """All-hours totals, settled ``abandoned`` totals and pending ``abandoned`` totals from a
    :func:`~costwatch.store.query.capped_all_time_with_recent_query` whose recent part is
    ``abandoned`` only.

    Groups summing to zero attempts are left out of the totals, as ``rollup_totals`` leaves them out.
    """
    # A row is the dimensions, ``recent``, ``first_hour`` and then the sums of ``_MEASURES``.
    width, sums = len(_DIMENSIONS), -len(_MEASURES)
    totals: list[Group] = []
    all_time_abandoned: dict[Labels, list[float]] = {}
    recent_abandoned: dict[Labels, list[float]] = {}
    for row in rows:
        key: Labels = tuple(row[:width])
        if row[width]:
            recent_abandoned[key] = list(row[sums:])
            continue
        values = list(row[sums:])  # ints and floats, never NULL (the columns are NOT NULL)
        if values[_ATTEMPTS]:
            totals.append((key, values))
        if key[_WASTE_REASON] == WasteReason.ABANDONED.value:
            all_time_abandoned[key] = values
    settled_abandoned: list[Group] = []
    for key, values in all_time_abandoned.items():
        recent = recent_abandoned.get(key)
        settled = values if recent is None else [a - b for a, b in zip(values, recent, strict=True)]
        if settled[_ATTEMPTS]:
            settled_abandoned.append((key, settled))
    pending: list[Group] = [(key, values) for key, values in recent_abandoned.items() if values[_ATTEMPTS]]
    return totals, settled_abandoned, pending


_CONNECTION = "costwatch.connection"
_SERVING_SWITCH_INTERVAL_S = 0.0005


class _ScrapeHandler(WSGIRequestHandler):
    """Hands the client's socket to the app (to skip clients that left) and logs nothing."""

    def get_environ(self) -> dict[str, Any]:
        environ = super().get_environ()
        environ[_CONNECTION] = self.connection
        return environ

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged (as prometheus_client's own server does)."""


def _client_gone(connection: socket.socket | None) -> bool:
    """Whether the client closed its end: a read that would block means it is still there."""
    if connection is None:
        return False
    try:
        return connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class _Response:
    """One rendered ``/metrics`` answer, and when it was rendered."""

    __slots__ = ("at", "body", "headers", "status")

    def __init__(self, status: str, headers: list[tuple[str, str]], body: bytes) -> None:
        self.at = time.monotonic()
        self.status = status
        self.headers = headers
        self.body = body


class _ScrapeAnswers:
    """``/metrics`` answers rendered once and served to every scraper for ``fresh_s`` seconds.

    Rendering the exposition of a few thousand series costs as much as reading the store, so the
    rendered text is what is kept, per format (text or OpenMetrics, gzip or not). An answer older
    than ``fresh_s`` is still served while one thread renders its successor (stale while
    revalidate): no scraper waits for the store unless there is no answer at all yet, and then
    all of them wait for the same one. Requests with a query (``name[]`` filters) are rendered for
    themselves, through the collector's own single flight. ``renderer``, when set, renders the
    kept answers instead of ``exposition`` (``serve`` sets a :class:`_RenderProcess`).
    """

    def __init__(self, exposition: Callable[..., Any], fresh_s: float) -> None:
        self._exposition = exposition
        self._fresh_s = fresh_s
        self._lock = threading.Lock()
        self._answers: dict[tuple[bool, bool], _Response] = {}
        self._rendering: dict[tuple[bool, bool], threading.Event] = {}
        self.renderer: _RenderProcess | None = None

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if _client_gone(environ.get(_CONNECTION)):
            # A scraper that timed out while waiting to be served: nothing is read for it.
            start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b""]
        if environ.get("QUERY_STRING"):
            return self._exposition(environ, start_response)
        key = (
            "application/openmetrics-text" in environ.get("HTTP_ACCEPT", ""),
            "gzip" in environ.get("HTTP_ACCEPT_ENCODING", ""),
        )
        with self._lock:
            answer = self._answers.get(key)
            rendering = self._rendering.get(key)
            stale = answer is None or time.monotonic() - answer.at >= self._fresh_s
            start = stale and rendering is None
            if start:
                rendering = self._rendering[key] = threading.Event()
        if start and rendering is not None:
            if answer is None:
                self._render(key, dict(environ), rendering)  # nothing to serve meanwhile: render here
            else:
                worker = threading.Thread(
                    target=self._render, args=(key, dict(environ), rendering), daemon=True
                )
                worker.start()
        if answer is None:
            assert rendering is not None
            rendering.wait()
            with self._lock:
                answer = self._answers.get(key)
            if answer is None:  # rendering failed outright: let the exposition answer for itself
                return self._exposition(environ, start_response)
        start_response(answer.status, answer.headers)
        return [answer.body]

    def _render(self, key: tuple[bool, bool], environ: dict[str, Any], done: threading.Event) -> None:
        environ.pop(_CONNECTION, None)
        try:
            renderer = self.renderer
            if renderer is not None and key not in self._answers and not renderer.ready:
                renderer = None  # scrapers wait for this first answer: render it without the worker
            status, headers, body = _answer_of(renderer or self._exposition, environ)
            with self._lock:
                self._answers[key] = _Response(status, headers, body)
        except Exception:
            log.exception("costwatch exporter: rendering the metrics failed")
        finally:
            with self._lock:
                self._rendering.pop(key, None)
            done.set()


def _answer_of(app: Callable[..., Any], environ: dict[str, Any]) -> tuple[str, list[Any], bytes]:
    """The status, headers and body of one call of a WSGI ``app``."""
    captured: list[Any] = []
    body = b"".join(app(environ, lambda status, headers: captured.extend([status, headers])))
    return captured[0], list(captured[1]), body


_WORKER_START_S = 60.0
"""How long a render waits for the render process to start before rendering in the serving process."""


class _RenderProcess:
    """A WSGI app that renders ``/metrics`` in a process of its own, for ``costwatch serve``.

    Rendering an answer (reading the store, computing the samples, writing a megabyte of text) is
    pure Python for hundreds of milliseconds; in the serving process it held the GIL while the
    scrapes answered from the kept text waited for it, and on a busy machine each hand-over of the
    GIL waits for the scheduler too (scrape p99 of 100-500 ms at 1M attempts, 9 ms with no render
    during the run: benchmarks/README.md). In a process of its own it shares only the CPU. The
    worker logs through this process's ``costwatch`` logger. A render waits for it to start (a
    stale answer is served meanwhile); if it dies, after one warning, or does not start, the answers
    are rendered here (``fallback``).
    """

    def __init__(self, database_url: str | None, fallback: Callable[..., Any]) -> None:
        import multiprocessing

        # Spawned, not forked: this process has threads (the server's, the maintenance thread).
        context = multiprocessing.get_context("spawn")
        self._connection, theirs = context.Pipe()
        self._process = context.Process(
            target=_render_worker,
            args=(database_url, theirs, log.getEffectiveLevel()),
            name="costwatch-exporter-render",
            daemon=True,
        )
        self._process.start()
        theirs.close()
        self._fallback = fallback
        self._lock = threading.Lock()
        self._broken = False
        self._closed = False
        self._ready = False

    def wait_ready(self, timeout: float) -> bool:
        """Wait until the worker is ready to render (or gone); whether it is ready."""
        deadline = time.monotonic() + timeout
        while not self._is_ready() and not self._broken and time.monotonic() < deadline:
            time.sleep(0.05)
        return self._ready and not self._broken

    def _is_ready(self) -> bool:
        # The worker says "ready" once it has imported what it needs: until then (seconds, on a busy
        # machine) answers are rendered here, so that the first scrapes do not wait for it.
        if not self._ready and not self._broken and self._lock.acquire(blocking=False):
            try:
                if self._connection.poll():
                    self._connection.recv()
                    self._ready = True
            except (EOFError, OSError) as exc:
                self._end(exc)
            finally:
                self._lock.release()
        return self._ready

    def _end(self, exc: BaseException) -> None:
        self._broken = True
        if not self._closed:
            log.warning(
                "costwatch exporter: the render process ended (%s); rendering in the serving process",
                type(exc).__name__,
            )

    @property
    def ready(self) -> bool:
        """Whether the worker has started and can render."""
        return self._is_ready() and not self._broken

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if self.wait_ready(_WORKER_START_S):
            request = {name: value for name, value in environ.items() if isinstance(value, str)}
            try:
                with self._lock:
                    self._connection.send(request)
                    status, headers, body, logged = self._connection.recv()
            except (EOFError, OSError) as exc:
                self._end(exc)
            else:
                for level, message in logged:
                    log.log(level, "%s", message)
                if status is None:
                    raise RuntimeError(f"the render process failed:\n{body}")
                start_response(status, headers)
                return [body]
        return self._fallback(environ, start_response)

    def close(self) -> None:
        """End the worker: it exits when its end of the pipe closes, or is terminated when a render
        keeps it longer (a store that does not answer must not hold up the server's close)."""
        self._broken = self._closed = True
        if self._lock.acquire(timeout=5.0):
            try:
                self._connection.close()
            finally:
                self._lock.release()
            self._process.join(5.0)
        if self._process.is_alive():
            self._process.terminate()  # the render waiting on it then reads EOF
            self._process.join(5.0)


class _Collected(logging.Handler):
    """Keeps the worker's log lines, to be logged by the serving process with the answer."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))
        self.lines: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelno, self.format(record)))


def _render_worker(database_url: str | None, connection: Any, level: int) -> None:
    """The render process: answers each environ sent on ``connection`` until it closes."""
    import signal

    # Ctrl-C reaches the whole process group; the serving process decides when this one ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    collected = _Collected()
    log.addHandler(collected)
    log.setLevel(level)
    log.propagate = False
    registry = CollectorRegistry()
    collector = FleetCollector(database_url)
    registry.register(collector)
    app = make_wsgi_app(registry)
    try:
        try:
            connection.send("ready")
        except (EOFError, OSError):
            return
        while True:
            try:
                environ = connection.recv()
            except (EOFError, OSError):
                return
            answer: tuple[Any, ...]
            try:
                answer = _answer_of(app, environ)
            except Exception:  # raised again in the serving process, which logs it
                answer = (None, [], traceback.format_exc())
            try:
                connection.send((*answer, collected.lines))
            except (EOFError, OSError):
                return
            collected.lines = []
    finally:
        collector.close()


def _metrics_app(registry: CollectorRegistry, fresh_s: float = 0.0) -> Callable[..., Any]:
    return _ScrapeAnswers(make_wsgi_app(registry), fresh_s)


def _start_server(
    port: int, addr: str, registry: CollectorRegistry, fresh_s: float
) -> tuple[Any, threading.Thread]:
    class Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        # socketserver's default backlog is 5: a burst of scrapers overflowed it, and each one left
        # out waited a second or more for its SYN to be sent again.
        request_queue_size = 128

    server = make_server(addr, port, _metrics_app(registry, fresh_s), Server, handler_class=_ScrapeHandler)
    thread = threading.Thread(target=server.serve_forever, name="costwatch-exporter", daemon=True)
    thread.start()
    return server, thread


PRUNE_EVERY_S = 3600.0
"""How often ``serve`` prunes raw attempt rows older than its ``retention`` (and, on PostgreSQL,
creates the attempts table's day partitions ahead)."""

PRUNE_AGAIN_S = 600.0
"""How soon ``serve`` prunes again after a prune that found the attempts table held by long reads for
its whole lock wait (``PruneLockTimeout``)."""


def _maintain_periodically(
    database_url: str | None, retention: timedelta | None, stop: threading.Event
) -> None:
    store = SqlStore(database_url, auto_migrate=False)
    failing = False
    try:
        while True:
            store.ensure_partitions()  # logs its own failure; rows meanwhile land in the DEFAULT partition
            wait = PRUNE_EVERY_S
            try:
                if retention is not None:
                    removed = store.prune_before(datetime.now(timezone.utc) - retention)
                    log.info("costwatch exporter: pruned %d attempt rows older than %s", removed, retention)
                # Also what a prune that stopped, or another process's, detached and left.
                store.drop_pruned()
                failing = False
            except PruneLockTimeout as exc:
                # Not an outage: the reads that held the table will end; try again well before the hour.
                log.warning("costwatch exporter: %s; trying again in %.0f min", exc, PRUNE_AGAIN_S / 60)
                wait = PRUNE_AGAIN_S
            except Exception as exc:
                if not failing:  # once per outage
                    log.warning(
                        "costwatch exporter: pruning failed (%s); retrying in an hour", type(exc).__name__
                    )
                failing = True
            if stop.wait(wait):
                return
    finally:
        store.shutdown()


def serve(
    database_url: str | None,
    port: int,
    addr: str = "127.0.0.1",
    *,
    block: bool = True,
    on_listening: Callable[[], object] | None = None,
    retention: timedelta | None = None,
    render_process: bool = False,
) -> Any:
    """Serve the fleet's metrics on ``http://{addr}:{port}/metrics``.

    Blocks until interrupted when ``block`` is true (as the CLI runs it); otherwise returns the
    running HTTP server (call ``shutdown()`` and then ``server_close()`` on it to stop; the latter
    also closes the database connections). ``on_listening`` is called once the port is bound. With
    ``retention``, raw attempt rows older than that are pruned now and every
    :data:`PRUNE_EVERY_S` seconds (the rollups keep every total); on PostgreSQL the attempts
    table's day partitions are created ahead as often. With ``render_process`` (as the CLI runs
    it), the answers are rendered in a process of their own, started with ``multiprocessing``'s
    spawn method (so the calling program's main module must be safe to import), so that scrapes
    answered meanwhile never wait for a render.
    """
    registry = CollectorRegistry()
    collector = FleetCollector(database_url)  # the rendered answers are what serve keeps
    registry.register(collector)
    try:
        server, thread = _start_server(port, addr, registry, SCRAPE_CACHE_S)
    except BaseException:
        collector.close()
        raise
    renderer: _RenderProcess | None = None
    if render_process:
        app = server.get_app()
        renderer = app.renderer = _RenderProcess(database_url, fallback=app._exposition)
    # Closing the server (as a non-blocking caller does) closes the collector's connections too.
    close_server = server.server_close

    stop_pruning = threading.Event()
    if retention is not None or store_database_url(database_url).get_backend_name() == "postgresql":
        threading.Thread(
            target=_maintain_periodically,
            args=(database_url, retention, stop_pruning),
            name="costwatch-retention",
            daemon=True,
        ).start()

    def server_close() -> None:
        stop_pruning.set()
        close_server()
        if renderer is not None:
            renderer.close()
        collector.close()

    server.server_close = server_close
    if on_listening is not None:
        on_listening()
    if not block:
        return server
    # This process only serves (the CLI runs it so): hand the GIL over more often, so that a scrape
    # answered from the cache is not held up behind the thread rendering the next answer.
    sys.setswitchinterval(_SERVING_SWITCH_INTERVAL_S)
    try:
        while thread.is_alive():
            thread.join(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
    return server
