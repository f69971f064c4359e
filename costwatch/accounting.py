"""The accounting of one attempt: what it sent, what it billed, how it ended, and its record.

The hooks in :mod:`costwatch.instrumentation` open an :class:`Attempt` with :meth:`Accountant.begin`
when the SDK sends a request, feed its body to the attempt's meter as the application reads it, and
settle it when the body ends; settling classifies the outcome, prices what was billed and hands the
:class:`~costwatch.records.AttemptRecord` to the pipeline. Nothing here knows the HTTP library.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import json
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any

from . import context, waste_budget
from .attribution import RetryTracker
from .estimation import OutputEstimator
from .event_stream import CONTENT_TYPE as EVENT_STREAM_CONTENT_TYPE
from .health import guarded, instrumentation_errors
from .partial_output import CountTarget, PartialOutputCounter, count_target
from .pipeline import Pipeline
from .platforms import ANTHROPIC, canonical_model, route_of
from .pricing import PriceTable
from .prompt_prefix import PromptSize, measure
from .records import AttemptRecord, AttemptStart, Cost, Outcome, OutputSource, Usage, fingerprint_of, new_id
from .sinks import AttemptListener
from .stream_meter import BodyMeter

__all__ = ["Accountant", "Attempt", "in_flight", "is_stop", "response_headers", "wanted_headers"]

_CANCELLATIONS = (GeneratorExit, KeyboardInterrupt, SystemExit)


# The thread or task that began the last attempt in this context, and that attempt's logical request:
# an SDK-internal retry (``x-stainless-retry-count`` > 0) always runs in the same context as the
# attempt it repeats, and an application's resend usually does. The owner is kept with the id
# because a task starts with a copy of its parent's context: a value it inherited is not its own.
_last_logical_request: contextvars.ContextVar[tuple[object, str] | None] = contextvars.ContextVar(
    "costwatch_last_logical_request", default=None
)


_NO_TOOL_USE: Mapping[str, int] = MappingProxyType({})
_NO_CHARS: Mapping[str, int] = MappingProxyType({})
_NO_USAGE = Usage()
_INPUT_UNBILLED = (Outcome.HTTP_ERROR, Outcome.CONNECT_ERROR)
"""Outcomes whose request never reached a model: nothing of them is billed."""


def _tell_finished(states: Sequence[tuple[AttemptListener, object]], record: AttemptRecord) -> None:
    for listener, state in states:
        guarded("listener_finish", listener.attempt_finished, state, record)


class Accountant:
    """Turns observed attempts into records: attribution, estimation, pricing, then the pipeline."""

    def __init__(
        self,
        *,
        pipeline: Pipeline,
        prices: PriceTable,
        estimator: OutputEstimator | None = None,
        tracker: RetryTracker | None = None,
        listeners: Iterable[AttemptListener] = (),
        count_partial_output_rate: float | None = None,
    ) -> None:
        self.listeners = tuple(listeners)
        # A listener with an ``is_listening()`` that answers False (the span listener while no tracer
        # provider is set) is told of neither the attempt nor its end: it would do nothing with them.
        self._asks = tuple((listener, getattr(listener, "is_listening", None)) for listener in self.listeners)
        self.pipeline = pipeline
        self.prices = prices
        self.estimator = estimator or OutputEstimator()
        self.tracker = tracker or RetryTracker()
        self.counter: PartialOutputCounter | None = None
        """With ``count_partial_output_rate``: counts the text of cut streams (``count_partial_output``)."""
        if count_partial_output_rate is not None:
            self.counter = PartialOutputCounter(
                submit=pipeline.submit,
                with_usage=self.with_usage,
                rate_per_s=count_partial_output_rate,
                remember_s=self.tracker.window_s,
                observe=self._calibrate_on_count,
            )

    def begin(
        self,
        request: Any,
        owner: object = None,
        headers: Mapping[bytes, str] | None = None,
        path: str | None = None,
    ) -> Attempt:
        """Open the account of one attempt about to be sent by ``owner``, the thread or task sending it.

        ``headers`` are the request's :func:`wanted_headers` and ``path`` its URL's path, if the caller
        read them already.
        """
        started_at = datetime.now(timezone.utc)
        started = time.perf_counter()
        wanted = wanted_headers(request.headers.raw) if headers is None else headers
        url = request.url
        names = _NO_NAMES  # a route header's name, when there is one (the platforms' requests)
        if not _ROUTE_HEADERS.isdisjoint(wanted):
            names = frozenset(name.decode() for name in _ROUTE_HEADERS if name in wanted)
        route = _route(url.host, url.path if path is None else path, names)
        tracker = self.tracker
        body = request.content
        # Small bodies are hashed at once; a larger one only if a failure of its size may be resent.
        size = len(body)
        model, fingerprint = _describe_body(
            body, hash_now=size <= _HASH_NOW_MAX_BYTES or tracker.wants_fingerprint(size)
        )
        if route.model:  # Bedrock and Vertex name the model in the path, not the body
            model = route.model
        elif route.platform != ANTHROPIC and model:  # Mantle's anthropic.-prefixed ids
            model = canonical_model(route.platform, model)
        sdk_retry = _int_header(wanted.get(b"x-stainless-retry-count"))
        if owner is None:
            owner = threading.current_thread()
        last = _last_logical_request.get()
        in_context = last[1] if last is not None and last[0] is owner else None
        previous = in_context if sdk_retry > 0 else None
        explicit = context.current_logical_request()
        budget = waste_budget.current()
        if budget is not None:
            refused = self._refused(budget, explicit, fingerprint, previous, in_context, model, size)
            if refused is not None:
                return refused
        assignment = tracker.begin(
            explicit_id=explicit,
            fingerprint=fingerprint,
            previous_id=previous,
            context_id=in_context,
            owner=owner,
        )
        _last_logical_request.set((owner, assignment.logical_request_id))
        counter = self.counter
        for record in assignment.now_retried:
            revised = record if counter is None else counter.revision(record)
            if revised is not None:  # else it waits for its attempt's count
                self.pipeline.submit(revised)
        beta = wanted.get(b"anthropic-beta")
        attempt = Attempt(
            accountant=self,
            attempt_id=new_id(),
            logical_request_id=assignment.logical_request_id,
            attempt_number=assignment.attempt_number,
            started_at=started_at,
            started=started,
            model_requested=model,
            fingerprint=fingerprint,
            body=body if fingerprint is None and body else None,
            body_size=size,
            sdk_retry=sdk_retry,
            beta_features=tuple(b.strip() for b in beta.split(",") if b.strip()) if beta else (),
            tags=context.current_tags(),
        )
        in_flight.add(attempt)
        if assignment.attempt_number > 1 and body:
            # A retry: what of its prompt it resends unchanged, and so could have read from the cache.
            attempt.prompt_size = guarded("prompt_size", _prompt_size, body)
        if route.platform != ANTHROPIC:
            attempt.platform = route.platform
            attempt.endpoint = route.endpoint
        elif self.counter is not None:
            # Platforms are never counted (docs/platforms.md); first-party text may be, if cut.
            attempt.count_target = count_target(url, request.headers.raw)
        if self.listeners:
            listening = [
                listener for listener, ask in self._asks if ask is None or guarded("listener_start", ask)
            ]
            if listening:
                start = AttemptStart(
                    attempt_id=attempt.attempt_id,
                    logical_request_id=attempt.logical_request_id,
                    attempt_number=attempt.attempt_number,
                    started_at=started_at,
                    model_requested=model,
                    sdk_retry=sdk_retry,
                    tags=attempt.tags,
                )
                attempt.listener_states = [
                    (listener, guarded("listener_start", listener.attempt_started, start))
                    for listener in listening
                ]
        return attempt

    def _refused(
        self,
        budget: waste_budget.WasteBudget,
        explicit: str | None,
        fingerprint: str | None,
        previous: str | None,
        in_context: str | None,
        model: str,
        size: int,
    ) -> Attempt | None:
        """The account of a retry the waste budget refuses (it is never sent), or None to send it.

        A body left unhashed by ``begin`` is one the tracker has no failure of that size for, so it
        cannot join a failed request by fingerprint: nothing is hashed here.
        """
        joins = self.tracker.joins(
            explicit_id=explicit, fingerprint=fingerprint, previous_id=previous, context_id=in_context
        )
        if joins is None:
            return None
        tags = context.current_tags()
        refusal = budget.refusal(joins[0], str(tags.get("workflow") or ""))
        if refusal is None:
            return None
        # Outside the tracker: a refused retry is no attempt of its request, and leaves the earlier
        # failures abandoned (nothing paid for them again).
        return Attempt(
            accountant=self,
            attempt_id=new_id(),
            logical_request_id=joins[0],
            attempt_number=joins[1] + 1,
            started_at=datetime.now(timezone.utc),
            started=time.perf_counter(),
            model_requested=model,
            fingerprint=fingerprint,
            body=None,
            body_size=size,
            sdk_retry=0,
            beta_features=(),
            tags=tags,
            refused=refusal,
        )

    def settle(self, attempt: Attempt, outcome: Outcome, error: BaseException | None) -> None:
        """Close the account: build the record and hand it to the pipeline."""
        meter = attempt.meter
        started = attempt.started
        usage = _NO_USAGE  # nothing billed unless the meter read usage
        model = attempt.model_requested
        answered_model = message_id = api_error_type = stop_reason = first_token_s = None
        events = bytes_received = 0
        tool_use = _NO_TOOL_USE
        output_chars = _NO_CHARS
        unreadable = None
        inference_geo = None
        if meter is not None:
            if attempt.closing:  # after an event the SDK could not read, if there was one
                unreadable = meter.unreadable
            answered_model = meter.model
            if answered_model and attempt.platform != ANTHROPIC:
                answered_model = canonical_model(attempt.platform, answered_model)
            model = answered_model or model
            reported = meter.usage
            billed_input = outcome not in _INPUT_UNBILLED
            estimated = 0
            output = reported.output_tokens
            if billed_input and not meter.output_reported:
                estimated = self.estimator.estimate(model, meter.chars)
                output = estimated
                output_chars = _counted(meter.chars)  # kept, to revise the estimate later
            elif (
                outcome is Outcome.COMPLETED
                and meter.output_reported
                and meter.chars_measured
                # A JSON body's characters come with its parse, but a sample still costs a calibration
                # step and a stored row: sampled as streams are (a stream read in full was sampled).
                and (attempt.stream or self.estimator.wants_sample(model))
                # Calibrates; a sample too small to calibrate on (not counted) is worth no row either.
                and self.estimator.observe(model, meter.chars, reported.output_tokens)
            ):
                output_chars = _counted(meter.chars)  # a calibration sample for the fleet
            if billed_input and (meter.message_id is not None or meter.output_reported):
                usage = Usage(
                    input_tokens=reported.input_tokens,
                    cache_write_5m_tokens=reported.cache_write_5m_tokens,
                    cache_write_1h_tokens=reported.cache_write_1h_tokens,
                    cache_read_tokens=reported.cache_read_tokens,
                    output_tokens=output,
                    output_estimated=not meter.output_reported,
                    estimated_output_tokens=estimated,
                    output_source=OutputSource.REPORTED if meter.output_reported else OutputSource.ESTIMATED,
                )
            message_id = meter.message_id
            api_error_type = meter.api_error_type
            stop_reason = meter.stop_reason
            events = meter.events
            bytes_received = meter.bytes_received
            if reported.server_tool_use:
                tool_use = MappingProxyType(dict(reported.server_tool_use))
            inference_geo = reported.inference_geo
            if meter.first_delta_at is not None:
                first_token_s = meter.first_delta_at - started
        cost = self._price(model, usage, attempt.platform, attempt.endpoint, inference_geo, tool_use)
        fingerprint, body = attempt.fingerprint, attempt.body
        prompt_size = attempt.prompt_size
        attempt.body = None
        if body is not None and outcome is not Outcome.COMPLETED:
            # The tracker remembers a failed attempt by its fingerprint: a resend may come any moment.
            fingerprint, body = fingerprint_of(body), None
        # Not wasted yet: the tracker decides.
        record = AttemptRecord(
            attempt_id=attempt.attempt_id,
            logical_request_id=attempt.logical_request_id,
            attempt_number=attempt.attempt_number,
            started_at=attempt.started_at,
            outcome=outcome,
            model_requested=attempt.model_requested,
            model=answered_model,
            stream=attempt.stream,
            beta_features=attempt.beta_features,
            request_id=attempt.request_id,
            message_id=message_id,
            sdk_retry=attempt.sdk_retry,
            http_status=attempt.http_status,
            # What the application saw; after an event the SDK could not read, the SDK's own
            # exception, which the hooks never see.
            error_type=type(error).__name__ if error is not None else unreadable,
            api_error_type=api_error_type,
            time_to_first_token_s=first_token_s,
            duration_s=time.perf_counter() - started,
            usage=usage,
            server_tool_use=tool_use,
            stop_reason=stop_reason,
            events_received=events,
            bytes_received=bytes_received,
            cost=cost,
            tags=attempt.tags,
            fingerprint=fingerprint,
            prompt_bytes=prompt_size.prompt_bytes if prompt_size is not None else None,
            stable_prefix_bytes=prompt_size.stable_prefix_bytes if prompt_size is not None else None,
            inference_geo=inference_geo,
            platform=attempt.platform,
            endpoint=attempt.endpoint,
            output_chars=output_chars,
        )
        if attempt.refused is None:
            record = self.tracker.finish(record, body_size=attempt.body_size)
        budget = waste_budget.current()
        if budget is not None:
            budget.observe(record)
        if attempt.count_target is not None and self._held_to_count(attempt, record):
            return  # the counter sends it on, and tells the listeners, once its text is counted
        if attempt.listener_states:
            _tell_finished(attempt.listener_states, record)
        # A completed attempt's large body is fingerprinted later, on the pipeline's thread.
        self.pipeline.submit(record, body_to_fingerprint=body)

    def _held_to_count(self, attempt: Attempt, record: AttemptRecord) -> bool:
        """Whether the counter took this record to count the text its cut stream received; if so, it
        tells the attempt's listeners when the record goes out (so a span carries the count)."""
        meter, target, counter = attempt.meter, attempt.count_target, self.counter
        attempt.count_target = None  # the credentials go with the text, or nowhere
        if not isinstance(meter, BodyMeter):
            return False
        pieces, meter.texts = meter.texts, None
        if (
            counter is None
            or target is None
            or not pieces
            or record.output_source is not OutputSource.ESTIMATED
        ):
            return False
        states = attempt.listener_states
        return counter.hold(
            record,
            target,
            {kind: "".join(parts) for kind, parts in pieces.items()},
            on_sent=functools.partial(_tell_finished, states) if states else None,
        )

    def _calibrate_on_count(self, record: AttemptRecord) -> None:
        # A counted cut stream is exact output for known characters: as good a sample as a completed one.
        if record.output_chars:
            self.estimator.observe(record.model_name, record.output_chars, record.usage.output_tokens)

    def _price(
        self,
        model: str,
        usage: Usage,
        platform: str,
        endpoint: str | None,
        inference_geo: str | None,
        tool_use: Mapping[str, int],
    ) -> Cost | None:
        """The cost of ``usage`` on ``model``; ``None`` when unpriced."""
        # A platform's attempt is priced from that platform's entry, or left unpriced: never at a guess.
        if not model:
            return None
        try:
            return self.prices.cost(
                model,
                usage,
                inference_geo=inference_geo,
                server_tool_use=tool_use,
                platform=platform,
                endpoint=endpoint,
            )
        except Exception as exc:  # the record is kept, unpriced: tokens are the ground truth
            instrumentation_errors.record("price", exc)
            return None

    def with_usage(self, record: AttemptRecord, usage: Usage) -> AttemptRecord:
        """``record`` with ``usage`` instead of its own, priced as :meth:`settle` prices."""
        cost = self._price(
            record.model_name,
            usage,
            record.platform,
            record.endpoint,
            record.inference_geo,
            record.server_tool_use,
        )
        return dataclasses.replace(record, usage=usage, cost=cost)


def _counted(chars: Mapping[str, int]) -> Mapping[str, int]:
    return MappingProxyType({key: count for key, count in chars.items() if count > 0})


@dataclass(slots=True, eq=False)
class Attempt:
    """The open account of one attempt, from ``send()`` until its body ends."""

    accountant: Accountant
    attempt_id: str
    logical_request_id: str
    attempt_number: int
    started_at: datetime
    started: float
    model_requested: str
    fingerprint: str | None
    body: bytes | None = field(repr=False)
    """The request body while its fingerprint is not computed yet; dropped when the attempt settles."""
    body_size: int
    sdk_retry: int
    beta_features: tuple[str, ...]
    tags: Mapping[str, str]
    stream: bool = False
    request_id: str | None = None
    http_status: int | None = None
    meter: BodyMeter | None = None
    closing: bool = False
    """Set when the application (or the garbage collector) closes the body before it ended."""
    listener_states: Sequence[tuple[AttemptListener, object]] = ()
    _once: threading.Lock = field(default_factory=threading.Lock)
    refused: waste_budget.WasteBudgetExceeded | None = None
    """Set when the waste budget refuses this retry: it is recorded, then raised instead of sent."""
    prompt_size: PromptSize | None = None
    """The sizes of a retry's prompt and stable prefix (never measured for a first attempt)."""
    platform: str = ANTHROPIC
    """Where the attempt went (:data:`costwatch.platforms.PLATFORMS`)."""
    endpoint: str | None = None
    """Bedrock's and Vertex's endpoint kind, when the request tells (:attr:`Route.endpoint`)."""
    count_target: CountTarget | None = field(default=None, repr=False)
    """With ``count_partial_output``: where to count the text if the stream is cut (holds credentials)."""

    def settle(self, outcome: Outcome, error: BaseException | None = None) -> None:
        """Finish the attempt once; later calls (close after an error, GC) do nothing."""
        if not self._once.acquire(blocking=False):
            return  # never released: the account is closed for good
        in_flight.discard(self)
        try:
            self.accountant.settle(self, outcome, error)
        except Exception as exc:
            instrumentation_errors.record("settle", exc)

    def on_response(self, response: Any) -> dict[bytes, str]:
        """Read the status and headers of the response; returns its :func:`response_headers`."""
        self.http_status = response.status_code
        headers = response_headers(response.headers)
        self.request_id = headers.get(b"request-id") or headers.get(b"x-amzn-requestid")
        content_type = headers.get(b"content-type", "")
        self.stream = content_type.startswith(("text/event-stream", EVENT_STREAM_CONTENT_TYPE))
        return headers

    @property
    def settled(self) -> bool:
        """Whether the account is closed (or being closed)."""
        return self._once.locked()

    def settle_json(self, body: bytes) -> dict[str, Any] | None:
        """Settle an attempt whose whole JSON body was read (and decoded) with its headers; returns the
        body as parsed, if a JSON object, for the SDK to take instead of parsing it again."""
        meter = self.meter = BodyMeter(stream=False)
        meter.bytes_received = len(body)
        meter.take_json(body)
        self.settle(self.outcome_after_body(None))
        return meter.take_parsed()

    def settle_body(self, error: BaseException | None) -> None:
        """Settle an attempt whose headers arrived, classifying how its body ended."""
        meter = self.meter
        if meter is not None and meter.kept is not None:
            # Only a stream that ended by itself may be read from its tail: a cut or stopped one needs
            # its exact characters (the estimate's input), and so does a sample for calibration.
            read_all = (
                error is not None
                or self.closing
                or self.accountant.estimator.wants_sample(meter.model or self.model_requested)
            )
            try:
                meter.finish_stream(read_all=read_all)
            except Exception as exc:  # a parser bug: settle the attempt unmetered rather than lose it
                instrumentation_errors.record("feed", exc)
                meter = self.meter = None
        if meter is not None and not meter.complete and not self.stream:
            meter.finish_json()
        outcome = self.outcome_after_body(error)
        # A close, a cancellation, or whatever the reader raised after the application's own stop, is
        # no error of the transport.
        stopped = error is None or outcome is Outcome.CANCELLED or is_stop(error)
        self.settle(outcome, None if stopped else error)

    def sdk_failed_reading(self) -> bool:
        """Whether the body was closed early after an event the SDK cannot read: the SDK raised there."""
        meter = self.meter
        return meter is not None and meter.unreadable is not None and self.closing

    def settle_interrupted(self) -> None:
        """At exit: settle an attempt still in flight, billed with what arrived so far.

        A stream not yet ended is ``interrupted``; one whose end already arrived keeps its outcome.
        """
        if self.settled:
            return
        meter = self.meter
        if meter is not None and meter.kept is not None:
            try:
                meter.finish_stream(read_all=True)  # its exact characters: the estimate's input
            except Exception as exc:
                instrumentation_errors.record("feed", exc)
                meter = self.meter = None
        outcome = self.outcome_after_body(None)
        self.settle(Outcome.INTERRUPTED if outcome is Outcome.DROPPED else outcome)

    def outcome_after_body(self, error: BaseException | None) -> Outcome:
        """Classify how an attempt whose headers arrived ended."""
        meter = self.meter
        if self.http_status is not None and self.http_status >= 400:
            return Outcome.HTTP_ERROR
        if meter is not None and meter.api_error_type is not None:
            return Outcome.STREAM_ERROR
        if self.sdk_failed_reading():
            return Outcome.STREAM_ERROR  # not completed, even if message_stop arrived after the bad event
        if meter is not None and meter.complete:
            return Outcome.COMPLETED
        if self.closing or is_stop(error):
            return Outcome.CANCELLED
        return Outcome.DROPPED  # an exception mid-body, or a body that ended before message_stop


def is_stop(error: BaseException | None) -> bool:
    """Whether ``error`` is the application stopping (close, cancellation, exit), not a failure."""
    # asyncio.CancelledError by name: the hooks do not import asyncio for sync applications
    return isinstance(error, _CANCELLATIONS) or type(error).__name__ == "CancelledError"


in_flight: set[Attempt] = set()
"""Attempts sent and not settled yet; settled as interrupted when the process exits."""


_HASH_NOW_MAX_BYTES = 4 * 1024
"""Bodies up to this size are fingerprinted at once (microseconds); larger ones on the writer thread."""


def _describe_body(body: bytes, *, hash_now: bool) -> tuple[str, str | None]:
    """The requested model and, with ``hash_now``, the request fingerprint (else ``None``).

    The fingerprint is a hash; the body itself is never stored. Hashing costs ~1 ms per MB, so the
    caller asks for it now only for small bodies or when the retry tracker may match the body to a
    failure; else the pipeline's writer thread hashes it, where hashlib releases the GIL.
    """
    if not body:
        return "", None
    fingerprint = fingerprint_of(body) if hash_now else None
    return _requested_model(body), fingerprint


_MODEL_VALUE = re.compile(rb'\s*:\s*"([^"\\]{1,200})"')


def _prompt_size(body: bytes) -> PromptSize | None:
    """The sizes of the prompt and its stable prefix; the parsed body is dropped at once."""
    parsed = json.loads(body)
    return measure(parsed) if isinstance(parsed, dict) else None


def _requested_model(body: bytes) -> str:
    """The body's top-level ``"model"`` string, found without parsing the whole (possibly huge) body.

    Both SDK lines serialize ``model`` after ``messages`` and before ``system`` and ``tools``, whose
    schemas may name a ``model`` property but with an object as its value; so the last ``"model"``
    key with a string value is the top-level one. (The response's own ``model`` field, when one
    arrives, is recorded separately and is what records are priced and labelled by.)
    """
    end = len(body)
    while True:
        at = body.rfind(b'"model"', 0, end)
        if at < 0:
            return ""
        match = _MODEL_VALUE.match(body, at + 7)
        if match is not None:
            return match.group(1).decode("utf-8", "replace")
        end = at


_route = functools.lru_cache(maxsize=256)(route_of)
""":func:`~costwatch.platforms.route_of` worked out once per host, path and route header: a process
sends its requests to a few (a Bedrock path names the model)."""

_ROUTE_HEADERS = frozenset((b"api-key", b"x-amz-date"))
"""Headers whose presence (never their value: one is an API key) tells a platform apart
(:func:`costwatch.platforms.route_of`)."""
_NO_NAMES: frozenset[str] = frozenset()
_WANTED_HEADERS = frozenset(
    (b"anthropic-version", b"x-stainless-retry-count", b"anthropic-beta", *_ROUTE_HEADERS)
)


def wanted_headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[bytes, str]:
    """The request headers the hooks and the account need, by lower-case name (``""`` for
    :data:`_ROUTE_HEADERS`), in one pass over ``raw`` (httpx's ``get()`` decodes every header)."""
    found = {}
    for name, value in raw:
        lowered = name.lower()
        if lowered in _WANTED_HEADERS:
            found[lowered] = "" if lowered in _ROUTE_HEADERS else value.decode("latin-1")
    return found


_RESPONSE_HEADERS = frozenset((b"request-id", b"x-amzn-requestid", b"content-type", b"content-encoding"))


def response_headers(headers: Any) -> dict[bytes, str]:
    """The response headers the account and the hooks read, by lower-case name, as httpx's ``get()``
    gives them (repeated ones joined by ``", "``), in one pass over ``headers.raw``: each ``get()``
    is a pass of its own, and the hooks read four.

    A value that is not ASCII is left to ``get()``, which decodes by what all the headers fit (ASCII,
    UTF-8 or Latin-1); an ASCII value reads the same in each.
    """
    found: dict[bytes, str] = {}
    not_ascii: list[bytes] = []
    for name, value in headers.raw:
        lowered = name.lower()
        if lowered in _RESPONSE_HEADERS:
            text = value.decode("latin-1")
            found[lowered] = found[lowered] + ", " + text if lowered in found else text
            if not value.isascii():
                not_ascii.append(lowered)
    for lowered in not_ascii:
        found[lowered] = headers.get(lowered.decode())
    return found


def _int_header(value: str | None) -> int:
    try:
        return max(int(value), 0) if value is not None else 0
    except ValueError:
        return 0
