"""OpenTelemetry spans, one per HTTP attempt, with what the attempt billed and whether it was wasted.

``SpanListener`` is an :class:`~costwatch.sinks.AttemptListener`: the SDK hooks call it on the
application's thread when an attempt is sent and when it ends. The span starts at that moment, so
its parent is whatever span is current, which on anthropic 2.x with SDK tracing on is the SDK's own
``anthropic.messages.create`` call span (one per API call, covering all its retries); each attempt's
span is then a child of it. A retry's span links to the spans of the earlier attempts of its logical
request. Attribute names follow the GenAI semantic conventions (see :mod:`costwatch.semconv` and
``docs/tracing.md``). No prompt or completion text is ever recorded.

An ended span cannot change. The span of a cut stream whose text is counted ends when the count
arrives (at the attempt's end time), so it carries the counted figure; an estimate revised later,
as the calibration improves, gets a short ``revise output`` span linked to the attempt's span.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
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
from .records import AttemptRecord, AttemptStart, OutputSource

__all__ = [
    "INSTRUMENTATION_SCOPE",
    "REVISION_SPAN_NAME",
    "SpanListener",
    "attempt_attributes",
    "error_type_of",
    "revision_attributes",
    "span_name",
]

INSTRUMENTATION_SCOPE = "costwatch"
"""The tracer name of costwatch's spans."""

REVISION_SPAN_NAME = "revise output"
"""The name of the span that carries a later figure of an attempt whose span has ended."""


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


def revision_attributes(record: AttemptRecord, previous_output_tokens: int) -> dict[str, Any]:
    """The attributes of the span of ``record``'s revised output; the attempt's span (or the last
    revision span) carried ``previous_output_tokens``."""
    attributes: dict[str, Any] = {
        semconv.LOGICAL_REQUEST_ID: record.logical_request_id,
        semconv.ATTEMPT_NUMBER: record.attempt_number,
        semconv.REVISION_NUMBER: record.revision,
        semconv.REVISION_MODEL: record.model_name,
        semconv.REVISION_OUTPUT_TOKENS: record.usage.output_tokens,
        semconv.REVISION_PREVIOUS_OUTPUT_TOKENS: previous_output_tokens,
        semconv.OUTPUT_SOURCE: record.output_source.value,
    }
    if record.cost is not None:
        attributes[semconv.REVISION_COST_USD] = record.cost.total_usd
    return attributes


def _ns(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000_000)


@dataclass(frozen=True, slots=True)
class _OpenSpan:
    span: Span
    start_ns: int


_PROVIDER_VARIABLE = "OTEL_PYTHON_TRACER_PROVIDER"
"""The variable that names a global tracer provider for OpenTelemetry to load at first use."""
_UNKNOWN = object()


class SpanListener:
    """Starts a CLIENT span ``chat {model}`` when an attempt is sent and ends it with the attempt's record.

    ``tracer_provider`` defaults to the global one. ``environ`` (default ``os.environ``) is read
    once for ``OTEL_SEMCONV_STABILITY_OPT_IN``. Up to ``max_requests`` logical requests are
    remembered for linking retries, each with its last ``max_links`` attempt spans; and the spans of
    the ``max_revisable`` most recent attempts whose output was estimated, for linking the span of a
    revised estimate (:meth:`attempt_revised`).
    """

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        max_requests: int = 10_000,
        max_links: int = 16,
        max_revisable: int = 10_000,
    ) -> None:
        self.names = semconv.gen_ai_names(environ)
        self.max_requests = max_requests
        self.max_links = max_links
        self.max_revisable = max_revisable
        self._tracer = trace.get_tracer(INSTRUMENTATION_SCOPE, __version__, tracer_provider=tracer_provider)
        self._global = tracer_provider is None
        self._provider_named_in_environment = _PROVIDER_VARIABLE in os.environ
        self._lock = threading.Lock()
        self._earlier: OrderedDict[str, tuple[SpanContext, ...]] = OrderedDict()
        self._revisable: OrderedDict[str, tuple[SpanContext, int]] = OrderedDict()
        """Per estimated attempt, its span and the output figure last put on a span. Ids only, in memory."""

    def attempt_started(self, attempt: AttemptStart) -> object:
        """Start the attempt's span as a child of the current span, linked to earlier attempts' spans.

        Nothing, while the application has set no global tracer provider: every span would be a
        no-op one. The first attempt after it sets one gets its span.
        """
        if not self.is_listening():
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

    def is_listening(self) -> bool:
        """Whether an attempt sent now gets a span: with the global tracer provider, only once the
        application has set one (until then every span would be a no-op one), so the hooks need not
        tell this listener of attempts before.

        ``trace.get_tracer_provider()`` would answer, but while none is set it looks its environment
        variable up in ``os.environ`` at every call (a ``KeyError`` raised and caught each time), on
        the caller's thread of every attempt. The variable is looked up once, at construction; then,
        unless it names a provider (which OpenTelemetry loads at that call), the module's global
        says whether one was set. Were that global gone from a later OpenTelemetry, the call decides.
        """
        if not self._global:
            return True
        provider = getattr(trace, "_TRACER_PROVIDER", _UNKNOWN)
        if provider is _UNKNOWN or (provider is None and self._provider_named_in_environment):
            return not isinstance(trace.get_tracer_provider(), ProxyTracerProvider)
        return provider is not None

    def attempt_finished(self, state: object, record: AttemptRecord) -> None:
        """Set the record's attributes and status on the span and end it at the attempt's end.

        Called when the attempt ends, or, for a cut stream whose text is being counted, when the count
        arrives or its wait ends (on costwatch's counting thread): the span then carries the count.
        """
        if not isinstance(state, _OpenSpan):
            return
        span = state.span
        recording = span.is_recording()
        if recording:
            span.set_attributes(attempt_attributes(record, self.names))
            if record.outcome.failed:
                span.set_status(Status(StatusCode.ERROR, error_type_of(record)))
        span.end(end_time=state.start_ns + int(record.duration_s * 1_000_000_000))
        if recording and record.output_source is OutputSource.ESTIMATED and record.output_chars:
            with self._lock:
                self._revisable[record.attempt_id] = (span.get_span_context(), record.usage.output_tokens)
                while len(self._revisable) > self.max_revisable:
                    self._revisable.popitem(last=False)

    def attempt_revised(self, record: AttemptRecord) -> None:
        """A later figure for an attempt whose span has ended: a ``revise output`` span linked to it.

        Only for attempts this listener made a span for (the process's own, among the most recent
        ``max_revisable`` estimated ones), and only when the output figure changed. The span is a
        root span of its own trace (the attempt's trace may long be complete), INTERNAL, instant.
        """
        with self._lock:
            remembered = self._revisable.get(record.attempt_id)
            if remembered is None:
                return
            context, previous = remembered
            now = record.usage.output_tokens
            if now == previous:
                return
            if record.output_source is OutputSource.ESTIMATED:
                self._revisable[record.attempt_id] = (context, now)  # it may be revised again
            else:
                del self._revisable[record.attempt_id]
        span = self._tracer.start_span(
            REVISION_SPAN_NAME,
            context=Context(),  # a root: never a child of whatever is current on this thread
            kind=SpanKind.INTERNAL,
            attributes=revision_attributes(record, previous),
            links=[Link(context)],
        )
        span.end()
