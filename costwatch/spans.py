"""OpenTelemetry spans, one per HTTP attempt, with what the attempt billed and whether it was wasted.

``SpanListener`` is an :class:`~costwatch.sinks.AttemptListener`: the SDK hooks call it on the
application's thread when an attempt is sent and when it ends. The span starts at that moment, so
its parent is whatever span is current, which on anthropic 2.x with SDK tracing on is the SDK's own
``anthropic.messages.create`` call span (one per API call, covering all its retries); each attempt's
span is then a child of it. A retry's span links to the spans of the earlier attempts of its logical
request. Attribute names follow the GenAI semantic conventions (see :mod:`costwatch.semconv` and
``docs/tracing.md``). No prompt or completion text is ever recorded.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import (
    Link,
    ProxyTracerProvider,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TracerProvider,
)

from . import semconv
from ._version import __version__
from .platforms import ANTHROPIC
from .records import AttemptRecord, AttemptStart

__all__ = ["INSTRUMENTATION_SCOPE", "SpanListener", "attempt_attributes", "error_type_of", "span_name"]

INSTRUMENTATION_SCOPE = "costwatch"
"""The tracer name of costwatch's spans."""


def span_name(model: str) -> str:
    """``chat {model}``, the conventions' ``{gen_ai.operation.name} {gen_ai.request.model}``."""
    return f"{semconv.OPERATION_CHAT} {model}" if model else semconv.OPERATION_CHAT


def error_type_of(record: AttemptRecord) -> str | None:
    """The low-cardinality ``error.type`` of a failed attempt, ``None`` for a completed one.

    The exception class the application saw, else the API's error type (``overloaded_error``),
    else the HTTP status, else the attempt's outcome (``cancelled``, ``dropped``).
    """
    if not record.outcome.failed:
        return None
    if record.error_type:
        return record.error_type
    if record.api_error_type:
        return record.api_error_type
    if record.http_status is not None and record.http_status >= 400:
        return str(record.http_status)
    return record.outcome.value


def attempt_attributes(record: AttemptRecord, names: semconv.GenAINames = semconv.V1_41) -> dict[str, Any]:
    """The span attributes of a finished attempt, in the conventions named by ``names``."""
    usage = record.usage
    attributes: dict[str, Any] = {
        semconv.OPERATION_NAME: semconv.OPERATION_CHAT,
        semconv.PROVIDER_NAME: semconv.PROVIDER_BY_PLATFORM.get(record.platform, semconv.PROVIDER_ANTHROPIC),
        # Anthropic's input_tokens excludes cache reads and writes; the conventions' count includes them.
        semconv.INPUT_TOKENS: usage.input_tokens + usage.cache_read_tokens + usage.cache_write_tokens,
        semconv.OUTPUT_TOKENS: usage.output_tokens,
        semconv.CACHE_READ_INPUT_TOKENS: usage.cache_read_tokens,
        names.cache_write_input_tokens: usage.cache_write_tokens,
        semconv.ATTEMPT_NUMBER: record.attempt_number,
        semconv.LOGICAL_REQUEST_ID: record.logical_request_id,
        semconv.OUTCOME: record.outcome.value,
        semconv.WASTED_TOKENS: record.wasted_tokens,
        semconv.OUTPUT_ESTIMATED: usage.output_estimated,
        semconv.OUTPUT_SOURCE: record.output_source.value,
    }
    if record.model_requested:
        attributes[semconv.REQUEST_MODEL] = record.model_requested
    if record.model:
        attributes[semconv.RESPONSE_MODEL] = record.model
    if record.message_id:
        attributes[semconv.RESPONSE_ID] = record.message_id
    if record.stop_reason:
        attributes[semconv.RESPONSE_FINISH_REASONS] = (record.stop_reason,)
    error_type = error_type_of(record)
    if error_type is not None:
        attributes[semconv.ERROR_TYPE] = error_type
    if record.wasted and record.waste_reason is not None:
        attributes[semconv.WASTE_REASON] = record.waste_reason.value
    attributes[semconv.COST_PRICED] = record.priced
    if record.cost is not None:
        attributes[semconv.COST_USD] = record.cost.total_usd
    if names.request_stream is not None:
        attributes[names.request_stream] = record.stream
    if names.response_time_to_first_chunk is not None and record.time_to_first_token_s is not None:
        attributes[names.response_time_to_first_chunk] = record.time_to_first_token_s
    if record.platform != ANTHROPIC:
        attributes[semconv.PLATFORM] = record.platform  # first-party spans keep their exact attribute set
    return attributes


def _ns(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000_000)


@dataclass(frozen=True, slots=True)
class _OpenSpan:
    span: Span
    start_ns: int


class SpanListener:
    """Starts a CLIENT span ``chat {model}`` when an attempt is sent and ends it with the attempt's record.

    ``tracer_provider`` defaults to the global one. ``environ`` (default ``os.environ``) is read
    once for ``OTEL_SEMCONV_STABILITY_OPT_IN``. Up to ``max_requests`` logical requests are
    remembered for linking retries, each with its last ``max_links`` attempt spans.
    """

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        max_requests: int = 10_000,
        max_links: int = 16,
    ) -> None:
        self.names = semconv.gen_ai_names(environ)
        self.max_requests = max_requests
        self.max_links = max_links
        self._tracer = trace.get_tracer(INSTRUMENTATION_SCOPE, __version__, tracer_provider=tracer_provider)
        self._global = tracer_provider is None
        self._lock = threading.Lock()
        self._earlier: OrderedDict[str, tuple[SpanContext, ...]] = OrderedDict()

    def attempt_started(self, attempt: AttemptStart) -> object:
        """Start the attempt's span as a child of the current span, linked to earlier attempts' spans.

        Nothing, while the application has set no global tracer provider: every span would be a
        no-op one. The first attempt after it sets one gets its span.
        """
        if self._global and isinstance(trace.get_tracer_provider(), ProxyTracerProvider):
            return None
        start_ns = _ns(attempt.started_at)
        with self._lock:
            earlier = self._earlier.get(attempt.logical_request_id, ())
        links = [Link(context) for context in earlier]
        attributes: dict[str, Any] = {
            semconv.OPERATION_NAME: semconv.OPERATION_CHAT,
            semconv.PROVIDER_NAME: semconv.PROVIDER_ANTHROPIC,
            semconv.ATTEMPT_NUMBER: attempt.attempt_number,
            semconv.LOGICAL_REQUEST_ID: attempt.logical_request_id,
        }
        if attempt.model_requested:
            attributes[semconv.REQUEST_MODEL] = attempt.model_requested
        span = self._tracer.start_span(
            span_name(attempt.model_requested),
            kind=SpanKind.CLIENT,
            attributes=attributes,
            links=links,
            start_time=start_ns,
        )
        context = span.get_span_context()
        if context.is_valid:
            with self._lock:
                self._earlier[attempt.logical_request_id] = (*earlier, context)[-self.max_links :]
                self._earlier.move_to_end(attempt.logical_request_id)
                while len(self._earlier) > self.max_requests:
                    self._earlier.popitem(last=False)
        return _OpenSpan(span, start_ns)

    def attempt_finished(self, state: object, record: AttemptRecord) -> None:
        """Set the record's attributes and status on the span and end it at the attempt's end."""
        if not isinstance(state, _OpenSpan):
            return
        span = state.span
        if span.is_recording():
            span.set_attributes(attempt_attributes(record, self.names))
            if record.outcome.failed:
                span.set_status(Status(StatusCode.ERROR, error_type_of(record)))
        span.end(end_time=state.start_ns + int(record.duration_s * 1_000_000_000))
