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
never raised. What an attempt billed and how it ended is worked out in :mod:`costwatch.accounting`.
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import queue
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from . import waste_budget
from .accounting import Accountant, Attempt, in_flight, is_stop, wanted_headers
from .attribution import RetryTracker
from .estimation import OutputEstimator
from .event_stream import CONTENT_TYPE as EVENT_STREAM_CONTENT_TYPE
from .event_stream import EventStreamMeter
from .health import guarded, instrumentation_errors
from .pipeline import Pipeline, SignalSafeEvent, drain_before_exit, get_pipeline, interrupt_before_exit
from .platforms import MESSAGES_PATH, is_platform_path
from .pricing import PriceTable, load_prices
from .records import Outcome
from .settings import SettingsError, load_settings
from .sinks import AttemptListener, Sink
from .spool import SPOOL_DIR_ENV
from .stream_meter import BodyMeter

if TYPE_CHECKING:
    from .metrics import MetricsSink  # imported when metrics are on: prometheus_client

__all__ = ["flush", "instrument", "is_instrumented", "uninstrument"]

log = logging.getLogger("costwatch")

_HTTP_MODULES = ("httpx", "httpx2")

_STORE_MODULE = "costwatch.store"


class _DeferredSettler:
    """Settles attempts whose body was closed early, on a thread of its own.

    A stream the application drops without closing is freed by the cyclic garbage collector, which
    runs finalizers in whatever thread is allocating at that moment — possibly one inside a costwatch
    lock (the retry tracker's, the estimator's). Settling there could deadlock the application, so the
    close and finalizer paths only enqueue (``SimpleQueue.put`` is safe in finalizers) and this thread
    does the work.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Attempt | _Interrupted | SignalSafeEvent] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the settling thread if it is not running (never from a finalizer)."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="costwatch-settler", daemon=True)
            self._thread.start()

    def defer(self, attempt: Attempt) -> None:
        """Queue an attempt whose body was closed before it ended."""
        self._queue.put(attempt)

    def interrupt_in_flight(self, timeout: float) -> None:
        """At exit: settle every attempt still in flight as interrupted, on the settler thread.

        Never here: a signal handler may have interrupted a thread holding the locks settling takes.
        """
        if self._thread is None or not self._thread.is_alive():
            return
        for attempt in list(in_flight):
            self._queue.put(_Interrupted(attempt))
        self.wait(timeout)

    def wait(self, timeout: float | None) -> bool:
        """Wait until every attempt deferred so far is settled; False on timeout."""
        if self._thread is None or not self._thread.is_alive():
            self._settle_queued()  # no thread (not instrumented yet, or a forked child): settle here
            return True
        done = SignalSafeEvent()  # a SIGTERM handler may wait while the thread it interrupted waits too
        self._queue.put(done)
        return done.wait(timeout)

    def drain(self, timeout: float) -> None:
        """At exit or on SIGTERM: wait for the settler thread to settle what is queued, never settling
        here (a signal handler may have interrupted a thread holding the locks settling takes)."""
        if self._thread is not None and self._thread.is_alive():
            self.wait(timeout)

    def reset_in_child(self) -> None:
        """In a forked child: drop the parent's queue (its attempts are the parent's) and thread."""
        in_flight.clear()
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

    def __init__(self, attempt: Attempt) -> None:
        self.attempt = attempt


def _settle_item(item: Attempt | _Interrupted | SignalSafeEvent) -> None:
    if isinstance(item, SignalSafeEvent):
        item.set()  # a waiter's marker: everything queued before it is settled
    elif isinstance(item, _Interrupted):
        guarded("interrupt", item.attempt.settle_interrupted)
    else:
        guarded("body_close", item.settle_body, GeneratorExit())


_settler = _DeferredSettler()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_settler.reset_in_child)


# -- the byte-stream wrappers ---------------------------------------------------------------------
def _make_stream_classes(module: Any) -> tuple[type, type]:
    """Response-stream wrappers that subclass this HTTP library's own stream base classes."""

    class ObservedSyncStream(module.SyncByteStream):
        """Passes the body through untouched while the attempt's meter reads it."""

        def __init__(self, inner: Any, attempt: Attempt, response: Any) -> None:
            self._inner = inner
            self._attempt = attempt
            self._response = weakref.ref(response)  # the response holds this: no reference cycle

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
                guarded("body_error", _body_ended, attempt, exc)
                raise
            guarded("body_end", _body_read, attempt, self._response)

        def close(self) -> None:
            self._attempt.closing = True  # before the reader, maybe in another thread, sees the end
            try:
                self._inner.close()
            finally:
                if not self._attempt.settled:  # the usual close, after the body's end, finds it settled
                    guarded("body_close", _body_ended, self._attempt, GeneratorExit())

        def __del__(self) -> None:
            if not self._attempt.closing:  # else its close settled the attempt or deferred it
                guarded("body_gc", _body_ended, self._attempt, GeneratorExit())

    class ObservedAsyncStream(module.AsyncByteStream):
        """The async twin of ``ObservedSyncStream``."""

        def __init__(self, inner: Any, attempt: Attempt, response: Any) -> None:
            self._inner = inner
            self._attempt = attempt
            self._response = weakref.ref(response)  # the response holds this: no reference cycle

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
                guarded("body_error", _body_ended, attempt, exc)
                raise
            guarded("body_end", _body_read, attempt, self._response)

        async def aclose(self) -> None:
            self._attempt.closing = True
            try:
                await self._inner.aclose()
            finally:
                if not self._attempt.settled:  # the usual close, after the body's end, finds it settled
                    guarded("body_close", _body_ended, self._attempt, GeneratorExit())

        def __del__(self) -> None:
            if not self._attempt.closing:  # else its close settled the attempt or deferred it
                guarded("body_gc", _body_ended, self._attempt, GeneratorExit())

    return ObservedSyncStream, ObservedAsyncStream


_FOLD_CHECK_CHUNKS = 256
"""How many kept chunks pass between checks of the kept bytes against the meter's bound."""


def _feed_head(attempt: Attempt, chunk: bytes) -> list[bytes] | None:
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


def _fold_kept(attempt: Attempt) -> bool:
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

    def wants(self, http_client: Any, request: Any) -> tuple[dict[bytes, str], str] | None:
        """The request's :func:`~costwatch.accounting.wanted_headers` and URL path if it is a Messages
        API call we account for, else ``None``."""
        if not self.active:
            return None
        if request.method != "POST":
            return None
        path = request.url.path
        first_party_shape = path.endswith(MESSAGES_PATH)
        if not first_party_shape and not is_platform_path(path):
            return None
        if self.http_clients is not None and http_client not in self.http_clients:
            return None
        if not first_party_shape:
            # Bedrock and Vertex requests carry the API version in the body instead of a header.
            wanted = b'"anthropic_version"' in request.content
            return (wanted_headers(request.headers.raw), path) if wanted else None
        headers = wanted_headers(request.headers.raw)
        return (headers, path) if b"anthropic-version" in headers else None

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
        wanted = hooks.wants(self, request)
        if wanted is None:
            return original(self, request, *args, **kwargs)
        attempt = guarded("begin", hooks.accountant.begin, request, None, *wanted)
        if attempt is None:
            return original(self, request, *args, **kwargs)
        if attempt.refused is not None:
            attempt.settle(Outcome.CONNECT_ERROR, attempt.refused)
            raise attempt.refused
        try:
            response = original(self, request, *args, **kwargs)
        except BaseException as exc:
            guarded("send_error", _settle_without_response, attempt, exc)
            raise
        guarded("response", _observe_response, attempt, response, stream_cls)
        return response

    send.__wrapped__ = original  # type: ignore[attr-defined]
    return send


def _wrap_async_send(hooks: _Hooks, original: Callable[..., Any], stream_cls: type) -> Callable[..., Any]:
    async def send(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        wanted = hooks.wants(self, request)
        if wanted is None:
            return await original(self, request, *args, **kwargs)
        attempt = guarded("begin", hooks.accountant.begin, request, _current_task(), *wanted)
        if attempt is None:
            return await original(self, request, *args, **kwargs)
        if attempt.refused is not None:
            attempt.settle(Outcome.CONNECT_ERROR, attempt.refused)
            raise attempt.refused
        try:
            response = await original(self, request, *args, **kwargs)
        except BaseException as exc:
            guarded("send_error", _settle_without_response, attempt, exc)
            raise
        guarded("response", _observe_response, attempt, response, stream_cls)
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


def _body_ended(attempt: Attempt, error: BaseException | None) -> None:
    """The body ended: at EOF (``error`` None), by an exception, or by being closed early."""
    if isinstance(error, GeneratorExit):
        if attempt.settled:
            return  # the usual close (and finalizer) after the body ended: already settled
        _settler.defer(attempt)  # closed, or finalized by the garbage collector: see _DeferredSettler
        return
    attempt.settle_body(error)


def _settle_without_response(attempt: Attempt, error: BaseException) -> None:
    # A non-streaming body is read inside send(): a cut there surfaces here, after the headers.
    if "message body" in str(error):
        attempt.settle(Outcome.DROPPED, error)
    elif is_stop(error):
        attempt.settle(Outcome.CANCELLED, None)
    else:
        attempt.settle(Outcome.CONNECT_ERROR, error)


def _observe_response(attempt: Attempt, response: Any, stream_cls: type) -> None:
    headers = attempt.on_response(response)
    if response.is_stream_consumed:
        # send(stream=False) already read (and decoded) the whole body.
        if attempt.stream:  # an event stream read whole
            attempt.meter = BodyMeter(stream=True, clock=time.perf_counter)
            attempt.meter.feed(response.content)
            _body_ended(attempt, None)
            return
        parsed = attempt.settle_json(response.content)
        if parsed is not None:
            _hand_over(response, parsed)
        return
    if headers.get(b"content-type", "").startswith(EVENT_STREAM_CONTENT_TYPE):
        attempt.meter = EventStreamMeter(clock=time.perf_counter)  # Bedrock's binary framing
    else:
        meter = attempt.meter = BodyMeter(
            stream=attempt.stream,
            content_encoding=headers.get(b"content-encoding"),
            clock=time.perf_counter,
        )
        if attempt.count_target is not None and attempt.stream:
            meter.texts = {}  # kept until the stream ends: counted if it was cut
    response.stream = stream_cls(response.stream, attempt, response)


def _body_read(attempt: Attempt, response: weakref.ref[Any]) -> None:
    """The body was read to its end: settle the attempt, and hand a JSON body's parse to the SDK,
    which reads a non-streaming body (anthropic 2.17 outside ``send()``) and then parses it."""
    _body_ended(attempt, None)
    meter = attempt.meter
    if isinstance(meter, BodyMeter) and meter.parsed is not None:
        parsed, owner = meter.take_parsed(), response()
        if parsed is not None and owner is not None:
            _hand_over(owner, parsed)


def _hand_over(response: Any, parsed: dict[str, Any]) -> None:
    try:  # noqa: SIM105 (contextlib.suppress: three more Python calls a create, ~4 k instructions)
        response.json = _ParsedBody(response, parsed)
    except AttributeError:  # a response class with slots keeps its own
        pass


class _ParsedBody:
    """A response's ``json()`` that hands the first call without arguments the body costwatch parsed.

    Both SDK lines parse a non-streaming body with ``response.json()`` once they have read it (inside
    ``send()``, or after it on anthropic 2.17): they get costwatch's parse instead of making a second
    one (a sixth of what costwatch costs a small call). The parse goes to one caller only and
    costwatch keeps no reference to it, so the caller owns it as it would own a fresh parse; the
    first call also puts the response's own ``json()`` back, which answers every later call (and one
    with arguments) with a fresh parse.
    """

    __slots__ = ("_parsed", "_response")

    def __init__(self, response: Any, parsed: dict[str, Any]) -> None:
        self._response = weakref.ref(response)  # the response holds this: no reference cycle
        self._parsed = [parsed]

    def __call__(self, **kwargs: Any) -> Any:
        response = self._response()
        if response is not None and response.__dict__.get("json") is self:
            del response.json
        try:
            parsed = self._parsed.pop()  # once, even for two threads at a time
        except IndexError:
            parsed = None
        if parsed is not None and not kwargs:
            return parsed
        assert response is not None  # its caller holds it
        return response.json(**kwargs)


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
        store_was_imported = _STORE_MODULE in sys.modules
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
        if sinks is not None:
            added, reachable = list(sinks), True
        else:
            added, reachable = _default_sinks(config, pipeline, price_table)
        accountant = Accountant(
            pipeline=pipeline,
            prices=price_table,
            estimator=estimator,
            listeners=listeners if listeners is not None else _default_listeners(),
            tracker=RetryTracker(window_s=config.retry_window_s),
            count_partial_output_rate=(
                config.count_partial_output_rate if config.count_partial_output else None
            ),
        )
        added += _fleet_calibration(
            added, accountant.estimator, price_table, config, accountant.listeners, read_now=reachable
        )
        for sink in added:
            pipeline.add_sink(sink)
        # Only a choice made now: sinks detached later (uninstrument) still make a stream's record a loss.
        pipeline.sinkless_by_choice = not pipeline.sinks
        if any(pipeline.spool.has_segments(sink.name) for sink in added):
            # A spool left by an earlier (perhaps killed) process: replayed now, not at the first request.
            pipeline.retry_spool()
        _settler.start()
        # At exit, streams closed at the last moment are settled before any pipeline flushes, and
        # so, when the process is ending, are attempts still in flight.
        interrupt_before_exit(_settler.interrupt_in_flight)
        drain_before_exit(_settler.drain)
        drain_before_exit(_drain_counter)  # after the settler: what it settles may be held to count
        hooks = _Hooks(accountant, http_clients, added)
        hooks.install(_importable_http_modules())
        _hooks = hooks
        if not store_was_imported and _STORE_MODULE in sys.modules and _full_collection_next():
            # The store's imports made the interpreter's next full collection (a pass over the whole
            # heap) due within a few thousand allocations: in the application's first request. Paid
            # here, once, instead; when it is not that close (anthropic 2.x), nothing is run.
            gc.collect()
        return True


def _full_collection_next() -> bool:
    """Whether the interpreter's next pass over its middle generation ends in a full collection (it
    has made as many passes as the oldest generation's threshold since the last one)."""
    return gc.get_count()[2] >= gc.get_threshold()[2]


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
    if hooks.accountant.counter is not None:
        hooks.accountant.counter.close(10.0)  # what it holds goes out, counted or estimated
    for sink in hooks.sinks:
        hooks.accountant.pipeline.remove_sink(sink)
    return True


def flush(timeout: float | None = 30.0) -> bool:
    """Wait until every attempt recorded so far has reached every sink; False on timeout."""
    deadline = None if timeout is None else time.monotonic() + timeout
    settled = _settler.wait(timeout)
    hooks = _hooks
    pipeline = hooks.accountant.pipeline if hooks is not None else get_pipeline()
    counter = hooks.accountant.counter if hooks is not None else None
    if counter is not None:  # the records of cut streams still being counted
        settled = (
            counter.wait(None if deadline is None else max(deadline - time.monotonic(), 0.0)) and settled
        )
    remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
    return pipeline.flush(remaining) and settled


def _drain_counter(timeout: float) -> None:
    """At exit or on SIGTERM: let the counter count what it holds, within ``timeout``, then send the rest."""
    hooks = _hooks
    if hooks is not None and hooks.accountant.counter is not None:
        hooks.accountant.counter.drain(timeout)


def _default_sinks(config: Any, pipeline: Pipeline, prices: PriceTable) -> tuple[list[Sink], bool]:
    """The sinks the settings ask for, and whether their store could be reached (if there is one)."""
    sinks: list[Sink] = []
    reachable = True
    if config.store:
        from .store import SqlStore  # SQLAlchemy is imported only when the store is used
        from .store.database import checked_database_url

        url = checked_database_url(config.database_url)  # refused now, not at the first write
        store = SqlStore(url, retry_window=timedelta(seconds=config.retry_window_s))
        try:
            store.prepare()
        except Exception as exc:  # the database is down or refuses us: the writer retries and spools
            reachable = False
            log.info(
                "costwatch: the store is not ready yet (%s); records spool until it is", type(exc).__name__
            )
        sinks.append(store)
    if config.metrics:
        sinks.append(_process_metrics_sink(config, pipeline, prices))
    return sinks, reachable


def _fleet_calibration(
    sinks: Sequence[Sink],
    estimator: OutputEstimator,
    prices: PriceTable,
    config: Any,
    listeners: Sequence[AttemptListener],
    *,
    read_now: bool,
) -> list[Sink]:
    """A :class:`~costwatch.calibration.FleetCalibration` over the first sink that stores calibration
    samples (the SQL store), and an :class:`~costwatch.revise.EstimateRevision` of that store's
    estimates after it (so a refresh comes before the revisions it makes possible), which tells
    ``listeners`` of the revisions; none if no sink stores samples. With ``read_now`` the calibration
    is loaded and the revision has read ahead here; without (the store could not be reached just
    now: each read would wait out the connect timeout again) the writer does both at its first batch."""
    from .calibration import FleetCalibration
    from .revise import EstimateRevision

    for sink in sinks:
        if callable(getattr(sink, "calibration_samples", None)):
            calibration = FleetCalibration(sink, estimator, refresh_s=config.calibration_refresh_s)  # type: ignore[arg-type]
            revision = EstimateRevision(
                sink,  # type: ignore[arg-type]
                estimator,
                prices,
                window_s=config.revision_window_s,
                refresh_s=config.calibration_refresh_s,
                batch_size=config.batch_size,
                listeners=listeners,
            )
            if read_now:  # here rather than on the writer thread beside the first requests
                calibration.load()
                revision.read_ahead()
            return [calibration, revision]
    return []


_metrics_sink: MetricsSink | None = None


def _process_metrics_sink(config: Any, pipeline: Pipeline, prices: PriceTable) -> Sink:
    # prometheus_client's default registry accepts each metric name once per process, so the sink
    # registered there outlives uninstrument() and serves every later instrument() call. It prices
    # avoidable waste with the latest call's table, given here rather than loaded at its first
    # batch, on the writer thread beside the application.
    global _metrics_sink
    if _metrics_sink is not None:
        _metrics_sink.use_prices(prices)
    else:
        from .metrics import MetricsSink

        _metrics_sink = MetricsSink(
            pipeline=pipeline,
            retry_window_s=config.retry_window_s,
            workflow_label_limit=config.workflow_label_limit,
            model_label_limit=config.model_label_limit,
            otlp=_otlp_metrics(config),
            prices=prices,
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
