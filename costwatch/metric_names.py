"""Every metric costwatch exposes, defined once: its name, help, type, unit and labels.

The in-process sink (:mod:`costwatch.metrics`, with its health metrics), the fleet exporter
(:mod:`costwatch.exporter`, ``costwatch serve``) and the OTLP path (:mod:`costwatch.otlp`) all read
their metrics from here, as :mod:`costwatch.semconv` does for span attributes, so a metric has the
same help text wherever it is served; ``docs/metrics.md`` lists the same names and labels (a test
holds it to this table). Names are Prometheus base names: a counter is exposed with ``_total``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = [
    "ATTEMPTS",
    "ATTEMPTS_PER_REQUEST",
    "ATTEMPT_DURATION",
    "AVOIDABLE_WASTE",
    "BILLED_COST",
    "BILLED_TOKENS",
    "ESTIMATED_OUTPUT_TOKENS",
    "INSTRUMENTATION_ERRORS",
    "LAST_RECONCILIATION",
    "LOGICAL_REQUESTS",
    "METRICS",
    "OUTPUT_TOKENS",
    "PENDING_ABANDONED_ATTEMPTS",
    "PENDING_ABANDONED_COST",
    "PLATFORM_ATTEMPTS",
    "PLATFORM_BILLED_COST",
    "PLATFORM_BILLED_TOKENS",
    "PLATFORM_UNPRICED_ATTEMPTS",
    "RECONCILED_COVERAGE",
    "RECONCILED_DROPPED_OUTPUT",
    "RECONCILED_WASTED_COST",
    "STORE_QUEUE_DEPTH",
    "STORE_REJECTED_RECORDS",
    "STORE_SPOOLED_RECORDS",
    "STORE_WRITE_ERRORS",
    "TIME_TO_DROP",
    "UNPRICED_ATTEMPTS",
    "UNSEEN_COST",
    "UP",
    "WASTED_COST",
    "WASTED_TOKENS",
    "Metric",
]


@dataclass(frozen=True)
class Metric:
    """One metric: what Prometheus and OpenTelemetry are told about it."""

    name: str
    """The Prometheus base name (a counter's samples add ``_total``); also the OpenTelemetry name."""
    help: str
    kind: Literal["counter", "gauge", "histogram"]
    unit: str
    """The UCUM unit OpenTelemetry is given (``1`` for a ratio)."""
    labels: tuple[str, ...] = ()

    @property
    def exposed_name(self) -> str:
        """The name of its samples in the Prometheus exposition (a histogram's, before ``_bucket``)."""
        return f"{self.name}_total" if self.kind == "counter" else self.name


# -- what attempts billed and wasted: in process (MetricsSink) and for the fleet (costwatch serve) ---
ATTEMPTS = Metric(
    "costwatch_attempts",
    "HTTP attempts to the Messages API.",
    "counter",
    "{attempt}",
    ("model", "outcome", "error_type"),
)
BILLED_TOKENS = Metric(
    "costwatch_billed_tokens", "Tokens billed, by token type.", "counter", "{token}", ("model", "token_type")
)
WASTED_TOKENS = Metric(
    "costwatch_wasted_tokens",
    "Billed tokens of failed attempts, counted once their waste reason is settled "
    "(abandoned: once the retry window has passed).",
    "counter",
    "{token}",
    ("model", "token_type", "reason", "workflow"),
)
BILLED_COST = Metric(
    "costwatch_billed_cost_usd",
    "Cost of billed tokens in US dollars.",
    "counter",
    "USD",
    ("model", "workflow"),
)
WASTED_COST = Metric(
    "costwatch_wasted_cost_usd",
    "Cost of wasted tokens in US dollars, counted once their waste reason is settled "
    "(abandoned: once the retry window has passed).",
    "counter",
    "USD",
    ("model", "reason", "workflow"),
)
ESTIMATED_OUTPUT_TOKENS = Metric(
    "costwatch_estimated_output_tokens",
    "Output tokens estimated from the text received before a stream was cut.",
    "counter",
    "{token}",
    ("model",),
)
OUTPUT_TOKENS = Metric(
    "costwatch_output_tokens",
    "Billed output tokens by where the figure came from: reported, estimated, counted, reconciled.",
    "counter",
    "{token}",
    ("model", "source"),
)
UNPRICED_ATTEMPTS = Metric(
    "costwatch_unpriced_attempts",
    "Attempts on models without a known price: their tokens are counted, their cost is not.",
    "counter",
    "{attempt}",
    ("model",),
)
LOGICAL_REQUESTS = Metric(
    "costwatch_logical_requests",
    "Logical requests (an attempt and its retries), by result: succeeded when an attempt completes, "
    "failed once the retry window has passed after its last attempt failed.",
    "counter",
    "{request}",
    ("model", "result"),
)
ATTEMPT_DURATION = Metric(
    "costwatch_attempt_duration_seconds",
    "How long attempts took, from sending the request to the end of the body.",
    "histogram",
    "s",
    ("model", "outcome"),
)
TIME_TO_DROP = Metric(
    "costwatch_time_to_drop_seconds",
    "How long dropped attempts ran before the connection was lost.",
    "histogram",
    "s",
    ("model",),
)

# -- in process only -------------------------------------------------------------------------------
AVOIDABLE_WASTE = Metric(
    "costwatch_avoidable_waste_usd",
    "Wasted US dollars that prompt caching of the retried requests' stable prefix would have saved.",
    "counter",
    "USD",
    ("model", "workflow"),
)
ATTEMPTS_PER_REQUEST = Metric(
    "costwatch_attempts_per_request",
    "Attempts a logical request took, observed when its result settles.",
    "histogram",
    "{attempt}",
    ("model",),
)
PLATFORM_ATTEMPTS = Metric(
    "costwatch_platform_attempts",
    "HTTP attempts by the platform they went to (anthropic, bedrock, vertex, foundry).",
    "counter",
    "{attempt}",
    ("platform", "outcome"),
)
PLATFORM_BILLED_TOKENS = Metric(
    "costwatch_platform_billed_tokens",
    "Tokens billed, by the platform that billed them and token type.",
    "counter",
    "{token}",
    ("platform", "token_type"),
)
PLATFORM_BILLED_COST = Metric(
    "costwatch_platform_billed_cost_usd",
    "Cost of billed tokens in US dollars, by the platform that billed them.",
    "counter",
    "USD",
    ("platform",),
)
PLATFORM_UNPRICED_ATTEMPTS = Metric(
    "costwatch_platform_unpriced_attempts",
    "Attempts without a known price on their platform: their tokens are counted, their cost is not.",
    "counter",
    "{attempt}",
    ("platform",),
)

# -- costwatch's own health ------------------------------------------------------------------------
STORE_QUEUE_DEPTH = Metric(
    "costwatch_store_queue_depth", "Attempt records waiting in memory for the sinks.", "gauge", "{record}"
)
STORE_SPOOLED_RECORDS = Metric(
    "costwatch_store_spooled_records",
    "Attempt records in the local spool waiting to be replayed to a sink.",
    "gauge",
    "{record}",
)
STORE_WRITE_ERRORS = Metric(
    "costwatch_store_write_errors",
    "Failed sink exports (each failed batch or replay counts once).",
    "counter",
    "{error}",
)
INSTRUMENTATION_ERRORS = Metric(
    "costwatch_instrumentation_errors",
    "Errors inside costwatch's SDK hooks (the application was unaffected).",
    "counter",
    "{error}",
)
STORE_REJECTED_RECORDS = Metric(
    "costwatch_store_rejected_records",
    "Attempt records the store refused to hold, kept in costwatch_rejected_attempts and never retried "
    "(from costwatch serve: the whole store's).",
    "counter",
    "{record}",
)

# -- the fleet exporter only -----------------------------------------------------------------------
UP = Metric("costwatch_up", "Whether the last read of the store worked.", "gauge", "1")
PENDING_ABANDONED_ATTEMPTS = Metric(
    "costwatch_pending_abandoned_attempts",
    "Abandoned attempts of hours not settled yet: they may still turn retried, and are not in "
    "costwatch_wasted_* until their hour settles.",
    "gauge",
    "{attempt}",
    ("model",),
)
PENDING_ABANDONED_COST = Metric(
    "costwatch_pending_abandoned_cost_usd",
    "Cost of the abandoned attempts of hours not settled yet (US dollars).",
    "gauge",
    "USD",
    ("model",),
)
RECONCILED_COVERAGE = Metric(
    "costwatch_reconciled_coverage_ratio",
    "Tokens costwatch recorded / tokens Anthropic's usage report billed, over the buckets of the "
    "last 24 hours that costwatch reconcile stored.",
    "gauge",
    "1",
    ("model", "token_type"),
)
UNSEEN_COST = Metric(
    "costwatch_unseen_cost_usd",
    "Cost of the tokens Anthropic billed that costwatch never saw, over the reconciled buckets of "
    "the last 24 hours (US dollars; models without a price count 0).",
    "gauge",
    "USD",
)
LAST_RECONCILIATION = Metric(
    "costwatch_last_reconciliation_timestamp_seconds",
    "When costwatch reconcile last stored a reconciliation (Unix time).",
    "gauge",
    "s",
)
RECONCILED_DROPPED_OUTPUT = Metric(
    "costwatch_reconciled_dropped_output_tokens",
    "Output of dropped attempts in the fully seen reconciled buckets of the last 24 hours: "
    "source=estimated by costwatch, source=billed per Anthropic's usage report.",
    "gauge",
    "{token}",
    ("model", "source"),
)
RECONCILED_WASTED_COST = Metric(
    "costwatch_reconciled_wasted_cost_usd",
    "Wasted dollars of the dropped attempts whose estimates the bill corrected, in the reconciled "
    "buckets of the last 24 hours: source=estimated as costwatch first had them, source=billed as "
    "they are now (US dollars).",
    "gauge",
    "USD",
    ("model", "source"),
)

METRICS: dict[str, Metric] = {
    metric.name: metric for metric in list(globals().values()) if isinstance(metric, Metric)
}
"""Every metric above, by name."""
