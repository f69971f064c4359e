"""The SDK hooks: every HTTP attempt the Anthropic SDK makes to the Messages API becomes a record.

Where we hook, and why. Both SDK lines send each attempt — first tries and the SDK's own retries
alike — through ``send()`` of their HTTP client: ``httpx.Client`` on anthropic 0.x, ``httpx2.Client``
on 1.x/2.x (and the ``AsyncClient`` twins). Wrapping that one public method of the HTTP library, rather
than private SDK methods, gives us what no SDK hook does on both lines: the exact request bytes (for
the fingerprint), the response headers, and the raw body as the application consumes it, including
the point where the connection breaks and the exception the application then sees. anthropic 2.x's
own middleware runs per attempt too, but it hands over a parsed ``APIResponse`` rather than the byte
stream, cannot be added to clients that already exist without touching private state, and does not
exist on 0.x; so we use the transport edge on both lines and keep one code path. On 2.x the SDK's
call span is current while ``send()`` runs, so anything we trace there nests under it.

The hook never changes what the application sees: the original ``send`` is called with the same
arguments, its result or exception is passed on untouched (a bare ``raise`` keeps type, message,
cause and traceback), and every costwatch step is guarded so that its failure is counted and logged,
never raised.
"""

from __future__ import annotations

import contextvars
import importlib
import json
import logging
import os
import queue
import re
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from types import MappingProxyType
from typing import Any

from . import context, waste_budget
from .attribution import RetryTracker
from .estimation import OutputEstimator
from .event_stream import CONTENT_TYPE as EVENT_STREAM_CONTENT_TYPE
from .event_stream import EventStreamMeter
from .health import instrumentation_errors
from .pipeline import Pipeline, drain_before_exit, get_pipeline, interrupt_before_exit
from .platforms import ANTHROPIC, is_platform_path, route_of
from .pricing import PriceTable, load_prices
from .prompt_prefix import PromptSize, measure
from .records import AttemptRecord, AttemptStart, Outcome, OutputSource, Usage, fingerprint_of, new_id
from .settings import SettingsError, load_settings
from .sinks import AttemptListener, Sink
from .spool import SPOOL_DIR_ENV
from .stream_meter import BodyMeter

__all__ = ["Accountant", "flush", "instrument", "is_instrumented", "uninstrument"]

log = logging.getLogger("costwatch")

_HTTP_MODULES = ("httpx", "httpx2")
_MESSAGES_PATH_SUFFIX = "/v1/messages"
_CANCELLATIONS = (GeneratorExit, KeyboardInterrupt, SystemExit)

# The thread or task that began the last attempt in this context, and that attempt's logical request:
# an SDK-internal retry (``x-stainless-retry-count`` > 0) always runs in the same context as the
# attempt it repeats, and an application's resend usually does. The owner is kept with the id
# because a task starts with a copy of its parent's context: a value it inherited is not its own.
_last_logical_request: contextvars.ContextVar[tuple[object, str] | None] = contextvars.ContextVar(
    "costwatch_last_logical_request", default=None
)


_NOTHING_BILLED = Usage()
_NO_TOOL_USE: Mapping[str, int] = MappingProxyType({})
_NO_CHARS: Mapping[str, int] = MappingProxyType({})
# Enum members read once: looking one up on its class costs ~70 ns, and settle() asks several times.
_COMPLETED = Outcome.COMPLETED
_INPUT_UNBILLED = (Outcome.HTTP_ERROR, Outcome.CONNECT_ERROR)
_REPORTED, _ESTIMATED = OutputSource.REPORTED, OutputSource.ESTIMATED
_UTC = timezone.utc


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
    ) -> None:
        self.listeners = tuple(listeners)
        self.pipeline = pipeline
        self.prices = prices
        self.estimator = estimator or OutputEstimator()
        self.tracker = tracker or RetryTracker()

    def begin(self, request: Any, owner: object = None) -> _Attempt:
        """Open the account of one attempt about to be sent by ``owner``, the thread or task sending it."""
        started_at = datetime.now(_UTC)
        started = time.perf_counter()
        wanted = _wanted_headers(request.headers.raw)  # one pass: httpx's get() decodes every header
        url = request.url
        # Only a prefixed path can be Foundry's, which needs the header names to be told apart.
        names = frozenset() if url.path == _MESSAGES_PATH_SUFFIX else _header_names(request.headers.raw)
        route = route_of(url.host, url.path, names)
        tracker = self.tracker
        body = request.content
        # Small bodies are hashed at once; a larger one only if a failure of its size may be resent.
        size = len(body)
        model, fingerprint = _describe_body(
            body, hash_now=size <= _HASH_NOW_MAX_BYTES or tracker.wants_fingerprint(size)
        )
        if route.model:  # Bedrock and Vertex name the model in the path, not the body
            model = route.model
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
        for record in assignment.now_retried:
            self.pipeline.submit(record)
        beta = wanted.get(b"anthropic-beta")
        attempt = _Attempt(
            self,
            new_id(),
            assignment.logical_request_id,
            assignment.attempt_number,
            started_at,
            started,
            model,
            fingerprint,
            body if fingerprint is None and body else None,
            size,
            sdk_retry,
            tuple(b.strip() for b in beta.split(",") if b.strip()) if beta else (),
            context.current_tags(),
        )
        _in_flight.add(attempt)
        if assignment.attempt_number > 1 and body:
            # A retry: what of its prompt it resends unchanged, and so could have read from the cache.
            attempt.prompt_size = _guard("prompt_size", _prompt_size, body)
        if route.platform != ANTHROPIC:
            attempt.platform = route.platform
        if self.listeners:
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
                (listener, _guard("listener_start", listener.attempt_started, start))
                for listener in self.listeners
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
    ) -> _Attempt | None:
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
        return _Attempt(
            self,
            new_id(),
            joins[0],
            joins[1] + 1,
            datetime.now(_UTC),
            time.perf_counter(),
            model,
            fingerprint,
            None,
            size,
            0,
            (),
            tags,
            refused=refusal,
        )

    def settle(self, attempt: _Attempt, outcome: Outcome, error: BaseException | None) -> None:
        """Close the account: build the record and hand it to the pipeline."""
        meter = attempt.meter
        started = attempt.started
        usage = _NOTHING_BILLED
        model = attempt.model_requested
        answered_model = message_id = api_error_type = stop_reason = first_token_s = None
        events = bytes_received = 0
        tool_use = _NO_TOOL_USE
        output_chars = _NO_CHARS
        unreadable = None
        inference_geo = None
        if meter is not None:
            if attempt.sdk_failed_reading():
                unreadable = meter.unreadable
            answered_model = meter.model
            model = answered_model or model
            reported = meter.usage
            billed_input = outcome not in _INPUT_UNBILLED
            estimated = 0
            output = reported.output_tokens
            if billed_input and not meter.output_reported:
                estimated = self.estimator.estimate(model, meter.chars)
                output = estimated
                output_chars = _counted(meter.chars)  # kept, to revise the estimate later
            elif outcome is _COMPLETED and meter.output_reported and meter.chars_measured:
                self.estimator.observe(model, meter.chars, reported.output_tokens)
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
                    output_source=_REPORTED if meter.output_reported else _ESTIMATED,
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
        cost = None
        # The price table is the first-party API's; a platform's own prices are not in it, and an
        # attempt there stays unpriced rather than priced at a guess.
        if model and attempt.platform == ANTHROPIC:
            try:
                cost = self.prices.cost(model, usage, inference_geo=inference_geo, server_tool_use=tool_use)
            except Exception as exc:  # the record is kept, unpriced: tokens are the ground truth
                instrumentation_errors.record("price", exc)
        fingerprint, body = attempt.fingerprint, attempt.body
        prompt_size = attempt.prompt_size
        attempt.body = None
        if body is not None and outcome is not _COMPLETED:
            # The tracker remembers a failed attempt by its fingerprint: a resend may come any moment.
            fingerprint, body = fingerprint_of(body), None
        # Positional, in field order (tests/test_attempt_cost.py pins the order): a call with more
        # than 15 keyword arguments packs them into a dict first, which cost ~1 us here.
        record = AttemptRecord(
            attempt.attempt_id,
            attempt.logical_request_id,
            attempt.attempt_number,
            attempt.started_at,
            outcome,
            attempt.model_requested,
            answered_model,  # model
            attempt.stream,
            attempt.beta_features,
            attempt.request_id,
            message_id,
            attempt.sdk_retry,
            attempt.http_status,
            # error_type: what the application saw; after an event the SDK could not read, the SDK's
            # own exception, which the hooks never see.
            type(error).__name__ if error is not None else unreadable,
            api_error_type,
            first_token_s,  # time_to_first_token_s
            time.perf_counter() - started,  # duration_s
            usage,
            tool_use,  # server_tool_use
            stop_reason,
            events,  # events_received
            bytes_received,
            cost,
            False,  # wasted: the tracker decides
            None,  # waste_reason
            attempt.tags,
            fingerprint,
            prompt_bytes=prompt_size.prompt_bytes if prompt_size is not None else None,
            stable_prefix_bytes=prompt_size.stable_prefix_bytes if prompt_size is not None else None,
            inference_geo=inference_geo,
            platform=attempt.platform,
            output_chars=output_chars,
        )
        if attempt.refused is None:
            record = self.tracker.finish(record, body_size=attempt.body_size)
        budget = waste_budget.current()
        if budget is not None:
            budget.observe(record)
        for listener, state in attempt.listener_states:
            _guard("listener_finish", listener.attempt_finished, state, record)
        # A completed attempt's large body is fingerprinted later, on the pipeline's thread.
        self.pipeline.submit(record, body_to_fingerprint=body)


def _counted(chars: Mapping[str, int]) -> Mapping[str, int]:
    return MappingProxyType({key: count for key, count in chars.items() if count > 0})


@dataclass(slots=True, eq=False)
class _Attempt:
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

    def settle(self, outcome: Outcome, error: BaseException | None = None) -> None:
        """Finish the attempt once; later calls (close after an error, GC) do nothing."""
        if not self._once.acquire(blocking=False):
            return  # never released: the account is closed for good
        _in_flight.discard(self)
        try:
            self.accountant.settle(self, outcome, error)
        except Exception as exc:
            instrumentation_errors.record("settle", exc)

    def on_response(self, response: Any) -> None:
        """Read the status and headers of the response."""
        self.http_status = response.status_code
        headers = response.headers
        self.request_id = headers.get("request-id") or headers.get("x-amzn-requestid")
        content_type = headers.get("content-type", "")
        self.stream = content_type.startswith(("text/event-stream", EVENT_STREAM_CONTENT_TYPE))

    def body_ended(self, error: BaseException | None) -> None:
        """The body ended: at EOF (``error`` None), by an exception, or by being closed early."""
        if isinstance(error, GeneratorExit):
            if self._once.locked():
                return  # the usual close (and finalizer) after the body ended: already settled
            _settler.defer(self)  # closed, or finalized by the garbage collector: see _DeferredSettler
            return
        self.settle_body(error)

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
        self.settle(outcome, None if outcome is Outcome.CANCELLED or _is_stop(error) else error)

    def sdk_failed_reading(self) -> bool:
        """Whether the body was closed early after an event the SDK cannot read: the SDK raised there."""
        meter = self.meter
        return meter is not None and meter.unreadable is not None and self.closing

    def settle_interrupted(self) -> None:
        """At exit: settle an attempt still in flight, billed with what arrived so far.

        A stream not yet ended is ``interrupted``; one whose end already arrived keeps its outcome.
        """
        if self._once.locked():
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
        if self.closing or _is_stop(error):
            return Outcome.CANCELLED
        return Outcome.DROPPED  # an exception mid-body, or a body that ended before message_stop


def _is_stop(error: BaseException | None) -> bool:
    """Whether ``error`` is the application stopping (close, cancellation, exit), not a failure."""
    # asyncio.CancelledError by name: the hooks do not import asyncio for sync applications
    return isinstance(error, _CANCELLATIONS) or type(error).__name__ == "CancelledError"


class _DeferredSettler:
    """Settles attempts whose body was closed early, on a thread of its own.

    A stream the application drops without closing is freed by the cyclic garbage collector, which
    runs finalizers in whatever thread is allocating at that moment — possibly one inside a costwatch
    lock (the retry tracker's, the estimator's). Settling there could deadlock the application, so the
    close and finalizer paths only enqueue (``SimpleQueue.put`` is safe in finalizers) and this thread
    does the work.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[_Attempt | _Interrupted | threading.Event] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the settling thread if it is not running (never from a finalizer)."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="costwatch-settler", daemon=True)
            self._thread.start()

    def defer(self, attempt: _Attempt) -> None:
        """Queue an attempt whose body was closed before it ended."""
        self._queue.put(attempt)

    def interrupt_in_flight(self, timeout: float) -> None:
        """At exit: settle every attempt still in flight as interrupted, on the settler thread.

        Never here: a signal handler may have interrupted a thread holding the locks settling takes.
        """
        if self._thread is None or not self._thread.is_alive():
            return
        for attempt in list(_in_flight):
            self._queue.put(_Interrupted(attempt))
        self.wait(timeout)

    def wait(self, timeout: float | None) -> bool:
        """Wait until every attempt deferred so far is settled; False on timeout."""
        if self._thread is None or not self._thread.is_alive():
            self._settle_queued()  # no thread (not instrumented yet, or a forked child): settle here
            return True
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def drain(self, timeout: float) -> None:
        """At exit or on SIGTERM: wait for the settler thread to settle what is queued, never settling
        here (a signal handler may have interrupted a thread holding the locks settling takes)."""
        if self._thread is not None and self._thread.is_alive():
            self.wait(timeout)

    def reset_in_child(self) -> None:
        """In a forked child: drop the parent's queue (its attempts are the parent's) and thread."""
        _in_flight.clear()
        self._queue = queue.SimpleQueue()
        self._thread = None
        if _hooks is not None:
            self.start()  # only the forking thread survives a fork: the child needs its own settler

    def _run(self) -> None:
        while True:
            _settle_item(self._queue.get())

    def _settle_queued(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            _settle_item(item)


class _Interrupted:
    """A queue item: an attempt still in flight at exit, to be settled as interrupted."""

    __slots__ = ("attempt",)

    def __init__(self, attempt: _Attempt) -> None:
        self.attempt = attempt


def _settle_item(item: _Attempt | _Interrupted | threading.Event) -> None:
    if isinstance(item, threading.Event):
        item.set()  # a waiter's marker: everything queued before it is settled
    elif isinstance(item, _Interrupted):
        _guard("interrupt", item.attempt.settle_interrupted)
    else:
        _guard("body_close", item.settle_body, GeneratorExit())


_in_flight: set[_Attempt] = set()
"""Attempts sent and not settled yet; settled as interrupted when the process exits."""


_settler = _DeferredSettler()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_settler.reset_in_child)


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


_WANTED_HEADERS = frozenset((b"x-stainless-retry-count", b"anthropic-beta"))


def _wanted_headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[bytes, str]:
    """The request headers the account needs, by lower-case name."""
    found = {}
    for name, value in raw:
        lowered = name.lower()
        if lowered in _WANTED_HEADERS:
            found[lowered] = value.decode("latin-1")
    return found


def _header_names(raw: Iterable[tuple[bytes, bytes]]) -> frozenset[str]:
    """The request's lower-case header names; never their values."""
    return frozenset(name.decode("latin-1").lower() for name, _ in raw)


def _int_header(value: str | None) -> int:
    try:
        return max(int(value), 0) if value is not None else 0
    except ValueError:
        return 0


# -- the byte-stream wrappers ---------------------------------------------------------------------
def _make_stream_classes(module: Any) -> tuple[type, type]:
    """Response-stream wrappers that subclass this HTTP library's own stream base classes."""

    class ObservedSyncStream(module.SyncByteStream):
        """Passes the body through untouched while the attempt's meter reads it."""

        def __init__(self, inner: Any, attempt: _Attempt) -> None:
            self._inner = inner
            self._attempt = attempt

        def __iter__(self) -> Any:
            attempt = self._attempt
            chunks = iter(self._inner)
            try:
                kept = None
                if attempt.meter is not None:
                    for chunk in chunks:  # the head, fed chunk by chunk until the meter defers
                        kept = _feed_head(attempt, chunk)
                        yield chunk
                        if kept is not None or attempt.meter is None:
                            break
                if kept is not None:
                    # The hot loop: per chunk only C-level work; the meter reads the chunks at the end.
                    append, countdown = kept.append, _FOLD_CHECK_CHUNKS
                    for chunk in chunks:
                        append(chunk)
                        yield chunk
                        countdown -= 1
                        if not countdown:
                            countdown = _FOLD_CHECK_CHUNKS
                            if not _fold_kept(attempt):
                                break
                for chunk in chunks:  # unmetered: no meter, or an instrumentation error stopped it
                    yield chunk
            except BaseException as exc:
                _guard("body_error", attempt.body_ended, exc)
                raise
            _guard("body_end", attempt.body_ended, None)

        def close(self) -> None:
            self._attempt.closing = True  # before the reader, maybe in another thread, sees the end
            try:
                self._inner.close()
            finally:
                _guard("body_close", self._attempt.body_ended, GeneratorExit())

        def __del__(self) -> None:
            _guard("body_gc", self._attempt.body_ended, GeneratorExit())

    class ObservedAsyncStream(module.AsyncByteStream):
        """The async twin of ``ObservedSyncStream``."""

        def __init__(self, inner: Any, attempt: _Attempt) -> None:
            self._inner = inner
            self._attempt = attempt

        async def __aiter__(self) -> Any:
            attempt = self._attempt
            chunks = aiter(self._inner)
            try:
                kept = None
                if attempt.meter is not None:
                    async for chunk in chunks:
                        kept = _feed_head(attempt, chunk)
                        yield chunk
                        if kept is not None or attempt.meter is None:
                            break
                if kept is not None:
                    append, countdown = kept.append, _FOLD_CHECK_CHUNKS
                    async for chunk in chunks:
                        append(chunk)
                        yield chunk
                        countdown -= 1
                        if not countdown:
                            countdown = _FOLD_CHECK_CHUNKS
                            if not _fold_kept(attempt):
                                break
                async for chunk in chunks:
                    yield chunk
            except BaseException as exc:
                _guard("body_error", attempt.body_ended, exc)
                raise
            _guard("body_end", attempt.body_ended, None)

        async def aclose(self) -> None:
            self._attempt.closing = True
            try:
                await self._inner.aclose()
            finally:
                _guard("body_close", self._attempt.body_ended, GeneratorExit())

        def __del__(self) -> None:
            _guard("body_gc", self._attempt.body_ended, GeneratorExit())

    return ObservedSyncStream, ObservedAsyncStream


_FOLD_CHECK_CHUNKS = 256
"""How many kept chunks pass between checks of the kept bytes against the meter's bound."""


def _feed_head(attempt: _Attempt, chunk: bytes) -> list[bytes] | None:
    """Feed one chunk to the meter; returns the list to keep the next chunks in once the meter defers."""
    meter = attempt.meter
    if meter is None:
        return None
    try:
        meter.feed(chunk)
        return meter.defer()
    except Exception as exc:  # a parser bug must not break the stream; stop metering it
        instrumentation_errors.record("feed", exc)
        attempt.meter = None
        return None


def _fold_kept(attempt: _Attempt) -> bool:
    """Let the meter read its kept chunks if they grew too large; False once it is no longer metering."""
    meter = attempt.meter
    if meter is None:
        return False
    try:
        meter.fold()
        return True
    except Exception as exc:
        instrumentation_errors.record("feed", exc)
        attempt.meter = None
        return False


def _guard(where: str, fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception as exc:
        instrumentation_errors.record(where, exc)
        return None


# -- the send() hooks -----------------------------------------------------------------------------
class _Hooks:
    """What ``instrument()`` installed, so that ``uninstrument()`` can put back exactly that."""

    def __init__(
        self, accountant: Accountant, http_clients: weakref.WeakSet[Any] | None, sinks: list[Sink]
    ) -> None:
        self.accountant = accountant
        self.sinks = sinks
        self.http_clients = http_clients
        self.active = True
        """False once removed: a wrapper another library stacked on ours may still call ours."""
        # (class, the original send, our wrapper, whether the class itself defined the original)
        self.originals: list[tuple[type, Callable[..., Any], Callable[..., Any], bool]] = []

    def wants(self, http_client: Any, request: Any) -> bool:
        """Whether this request is a Messages API call we account for."""
        if not self.active:
            return False
        if request.method != "POST":
            return False
        path = request.url.path
        first_party_shape = path.endswith(_MESSAGES_PATH_SUFFIX)
        if not first_party_shape and not is_platform_path(path):
            return False
        if self.http_clients is not None and http_client not in self.http_clients:
            return False
        if not first_party_shape:
            # Bedrock and Vertex requests carry the API version in the body instead of a header.
            return b'"anthropic_version"' in request.content
        return any(name.lower() == b"anthropic-version" for name, _ in request.headers.raw)

    def install(self, modules: Iterable[Any]) -> None:
        for module in modules:
            sync_stream, async_stream = _make_stream_classes(module)
            for cls, wrap, stream_cls in (
                (module.Client, _wrap_sync_send, sync_stream),
                (module.AsyncClient, _wrap_async_send, async_stream),
            ):
                original = cls.send
                wrapper = wrap(self, original, stream_cls)
                self.originals.append((cls, original, wrapper, "send" in cls.__dict__))
                cls.send = wrapper

    def remove(self) -> None:
        """Put back the original ``send``, unless another library wrapped ours since.

        Restoring then would silently remove that library's wrapper too; ours stays in its chain
        instead, passing every request straight through.
        """
        self.active = False
        for cls, original, wrapper, own in reversed(self.originals):
            if cls.__dict__.get("send") is not wrapper:
                continue
            if own:
                cls.send = original
            else:
                del cls.send
        self.originals.clear()


def _wrap_sync_send(hooks: _Hooks, original: Callable[..., Any], stream_cls: type) -> Callable[..., Any]:
    def send(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        if not hooks.wants(self, request):
            return original(self, request, *args, **kwargs)
        attempt = _guard("begin", hooks.accountant.begin, request)
        if attempt is None:
            return original(self, request, *args, **kwargs)
        if attempt.refused is not None:
            attempt.settle(Outcome.CONNECT_ERROR, attempt.refused)
            raise attempt.refused
        try:
            response = original(self, request, *args, **kwargs)
        except BaseException as exc:
            _guard("send_error", _settle_without_response, attempt, exc)
            raise
        _guard("response", _observe_response, attempt, response, stream_cls)
        return response

    send.__wrapped__ = original  # type: ignore[attr-defined]
    return send


def _wrap_async_send(hooks: _Hooks, original: Callable[..., Any], stream_cls: type) -> Callable[..., Any]:
    async def send(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        if not hooks.wants(self, request):
            return await original(self, request, *args, **kwargs)
        attempt = _guard("begin", hooks.accountant.begin, request, _current_task())
        if attempt is None:
            return await original(self, request, *args, **kwargs)
        if attempt.refused is not None:
            attempt.settle(Outcome.CONNECT_ERROR, attempt.refused)
            raise attempt.refused
        try:
            response = await original(self, request, *args, **kwargs)
        except BaseException as exc:
            _guard("send_error", _settle_without_response, attempt, exc)
            raise
        _guard("response", _observe_response, attempt, response, stream_cls)
        return response

    send.__wrapped__ = original  # type: ignore[attr-defined]
    return send


def _current_task() -> object:
    """The asyncio (or trio) task running this coroutine; the thread when neither says."""
    asyncio = sys.modules.get("asyncio")  # imported already by any asyncio application
    if asyncio is not None:
        try:
            task = asyncio.current_task()
        except RuntimeError:  # no asyncio loop running: another event loop (anyio on trio)
            task = None
        if task is not None:
            return task
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            return trio.lowlevel.current_task()
        except RuntimeError:
            pass
    return threading.current_thread()


def _settle_without_response(attempt: _Attempt, error: BaseException) -> None:
    # A non-streaming body is read inside send(): a cut there surfaces here, after the headers.
    if "message body" in str(error):
        attempt.settle(Outcome.DROPPED, error)
    elif _is_stop(error):
        attempt.settle(Outcome.CANCELLED, None)
    else:
        attempt.settle(Outcome.CONNECT_ERROR, error)


def _observe_response(attempt: _Attempt, response: Any, stream_cls: type) -> None:
    attempt.on_response(response)
    if response.is_stream_consumed:
        # send(stream=False) already read (and decoded) the whole body.
        meter = attempt.meter = BodyMeter(stream=attempt.stream, clock=time.perf_counter)
        meter.feed(response.content)
        attempt.body_ended(None)
        return
    if response.headers.get("content-type", "").startswith(EVENT_STREAM_CONTENT_TYPE):
        attempt.meter = EventStreamMeter(clock=time.perf_counter)  # Bedrock's binary framing
    else:
        attempt.meter = BodyMeter(
            stream=attempt.stream,
            content_encoding=response.headers.get("content-encoding"),
            clock=time.perf_counter,
        )
    response.stream = stream_cls(response.stream, attempt)


# -- instrument() / uninstrument() ----------------------------------------------------------------
_state_lock = threading.Lock()
_hooks: _Hooks | None = None


def instrument(
    client: Any = None,
    *,
    pipeline: Pipeline | None = None,
    sinks: Iterable[Sink] | None = None,
    listeners: Iterable[AttemptListener] | None = None,
    prices: PriceTable | None = None,
    estimator: OutputEstimator | None = None,
    **settings: Any,
) -> bool:
    """Account for every attempt of every Anthropic client, or only of ``client`` when given.

    Clients created before or after the call are covered alike. Records go to ``sinks`` — by
    default the SQL store (``database_url``, default ``sqlite:///costwatch.db``) and the in-process
    Prometheus metrics — and ``listeners`` see attempts live (by default, OpenTelemetry spans).
    ``settings`` are the rows of :data:`costwatch.settings.SETTINGS` and override their
    ``COSTWATCH_*`` variables. A ``spool_dir`` chosen there (keyword or variable) also moves the spool
    of a process-wide pipeline created earlier, say by ``costwatch.flush()``; once that pipeline's
    writer has started it cannot, and :class:`~costwatch.settings.SettingsError` says so. Returns True
    if hooks were installed, False if costwatch was already instrumenting: a second call installs
    nothing, and only adds ``client`` to the accounted ones when the first call named clients too.
    """
    global _hooks
    with _state_lock:
        if _hooks is not None:
            if client is not None and _hooks.http_clients is not None:
                _hooks.http_clients.add(_http_client_of(client))
            return False
        config = load_settings(settings)
        # Everything that can fail on bad input happens before anything is attached or installed.
        http_clients: weakref.WeakSet[Any] | None = None
        if client is not None:
            http_clients = weakref.WeakSet([_http_client_of(client)])
        price_table = prices or load_prices(config.prices_file)
        if config.waste_budget_usd_per_hour is not None:
            waste_budget.waste_budget(config.waste_budget_usd_per_hour, scope=config.waste_budget_scope)
        if pipeline is None:
            # Only a directory the application chose may move the spool of an existing pipeline.
            chosen = settings.get("spool_dir") is not None or bool(os.environ.get(SPOOL_DIR_ENV))
            pipeline = get_pipeline(spool_dir=config.spool_dir if chosen else None)
            pipeline.capacity = config.queue_capacity
            pipeline.batch_size = config.batch_size
            pipeline.interval_s = config.flush_interval_s
        added = list(sinks) if sinks is not None else _default_sinks(config, pipeline)
        accountant = Accountant(
            pipeline=pipeline,
            prices=price_table,
            estimator=estimator,
            listeners=listeners if listeners is not None else _default_listeners(),
            tracker=RetryTracker(window_s=config.retry_window_s),
        )
        added += _fleet_calibration(added, accountant.estimator, price_table, config)
        if sinks is None:
            # Reading the fleet's calibration pooled a connection: the first write connects afresh
            # (see SqlStore.prepare), to the database as it then is.
            for sink in added:
                close = getattr(sink, "close_connections", None)
                if callable(close):
                    _guard("store_prepare", close)
        for sink in added:
            pipeline.add_sink(sink)
        if any(pipeline.spool.has_segments(sink.name) for sink in added):
            # A spool left by an earlier (perhaps killed) process: replayed now, not at the first request.
            pipeline.retry_spool()
        _settler.start()
        # At exit, streams closed at the last moment are settled before any pipeline flushes, and
        # so, when the process is ending, are attempts still in flight.
        interrupt_before_exit(_settler.interrupt_in_flight)
        drain_before_exit(_settler.drain)
        hooks = _Hooks(accountant, http_clients, added)
        hooks.install(_importable_http_modules())
        _hooks = hooks
        return True


def uninstrument() -> bool:
    """Restore the HTTP clients' original ``send`` exactly and detach the sinks ``instrument`` added.

    Where another library wrapped ``send`` after ``instrument()``, its wrapper is left in place and
    costwatch's, under it, stops accounting. Records of attempts already made are delivered first;
    an attempt still streaming when this is called is counted as dropped by the pipeline if it ends
    later. Returns False if nothing was installed.
    """
    global _hooks
    with _state_lock:
        if _hooks is None:
            return False
        hooks, _hooks = _hooks, None
        hooks.remove()
    _settler.wait(10.0)
    for sink in hooks.sinks:
        hooks.accountant.pipeline.remove_sink(sink)
    return True


def flush(timeout: float | None = 30.0) -> bool:
    """Wait until every attempt recorded so far has reached every sink; False on timeout."""
    deadline = None if timeout is None else time.monotonic() + timeout
    settled = _settler.wait(timeout)
    hooks = _hooks
    pipeline = hooks.accountant.pipeline if hooks is not None else get_pipeline()
    remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
    return pipeline.flush(remaining) and settled


def _default_sinks(config: Any, pipeline: Pipeline) -> list[Sink]:
    sinks: list[Sink] = []
    if config.store:
        from .store import SqlStore  # SQLAlchemy is imported only when the store is used
        from .store.database import checked_database_url

        url = checked_database_url(config.database_url)  # refused now, not at the first write
        store = SqlStore(url, retry_window=timedelta(seconds=config.retry_window_s))
        try:
            store.prepare()
        except Exception as exc:  # the database is down or refuses us: the writer retries and spools
            log.info(
                "costwatch: the store is not ready yet (%s); records spool until it is", type(exc).__name__
            )
        sinks.append(store)
    if config.metrics:
        sinks.append(_process_metrics_sink(config, pipeline))
    return sinks


def _fleet_calibration(
    sinks: Sequence[Sink], estimator: OutputEstimator, prices: PriceTable, config: Any
) -> list[Sink]:
    """A :class:`~costwatch.calibration.FleetCalibration` over the first sink that stores calibration
    samples (the SQL store), loaded now, and an :class:`~costwatch.revise.EstimateRevision` of that
    store's estimates after it (so a refresh comes before the revisions it makes possible); none if
    no sink stores samples."""
    from .calibration import FleetCalibration
    from .revise import EstimateRevision

    for sink in sinks:
        if callable(getattr(sink, "calibration_samples", None)):
            calibration = FleetCalibration(sink, estimator, refresh_s=config.calibration_refresh_s)  # type: ignore[arg-type]
            calibration.load()
            revision = EstimateRevision(
                sink,  # type: ignore[arg-type]
                estimator,
                prices,
                window_s=config.revision_window_s,
                refresh_s=config.calibration_refresh_s,
                batch_size=config.batch_size,
            )
            return [calibration, revision]
    return []


_metrics_sink: Sink | None = None


def _process_metrics_sink(config: Any, pipeline: Pipeline) -> Sink:
    # prometheus_client's default registry accepts each metric name once per process, so the sink
    # registered there outlives uninstrument() and serves every later instrument() call.
    global _metrics_sink
    if _metrics_sink is None:
        from .metrics import MetricsSink

        _metrics_sink = MetricsSink(
            pipeline=pipeline,
            retry_window_s=config.retry_window_s,
            workflow_label_limit=config.workflow_label_limit,
            model_label_limit=config.model_label_limit,
            otlp=_otlp_metrics(config),
        )
    return _metrics_sink


def _otlp_metrics(config: Any) -> Any:
    if config.metrics_exporter != "otlp":
        return None
    from .otlp import OtlpMetrics  # the OpenTelemetry SDK is imported only when asked for

    try:
        return OtlpMetrics()
    except (ImportError, ValueError) as exc:
        raise SettingsError(f"COSTWATCH_METRICS_EXPORTER=otlp: {exc}") from None


def _default_listeners() -> list[AttemptListener]:
    from .spans import SpanListener  # a no-op tracer unless the application set up OpenTelemetry

    return [SpanListener()]


def is_instrumented() -> bool:
    """Whether costwatch's hooks are installed."""
    return _hooks is not None


def _http_client_of(client: Any) -> Any:
    http_client = getattr(client, "_client", None)
    if http_client is None or not hasattr(http_client, "send"):
        raise TypeError(
            f"costwatch.instrument(client=...) expects an anthropic.Anthropic or AsyncAnthropic client, "
            f"got {type(client).__name__}"
        )
    return http_client


def _importable_http_modules() -> list[Any]:
    modules = []
    for name in _HTTP_MODULES:
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            continue
    return modules
