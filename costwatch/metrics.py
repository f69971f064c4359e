"""Prometheus metrics of billed and wasted tokens, fed by attempt records on the pipeline thread.

Counters cannot go down, while an attempt's waste reason can change after the fact: a failed
attempt is first recorded as ``abandoned`` (revision 0) and re-emitted as ``retried`` when its
retry arrives. So attempts, billed tokens and billed cost are counted as soon as an attempt is
first seen, but waste is counted only once it is *settled*: ``retried`` as soon as a record says
so, ``abandoned`` once the retry window has passed without a retry (or at :meth:`MetricsSink.settle`
and shutdown). :class:`WasteSettlement` holds that bookkeeping as plain logic with no I/O.
See ``docs/metrics.md``.
"""

from __future__ import annotations

import os
import threading
import time
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import metric_names as m
from .avoidable import avoidable_for_request
from .health import instrumentation_errors
from .platforms import PLATFORMS
from .pricing import PriceTable, load_prices
from .records import AttemptRecord, Outcome, OutputSource, TokenType, WasteReason
from .settings import default_of, load_settings

if TYPE_CHECKING:
    from .otlp import OtlpMetrics

__all__ = [
    "ATTEMPTS_PER_REQUEST_BUCKETS",
    "DURATION_BUCKETS",
    "MODEL_LABEL_LIMIT",
    "OTHER",
    "Correction",
    "LabelCap",
    "MetricsSink",
    "SettledRequest",
    "SettledWaste",
    "Settlement",
    "WasteSettlement",
    "multiprocess_mode",
    "observe_all",
    "platform_label",
    "start_metrics_server",
]

OTHER = "other"
"""The label value that stands for every value beyond a label's cardinality cap."""

MODEL_LABEL_LIMIT: int = default_of("model_label_limit")
"""Distinct ``model`` label values kept by default; model strings come from requests, so are unbounded."""


DURATION_BUCKETS = (
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1200.0,
    3600.0,
)
"""Seconds; long streaming attempts run for many minutes, so the buckets reach an hour."""

ATTEMPTS_PER_REQUEST_BUCKETS = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 20.0)

_COMPLETED = Outcome.COMPLETED
"""Read twice a record on the writer thread: an enum member read through its class goes through
the enum's metaclass on Python 3.11 (~1.3 k instructions, against ~0.2 k for this global)."""


# -- labels -----------------------------------------------------------------------------------------
def platform_label(platform: str) -> str:
    """The ``platform`` label of a platform: one of :data:`~costwatch.platforms.PLATFORMS`, else ``other``
    (a record read back from a spool or a store written by another version may name anything)."""
    return platform if platform in PLATFORMS else OTHER


class LabelCap:
    """Bounds a label's cardinality: the first ``limit`` distinct values are kept, later ones read ``other``.

    ``""`` (absent) is always kept and does not use up the limit. Not thread-safe; callers lock.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._kept: set[str] = set()

    @classmethod
    def first_seen(cls, values: Iterable[str], limit: int) -> LabelCap:
        """A cap that has already seen ``values``, in order: it keeps the first ``limit`` of them."""
        cap = cls(limit)
        for value in values:
            cap(value)
        return cap

    def __call__(self, value: str) -> str:
        """The label value to use for ``value``."""
        if value == "" or value in self._kept:
            return value
        if len(self._kept) < self.limit:
            self._kept.add(value)
            return value
        return OTHER

    @property
    def kept(self) -> frozenset[str]:
        """The values kept so far."""
        return frozenset(self._kept)


# -- settlement: when waste and logical-request results become final (pure logic) --------------------
@dataclass(frozen=True, slots=True)
class SettledWaste:
    """An attempt whose waste reason is final: count its billed tokens as wasted for ``reason``."""

    record: AttemptRecord
    reason: WasteReason


@dataclass(frozen=True, slots=True)
class SettledRequest:
    """A logical request whose result is final; ``last`` is its last attempt."""

    last: AttemptRecord
    succeeded: bool


@dataclass(frozen=True, slots=True)
class Correction:
    """A counted attempt whose output estimate was revised: count the difference ``new - old``, also
    as waste when its waste was already counted (under ``settled``)."""

    old: AttemptRecord
    new: AttemptRecord
    settled: WasteReason | None


@dataclass(slots=True)
class Settlement:
    """What became countable after some records arrived or some time passed."""

    new_attempts: list[AttemptRecord] = field(default_factory=list)
    """Attempts seen for the first time: count the attempt, its billed tokens and its cost."""
    waste: list[SettledWaste] = field(default_factory=list)
    requests: list[SettledRequest] = field(default_factory=list)
    corrections: list[Correction] = field(default_factory=list)

    def extend(self, other: Settlement) -> None:
        """Append another settlement's items to this one."""
        self.new_attempts.extend(other.new_attempts)
        self.waste.extend(other.waste)
        self.requests.extend(other.requests)
        self.corrections.extend(other.corrections)


@dataclass(slots=True)
class _Pending:
    record: AttemptRecord
    deadline: float


class WasteSettlement:
    """Decides when each attempt's waste and each logical request's result is final.

    * An attempt is new the first time any revision of it arrives; later copies of the same or a
      lower revision are ignored, so redelivered batches count nothing twice, except that a
      ``retried`` flip is believed whatever its revision (a flip made in memory and an estimate
      revised in the store, each one revision up, can carry the same number).
    * A higher revision whose estimated output differs from the one counted is a correction.
    * ``retried`` waste settles when a record says so; ``abandoned`` waste settles when
      ``retry_window_s`` has passed since it arrived with no ``retried`` revision.
    * A logical request succeeds when one of its attempts completes. It fails when its latest
      attempt failed and no later attempt (nor a ``retried`` flip, which says one has started) has
      arrived within ``retry_window_s``.

    Memory is bounded: at most ``max_pending`` attempts and logical requests wait to settle (the
    oldest settle early when more arrive), and attempt ids are remembered for two retry windows, at
    most ``max_remembered`` of them. ``now`` is any monotonic clock, in seconds. ``retry_window_s``
    defaults to ``$COSTWATCH_RETRY_WINDOW``.
    """

    def __init__(
        self,
        *,
        retry_window_s: float | None = None,
        max_pending: int = 50_000,
        max_remembered: int = 20_000,
    ) -> None:
        self.retry_window_s: float = (
            retry_window_s if retry_window_s is not None else load_settings().retry_window_s
        )
        self.max_pending = max_pending
        self.max_remembered = max_remembered
        self._seen: OrderedDict[str, tuple[int, float]] = OrderedDict()  # id -> (revision, first seen)
        self._settled_waste: dict[str, WasteReason] = {}
        self._estimated: OrderedDict[str, AttemptRecord] = OrderedDict()  # counted, output estimated
        self._pending_waste: OrderedDict[str, _Pending] = OrderedDict()
        self._pending_requests: OrderedDict[str, _Pending] = OrderedDict()
        self._finished_requests: OrderedDict[str, int] = OrderedDict()  # id -> last attempt number

    @property
    def pending_waste(self) -> int:
        """Attempts whose ``abandoned`` waste is waiting for the retry window to pass."""
        return len(self._pending_waste)

    @property
    def pending_requests(self) -> int:
        """Logical requests whose last attempt failed, waiting for a retry or the window to pass."""
        return len(self._pending_requests)

    def observe(self, records: Iterable[AttemptRecord], now: float) -> Settlement:
        """Take in records (any revisions, any order within a batch) and settle what they decide."""
        out = Settlement()
        for record in records:
            self._observe(record, now, out)
        out.extend(self.settle_due(now))
        return out

    def settle_due(self, now: float) -> Settlement:
        """Settle what has waited a whole retry window."""
        out = Settlement()
        while self._pending_waste:
            attempt_id, pending = next(iter(self._pending_waste.items()))
            if pending.deadline > now:
                break
            self._pending_waste.popitem(last=False)
            self._settle_abandoned(attempt_id, pending.record, out)
        while self._pending_requests:
            request_id, pending = next(iter(self._pending_requests.items()))
            if pending.deadline > now:
                break
            self._pending_requests.popitem(last=False)
            self._finish_request(request_id, pending.record, succeeded=False, out=out)
        self._forget(now)
        return out

    def settle_all(self) -> Settlement:
        """Settle everything now, as at shutdown: pending waste is abandoned, pending requests failed."""
        return self.settle_due(float("inf"))

    # -- internals --------------------------------------------------------------------------------
    def _observe(self, record: AttemptRecord, now: float, out: Settlement) -> None:
        attempt_id = record.attempt_id
        seen = self._seen.get(attempt_id)
        if seen is not None and record.revision <= seen[0]:
            pending = self._pending_waste.get(attempt_id)
            if pending is not None and record.wasted and record.waste_reason is WasteReason.RETRIED:
                self._settle_retried(pending.record, now, out)  # the latest figures held for it
            return
        self._seen[attempt_id] = (record.revision, now if seen is None else seen[1])
        if seen is None:
            out.new_attempts.append(record)
            self._request_attempt(record, now, out)
        else:
            self._revised(record, out)
        if record.usage.output_estimated:
            self._estimated[attempt_id] = record
        if attempt_id in self._settled_waste:
            return
        if record.wasted and record.waste_reason is WasteReason.RETRIED:
            self._settle_retried(record, now, out)
        elif record.wasted and record.waste_reason is WasteReason.CANCELLED:
            # The application's own stop: final at once, and no retry is coming.
            self._pending_waste.pop(attempt_id, None)
            self._settled_waste[attempt_id] = WasteReason.CANCELLED
            out.waste.append(SettledWaste(record, WasteReason.CANCELLED))
        elif record.wasted and record.waste_reason is WasteReason.ABANDONED:
            pending = self._pending_waste.get(attempt_id)
            if pending is not None:
                pending.record = record  # settles with the latest figures (a revised estimate)
            else:
                self._pending_waste[attempt_id] = _Pending(record, now + self.retry_window_s)
                if len(self._pending_waste) > self.max_pending:
                    oldest_id, oldest = self._pending_waste.popitem(last=False)
                    self._settle_abandoned(oldest_id, oldest.record, out)
        else:
            self._pending_waste.pop(record.attempt_id, None)

    def _settle_retried(self, record: AttemptRecord, now: float, out: Settlement) -> None:
        self._pending_waste.pop(record.attempt_id, None)
        self._settled_waste[record.attempt_id] = WasteReason.RETRIED
        out.waste.append(SettledWaste(record, WasteReason.RETRIED))
        # A retry has started; its own record arrives only when it ends, maybe much later.
        pending = self._pending_requests.get(record.logical_request_id)
        if pending is not None:
            pending.deadline = now + self.retry_window_s
            self._pending_requests.move_to_end(record.logical_request_id)

    def _revised(self, record: AttemptRecord, out: Settlement) -> None:
        """A higher revision of a counted attempt: a correction if its estimated output moved."""
        counted = self._estimated.get(record.attempt_id)
        if counted is None:
            return
        if counted.usage.output_tokens != record.usage.output_tokens or counted.cost != record.cost:
            out.corrections.append(Correction(counted, record, self._settled_waste.get(record.attempt_id)))

    def _request_attempt(self, record: AttemptRecord, now: float, out: Settlement) -> None:
        request_id = record.logical_request_id
        finished = self._finished_requests.get(request_id)
        if finished is not None and record.attempt_number <= finished:
            return  # a straggler of a request that has already settled
        pending = self._pending_requests.get(request_id)
        if pending is not None and pending.record.attempt_number > record.attempt_number:
            return  # an earlier attempt that ended late; the later one decides
        if record.outcome is _COMPLETED:
            self._pending_requests.pop(request_id, None)
            self._finish_request(request_id, record, succeeded=True, out=out)
            return
        self._pending_requests[request_id] = _Pending(record, now + self.retry_window_s)
        self._pending_requests.move_to_end(request_id)
        if len(self._pending_requests) > self.max_pending:
            oldest_id, oldest = self._pending_requests.popitem(last=False)
            self._finish_request(oldest_id, oldest.record, succeeded=False, out=out)

    def _settle_abandoned(self, attempt_id: str, record: AttemptRecord, out: Settlement) -> None:
        self._settled_waste[attempt_id] = WasteReason.ABANDONED
        out.waste.append(SettledWaste(record, WasteReason.ABANDONED))

    def _finish_request(
        self, request_id: str, record: AttemptRecord, *, succeeded: bool, out: Settlement
    ) -> None:
        self._finished_requests[request_id] = record.attempt_number
        self._finished_requests.move_to_end(request_id)
        while len(self._finished_requests) > self.max_remembered:
            self._finished_requests.popitem(last=False)
        out.requests.append(SettledRequest(record, succeeded))

    def _forget(self, now: float) -> None:
        horizon = now - 2 * self.retry_window_s
        while self._seen:
            attempt_id, (_, first_seen) = next(iter(self._seen.items()))
            if first_seen > horizon and len(self._seen) <= self.max_remembered:
                break
            if attempt_id in self._pending_waste:
                break  # still waiting; it settles (and is forgotten) in a later pass
            self._seen.popitem(last=False)
            self._settled_waste.pop(attempt_id, None)
            self._estimated.pop(attempt_id, None)


# -- the Prometheus side -----------------------------------------------------------------------------
class _RetriedRequests:
    """The latest records of recent logical requests that failed or were retried (bounded, pure).

    Enough to price what prompt caching would have saved each retried request, as its attempts arrive.
    """

    MAX_REQUESTS = 10_000

    def __init__(self) -> None:
        self._requests: OrderedDict[str, dict[str, AttemptRecord]] = OrderedDict()
        self._counted: dict[str, float] = {}

    def observe(self, records: Iterable[AttemptRecord]) -> list[str]:
        """Keep the records that matter; returns the retried requests whose figure may have changed."""
        changed: dict[str, None] = {}
        for record in records:
            if record.outcome is _COMPLETED and record.attempt_number <= 1:
                continue  # a first attempt that completed: never retried
            attempts = self._requests.get(record.logical_request_id)
            if attempts is None:
                attempts = self._requests[record.logical_request_id] = {}
                while len(self._requests) > self.MAX_REQUESTS:
                    forgotten, _ = self._requests.popitem(last=False)
                    self._counted.pop(forgotten, None)
            known = attempts.get(record.attempt_id)
            if known is None or record.revision > known.revision:
                attempts[record.attempt_id] = record
            if any(r.attempt_number > 1 for r in attempts.values()):
                changed[record.logical_request_id] = None
        return list(changed)

    def attempts(self, request_id: str) -> list[AttemptRecord]:
        """The latest records kept of a request's attempts."""
        return list(self._requests.get(request_id, {}).values())

    def counted(self, request_id: str, now: float) -> float:
        """What was counted for a request so far; remembers ``now`` if it is more."""
        before = self._counted.get(request_id, 0.0)
        self._counted[request_id] = max(before, now)
        return before


def multiprocess_mode() -> bool:
    """Whether prometheus_client is in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` is set)."""
    # prometheus_client still honours the old lower-case spelling (with a deprecation warning).
    legacy = os.environ.get("prometheus_multiproc_dir")  # noqa: SIM112
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or legacy)


def observe_all(histogram: Any, values: Sequence[float]) -> None:
    """``histogram.observe(value)`` for each of ``values`` in order, done at once: one write of the sum
    and one increment per bucket hit, where each ``observe`` takes two locks and searches the buckets
    one by one (~8.7 k instructions a value, against ~0.5 k here; prometheus_client has no bulk call).

    ``histogram`` is a prometheus_client ``Histogram`` child (not a Tee's: its ``observe_all`` also
    records into OpenTelemetry). The sum is added up in order from the child's value, so it is the
    same float as one ``observe`` after another; each bucket is incremented by how many values it
    takes, counted in the sorted values (a NaN, which ``observe`` counts in no bucket, is left out).
    The child's ``_upper_bounds``, ``_buckets`` and ``_sum`` are read, as prometheus_client's
    ``observe`` reads them (unchanged from 0.20 through 0.26; in multiprocess mode they are its
    mmap-backed values): without them, this calls ``observe`` for each value. Only the sink writes
    its histograms, under its lock, so the sum is not raced between its read and its write.
    """
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for value in values:
            histogram.observe(value)
        return
    if not values:
        return
    running = total.get()
    for value in values:  # in order, as observe adds them (sum() may add floats another way)
        running += value
    total.set(running)
    # A NaN sum says a NaN is among them (or both infinities): NaNs do not sort, and go in no bucket.
    ordered = sorted(values if running == running else (value for value in values if value == value))
    counted = 0
    for bucket, bound in zip(buckets, bounds, strict=True):
        upto = bisect_right(ordered, bound)  # the values <= bound, the ones observe puts here or below
        if upto > counted:
            bucket.inc(upto - counted)
            counted = upto
            if counted == len(ordered):
                break


@dataclass(frozen=True)
class _HealthReading:
    queue_depth: float
    spooled_records: float
    write_errors: float
    instrumentation_errors: float
    rejected_records: float = 0.0


def _read_health(pipeline: Any) -> _HealthReading:
    # The pipeline's health attributes are being extended; read whatever this version has.
    if pipeline is None:
        from .pipeline import get_pipeline

        pipeline = get_pipeline()
    return _HealthReading(
        queue_depth=float(getattr(pipeline, "queue_depth", 0) or 0),
        spooled_records=float(getattr(pipeline, "spooled_pending", 0) or 0),
        write_errors=float(getattr(pipeline, "write_errors", 0) or 0),
        instrumentation_errors=float(instrumentation_errors.total),
        rejected_records=float(getattr(pipeline, "rejected_records", 0) or 0),
    )


class _HealthCollector(Collector):
    """costwatch's own health at scrape time; first settles waste whose retry window has passed."""

    def __init__(self, sink: MetricsSink) -> None:
        self._sink = sink

    def describe(self) -> Iterator[Metric]:
        # Describing without collecting keeps registration free of side effects.
        return iter(_health_families(_HealthReading(0, 0, 0, 0)))

    def collect(self) -> Iterator[Metric]:
        self._sink.settle_due()
        return iter(_health_families(_read_health(self._sink.pipeline)))


def _health_families(reading: _HealthReading) -> list[Metric]:
    values = (
        (m.STORE_QUEUE_DEPTH, reading.queue_depth),
        (m.STORE_SPOOLED_RECORDS, reading.spooled_records),
        (m.STORE_WRITE_ERRORS, reading.write_errors),
        (m.INSTRUMENTATION_ERRORS, reading.instrumentation_errors),
        (m.STORE_REJECTED_RECORDS, reading.rejected_records),
    )
    return [
        (CounterMetricFamily if metric.kind == "counter" else GaugeMetricFamily)(
            metric.name, metric.help, value=value
        )
        for metric, value in values
    ]


class _MultiprocessHealth:
    """The health metrics as real metrics, for multiprocess mode, where custom collectors are not scraped."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.queue_depth = Gauge(
            m.STORE_QUEUE_DEPTH.name, m.STORE_QUEUE_DEPTH.help, registry=registry, multiprocess_mode="livesum"
        )
        self.spooled = Gauge(
            m.STORE_SPOOLED_RECORDS.name,
            m.STORE_SPOOLED_RECORDS.help,
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.write_errors = Counter(m.STORE_WRITE_ERRORS.name, m.STORE_WRITE_ERRORS.help, registry=registry)
        self.hook_errors = Counter(
            m.INSTRUMENTATION_ERRORS.name, m.INSTRUMENTATION_ERRORS.help, registry=registry
        )
        self.rejected = Counter(
            m.STORE_REJECTED_RECORDS.name, m.STORE_REJECTED_RECORDS.help, registry=registry
        )
        self._last = _HealthReading(0, 0, 0, 0)

    def update(self, reading: _HealthReading) -> None:
        self.queue_depth.set(reading.queue_depth)
        self.spooled.set(reading.spooled_records)
        if reading.write_errors > self._last.write_errors:
            self.write_errors.inc(reading.write_errors - self._last.write_errors)
        if reading.instrumentation_errors > self._last.instrumentation_errors:
            self.hook_errors.inc(reading.instrumentation_errors - self._last.instrumentation_errors)
        if reading.rejected_records > self._last.rejected_records:
            self.rejected.inc(reading.rejected_records - self._last.rejected_records)
        self._last = reading


@dataclass(slots=True)
class _AttemptSums:
    """What attempts counted under the same labels add up to."""

    attempts: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cost_usd: float = 0.0
    estimated_output_tokens: int = 0
    durations: list[float] = field(default_factory=list)

    def add(self, record: AttemptRecord) -> None:
        """Add one attempt."""
        self.attempts += 1
        usage = record.usage
        self.input_tokens += usage.input_tokens
        self.output_tokens += usage.output_tokens
        self.cache_read_tokens += usage.cache_read_tokens
        self.cache_write_tokens += usage.cache_write_tokens
        if record.cost is not None:
            self.cost_usd += record.cost.total_usd
        if usage.output_estimated:
            self.estimated_output_tokens += usage.estimated_output_tokens
        self.durations.append(record.duration_s)

    def tokens(self) -> dict[TokenType, int]:
        """The billed tokens keyed by :class:`TokenType`, as :meth:`Usage.by_type` keys them."""
        return {
            TokenType.INPUT: self.input_tokens,
            TokenType.OUTPUT: self.output_tokens,
            TokenType.CACHE_READ: self.cache_read_tokens,
            TokenType.CACHE_WRITE: self.cache_write_tokens,
        }


class MetricsSink:
    """A :class:`~costwatch.sinks.Sink` that counts attempts, billed and wasted tokens and cost in Prometheus.

    Registers its metrics on ``registry`` (default: prometheus_client's global ``REGISTRY``), so
    create one per registry. ``retry_window_s``, ``workflow_label_limit`` and ``model_label_limit``
    default to the ``COSTWATCH_RETRY_WINDOW``, ``COSTWATCH_WORKFLOW_LABEL_LIMIT`` and
    ``COSTWATCH_MODEL_LABEL_LIMIT`` settings. ``pipeline`` is the
    pipeline whose health is reported (default: the process-wide one). ``clock`` is monotonic seconds.
    ``otlp`` (a :class:`costwatch.otlp.OtlpMetrics`) also sends every metric over OTLP.
    """

    name = "metrics"

    def __init__(
        self,
        *,
        registry: CollectorRegistry | None = REGISTRY,
        pipeline: Any = None,
        retry_window_s: float | None = None,
        workflow_label_limit: int | None = None,
        model_label_limit: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        prices: PriceTable | None = None,
        otlp: OtlpMetrics | None = None,
    ) -> None:
        if retry_window_s is None or workflow_label_limit is None or model_label_limit is None:
            settings = load_settings()
            retry_window_s = settings.retry_window_s if retry_window_s is None else retry_window_s
            if workflow_label_limit is None:
                workflow_label_limit = settings.workflow_label_limit
            if model_label_limit is None:
                model_label_limit = settings.model_label_limit
        assert retry_window_s is not None and workflow_label_limit is not None
        assert model_label_limit is not None
        self.pipeline = pipeline
        self.registry = registry
        self._clock = clock
        self._lock = threading.RLock()
        self._settlement = WasteSettlement(retry_window_s=retry_window_s)
        self._model = LabelCap(model_label_limit)
        self._workflow = LabelCap(workflow_label_limit)
        self._prices = prices
        self._retried = _RetriedRequests()
        self._series_of: dict[tuple[int, tuple[str, ...]], Any] = {}
        """Each series' child by metric and label values, as bounded as the labels: ``labels()`` checks
        and converts its values at every call, and a record touches some fifteen series."""
        self._owed: dict[tuple[int, tuple[str, ...]], float] = {}
        """Per series, what downward corrections took off that a counter could not: paid out of
        its later increases (a counter never goes down)."""
        self._adding: dict[tuple[Any, tuple[str, ...]], float] = {}
        """Per counter and label values, what the batch being counted adds: one increment each at its
        end, so the additions and corrections of one batch net out before they reach a counter."""
        self._multiprocess_health: _MultiprocessHealth | None = None
        if multiprocess_mode():
            self._multiprocess_health = _MultiprocessHealth(registry)
        elif registry is not None:
            registry.register(_HealthCollector(self))
        self._otlp = otlp
        if otlp is not None:
            otlp.observe_families(
                _health_families(_HealthReading(0, 0, 0, 0)),
                lambda: _health_families(_read_health(self.pipeline)),
            )

        def counter(metric: m.Metric) -> Any:
            prometheus = Counter(metric.name, metric.help, metric.labels, registry=registry)
            return prometheus if otlp is None else otlp.counter(prometheus, metric)

        def histogram(metric: m.Metric, buckets: Sequence[float]) -> Any:
            prometheus = Histogram(
                metric.name, metric.help, metric.labels, registry=registry, buckets=buckets
            )
            return prometheus if otlp is None else otlp.histogram(prometheus, metric, buckets)

        self.attempts = counter(m.ATTEMPTS)
        self.billed_tokens = counter(m.BILLED_TOKENS)
        self.wasted_tokens = counter(m.WASTED_TOKENS)
        self.billed_cost = counter(m.BILLED_COST)
        self.wasted_cost = counter(m.WASTED_COST)
        self.estimated_output_tokens = counter(m.ESTIMATED_OUTPUT_TOKENS)
        self.output_tokens = counter(m.OUTPUT_TOKENS)
        self.logical_requests = counter(m.LOGICAL_REQUESTS)
        self.avoidable_waste = counter(m.AVOIDABLE_WASTE)
        self.unpriced_attempts = counter(m.UNPRICED_ATTEMPTS)
        # By platform apart from the metrics above, whose label sets stay as they were for the
        # dashboards and alert rules built on them; the fleet exporter has the same four.
        self.platform_attempts = counter(m.PLATFORM_ATTEMPTS)
        self.platform_billed_tokens = counter(m.PLATFORM_BILLED_TOKENS)
        self.platform_billed_cost = counter(m.PLATFORM_BILLED_COST)
        self.platform_unpriced_attempts = counter(m.PLATFORM_UNPRICED_ATTEMPTS)
        self.attempt_duration = histogram(m.ATTEMPT_DURATION, DURATION_BUCKETS)
        self.time_to_drop = histogram(m.TIME_TO_DROP, DURATION_BUCKETS)
        self.attempts_per_request = histogram(m.ATTEMPTS_PER_REQUEST, ATTEMPTS_PER_REQUEST_BUCKETS)

    def use_prices(self, prices: PriceTable) -> None:
        """Price avoidable waste with ``prices`` from the next batch on (a later ``instrument()``'s
        table: the process's sink outlives the call that made it)."""
        with self._lock:
            self._prices = prices

    # -- the Sink protocol -------------------------------------------------------------------------
    def export(self, records: Sequence[AttemptRecord]) -> None:
        """Count a batch of records; idempotent on ``attempt_id`` and ``revision``."""
        with self._lock:
            self._apply(self._settlement.observe(records, self._clock()))
            self._count_avoidable(records)
        self._update_multiprocess_health()

    def shutdown(self) -> None:
        """Settle every pending waste and logical request, as the process will not see their retries.

        With OTLP export, what that settled is exported now: the process may be about to exit.
        """
        self.settle()
        if self._otlp is not None:
            self._otlp.flush()

    # -- settlement --------------------------------------------------------------------------------
    def settle_due(self) -> None:
        """Count waste and logical requests whose retry window has passed (also done at each scrape)."""
        with self._lock:
            self._apply(self._settlement.settle_due(self._clock()))

    def settle(self) -> None:
        """Count everything pending now: waiting waste as ``abandoned``, waiting requests as failed."""
        with self._lock:
            self._apply(self._settlement.settle_all())
        self._update_multiprocess_health()

    # -- internals ---------------------------------------------------------------------------------
    def _apply(self, settlement: Settlement) -> None:
        """Count what ``settlement`` made countable: each counter series once, by the batch's sum for it."""
        self._count_attempts(settlement.new_attempts)
        for waste in settlement.waste:
            self._count_waste(waste.record, waste.reason)
        for correction in settlement.corrections:
            self._correct(correction)
        self._count_requests(settlement.requests)
        self._add_up()

    def _count_requests(self, requests: Sequence[SettledRequest]) -> None:
        """Count settled logical requests, grouped first by model and result (a batch of similar calls
        is one or two groups): each group's counter series and histogram child are looked up once."""
        attempts_by_group: dict[tuple[str, bool], list[int]] = {}
        for request in requests:
            key = (request.last.model_name, request.succeeded)
            attempts_by_group.setdefault(key, []).append(request.last.attempt_number)
        for (model_name, succeeded), attempts in attempts_by_group.items():
            model = self._model(model_name)
            self._add(self.logical_requests, (model, "succeeded" if succeeded else "failed"), len(attempts))
            self._observe(self.attempts_per_request, (model,), attempts)

    def _count_attempts(self, records: Sequence[AttemptRecord]) -> None:
        """Count attempts seen for the first time, summed first by the labels they count under (the
        records of a batch of similar calls fall into a few groups)."""
        groups: dict[tuple[str, str, str, Outcome, str, OutputSource, bool], _AttemptSums] = {}
        for record in records:
            key = (
                record.model_name,
                record.workflow,
                record.platform,
                record.outcome,
                record.error_label,
                record.output_source,
                record.cost is None,
            )
            sums = groups.get(key)
            if sums is None:
                sums = groups[key] = _AttemptSums()
            sums.add(record)
        for key, sums in groups.items():
            model_name, workflow_name, platform_name, outcome, error_label, source, unpriced = key
            model = self._model(model_name)
            workflow = self._workflow(workflow_name)
            platform = platform_label(platform_name)
            self._add(self.attempts, (model, outcome.value, error_label), sums.attempts)
            self._add(self.platform_attempts, (platform, outcome.value), sums.attempts)
            for token_type, tokens in sums.tokens().items():
                self._add(self.billed_tokens, (model, token_type.value), tokens)
                self._add(self.platform_billed_tokens, (platform, token_type.value), tokens)
            self._add(self.billed_cost, (model, workflow), sums.cost_usd)
            self._add(self.platform_billed_cost, (platform,), sums.cost_usd)
            if unpriced:
                self._add(self.unpriced_attempts, (model,), sums.attempts)
                self._add(self.platform_unpriced_attempts, (platform,), sums.attempts)
            self._add(self.estimated_output_tokens, (model,), sums.estimated_output_tokens)
            if sums.output_tokens:
                self._add(self.output_tokens, (model, source.value), sums.output_tokens)
            self._observe(self.attempt_duration, (model, outcome.value), sums.durations)
            if outcome is Outcome.DROPPED:
                self._observe(self.time_to_drop, (model,), sums.durations)

    def _count_waste(self, record: AttemptRecord, reason: WasteReason) -> None:
        model = self._model(record.model_name)
        workflow = self._workflow(record.workflow)
        for token_type, tokens in record.usage.by_type().items():
            self._add(self.wasted_tokens, (model, token_type.value, reason.value, workflow), tokens)
        self._add(
            self.wasted_cost,
            (model, reason.value, workflow),
            record.cost.total_usd if record.cost is not None else 0.0,
        )

    def _correct(self, correction: Correction) -> None:
        """Count the difference a revised estimate makes, wherever the attempt was counted."""
        old, new = correction.old, correction.new
        model = self._model(new.model_name)
        workflow = self._workflow(new.workflow)
        output = new.usage.output_tokens - old.usage.output_tokens
        estimated = new.usage.estimated_output_tokens - old.usage.estimated_output_tokens
        cost = (new.cost.total_usd if new.cost is not None else 0.0) - (
            old.cost.total_usd if old.cost is not None else 0.0
        )
        platform = platform_label(new.platform)
        self._add(self.billed_tokens, (model, TokenType.OUTPUT.value), output)
        self._add(self.platform_billed_tokens, (platform, TokenType.OUTPUT.value), output)
        self._add(self.billed_cost, (model, workflow), cost)
        self._add(self.platform_billed_cost, (platform,), cost)
        self._add(self.estimated_output_tokens, (model,), estimated)
        self._add(self.output_tokens, (model, new.output_source.value), output)
        if correction.settled is not None:
            reason = correction.settled.value
            self._add(self.wasted_tokens, (model, TokenType.OUTPUT.value, reason, workflow), output)
            self._add(self.wasted_cost, (model, reason, workflow), cost)

    def _series(self, metric: Any, *labels: str) -> Any:
        """The child of ``metric`` for ``labels`` (created at first use), as ``metric.labels(*labels)``."""
        key = (id(metric), labels)
        series = self._series_of.get(key)
        if series is None:
            series = self._series_of[key] = metric.labels(*labels)
        return series

    def _observe(self, metric: Any, labels: tuple[str, ...], values: Sequence[float]) -> None:
        """Observe ``values`` in order on a histogram's series, at once (:func:`observe_all`)."""
        series = self._series(metric, *labels)
        if self._otlp is None:
            observe_all(series, values)
        else:
            series.observe_all(values)  # a Tee's child: into OpenTelemetry too

    def _add(self, metric: Any, labels: tuple[str, ...], amount: float) -> None:
        """Add ``amount`` (a correction may make it negative) to the batch's sum for a counter's series."""
        key = (metric, labels)
        self._adding[key] = self._adding.get(key, 0) + amount

    def _add_up(self) -> None:
        """Increment each series by what the batch added to it (a record touches some fifteen series,
        a batch of similar records the same fifteen), paying what downward corrections owe first."""
        adding, self._adding = self._adding, {}
        for (metric, labels), amount in adding.items():
            key = (id(metric), labels)
            if amount == 0 and key in self._series_of:
                continue  # most token types of most attempts: the series is shown (at 0) already
            if amount >= 0 and not self._owed:
                self._series(metric, *labels).inc(amount)
                continue
            owed = self._owed.pop(key, 0.0) - amount
            if owed > 0:
                self._owed[key] = owed
            else:
                self._series(metric, *labels).inc(-owed)

    def _count_avoidable(self, records: Sequence[AttemptRecord]) -> None:
        if self._prices is None:
            self._prices = load_prices()
        for request_id in self._retried.observe(records):
            attempts = self._retried.attempts(request_id)
            found = avoidable_for_request(attempts, self._prices)
            if found is None or found.avoidable_usd is None:
                continue
            # A counter only rises: a request's figure is counted as it grows with its retries.
            more = found.avoidable_usd - self._retried.counted(request_id, found.avoidable_usd)
            self._series(self.avoidable_waste, self._model(found.model), self._workflow(found.workflow)).inc(
                max(more, 0.0)
            )

    def _update_multiprocess_health(self) -> None:
        if self._multiprocess_health is not None:
            self._multiprocess_health.update(_read_health(self.pipeline))


def start_metrics_server(
    port: int, addr: str = "127.0.0.1", registry: CollectorRegistry | None = None
) -> Any:
    """Serve ``/metrics`` for ``registry`` (default: the global one) on a daemon thread; returns the server.

    Binds to localhost unless told otherwise; in multiprocess mode serve a registry holding a
    ``prometheus_client.multiprocess.MultiProcessCollector`` instead (see ``docs/metrics.md``).
    """
    try:
        server, _thread = start_http_server(
            port, addr=addr, registry=registry if registry is not None else REGISTRY
        )
    except OSError as exc:
        # The bare "[Errno 98] Address already in use" names neither the port nor what to do.
        raise OSError(
            exc.errno,
            f"costwatch cannot serve metrics on {addr}:{port}: {exc.strerror or exc}; choose another port",
        ) from exc
    return server
