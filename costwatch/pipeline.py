"""The record pipeline: a bounded queue between the SDK hooks and the sinks, drained by one thread.

The caller's thread only appends to a deque (no lock, no I/O); a daemon thread batches records by
size and interval and hands them to every sink. Nothing submitted is lost:

* a sink whose ``export`` raises gets the batch in the local :class:`~costwatch.spool.Spool`
  instead, and the spool is replayed to it with exponential backoff until it recovers (while a
  sink is failing, new batches go straight to its spool rather than waiting on it again);
* a full queue sends the record to the spool for every sink;
* ``flush()``, interpreter exit and ``SIGTERM`` deliver (or spool) everything queued, after the
  stages upstream that may still hold records (see :func:`drain_before_exit`) have drained;
* a forked child starts with an empty queue and its own thread and spool segments.

The writer thread also finishes what the caller's thread need not wait for: the fingerprint of a
large request body is computed there (``submit(record, body_to_fingerprint=...)``), where hashlib
releases the GIL so the hash runs beside the application; the body is referenced, never stored, and
at most :data:`MAX_UNHASHED_BYTES` of bodies wait at once.

Only when the spool itself cannot be written is a record dropped; that is counted and logged once.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import os
import queue
import signal
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

from .records import AttemptRecord, fingerprint_of
from .settings import SettingsError, default_of
from .sinks import Sink
from .spool import Spool
from .validation import storable

__all__ = [
    "MAX_UNHASHED_BYTES",
    "SIGTERM_FLUSH_TIMEOUT_S",
    "Pipeline",
    "PipelineHealth",
    "SignalSafeEvent",
    "drain_before_exit",
    "get_pipeline",
    "interrupt_before_exit",
]

log = logging.getLogger("costwatch")

MAX_UNHASHED_BYTES = 64 * 1024 * 1024
"""Request bodies queued for the writer to fingerprint, at most; beyond it the caller hashes them."""


@dataclass(frozen=True)
class PipelineHealth:
    """A snapshot of the pipeline's health counters."""

    queue_depth: int
    """Records waiting in memory for the writer thread."""
    spooled_pending: int
    """Records in the spool not yet replayed to the sink that missed them (summed over sinks)."""
    write_errors: int
    """Failed ``export`` calls (each failed batch or replay counts once)."""
    dropped: int
    """Records lost because neither a sink nor the spool could take them."""
    rejected: int = 0
    """Records a sink refused to hold and kept apart, never retried (summed over sinks)."""


class _Unhashed:
    """A queued record whose fingerprint is still to be computed from its request body."""

    __slots__ = ("body", "record")

    def __init__(self, record: AttemptRecord, body: bytes) -> None:
        self.record = record
        self.body = body

    def finished(self) -> AttemptRecord:
        """The record with its fingerprint."""
        return dataclasses.replace(self.record, fingerprint=fingerprint_of(self.body))


class SignalSafeEvent:
    """A :class:`threading.Event` that a signal handler may set, or wait on, at any moment.

    ``threading.Event.set`` takes a lock that is not reentrant: a signal handler calling it while the
    thread it interrupted was inside ``set`` (or ``wait``) of the same event deadlocks the process.
    Here the flag is a token in a :class:`queue.SimpleQueue`, whose ``put`` is reentrant and whose
    waiting holds no lock a ``put`` needs.
    """

    __slots__ = ("_tokens",)

    def __init__(self) -> None:
        self._tokens: queue.SimpleQueue[None] = queue.SimpleQueue()

    def set(self) -> None:
        """Set the flag, waking every waiter."""
        self._tokens.put(None)

    def is_set(self) -> bool:
        """Whether the flag is set."""
        return not self._tokens.empty()

    def clear(self) -> None:
        """Unset the flag."""
        with contextlib.suppress(queue.Empty):
            while True:
                self._tokens.get_nowait()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the flag is set (at most ``timeout`` seconds); whether it is."""
        if timeout is not None:
            timeout = min(max(0.0, timeout), threading.TIMEOUT_MAX)
        try:
            self._tokens.get(timeout=timeout)
        except queue.Empty:
            return False
        self._tokens.put(None)  # still set, for the next waiter
        return True


class _Flushed:
    """A marker in the queue: everything before it has been delivered or spooled once it is reached."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = SignalSafeEvent()


@dataclass
class _SinkState:
    """Whether a sink is failing, and when to try replaying its spool next."""

    failing: bool = False
    backoff_s: float = 0.0
    next_replay_at: float = 0.0


class Pipeline:
    """Moves attempt records from the hooks to the sinks without ever blocking the hooks.

    ``capacity`` bounds the in-memory queue; ``batch_size`` and ``interval_s`` bound how many
    records and how much time go by before a batch is written. ``retry_initial_s`` and
    ``retry_max_s`` bound the backoff between replays of the spool to a failing sink.
    """

    def __init__(
        self,
        *,
        capacity: int = 100_000,
        batch_size: int = default_of("batch_size"),
        interval_s: float = 1.0,
        spool: Spool | None = None,
        retry_initial_s: float = 1.0,
        retry_max_s: float = 60.0,
    ) -> None:
        self.capacity = capacity
        self.batch_size = batch_size
        self.interval_s = interval_s
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.spool = spool if spool is not None else Spool()
        self._sinks: list[Sink] = []
        self._states: dict[int, _SinkState] = {}
        self.sinkless_by_choice = False
        """Set when the application chose no sinks (``instrument(sinks=[])``, store and metrics off):
        records then go nowhere by design, which is not a loss to log or count."""
        self._reset_runtime()
        _live_pipelines.add(self)

    def _reset_runtime(self) -> None:
        self._queue: deque[AttemptRecord | _Unhashed | _Flushed] = deque()
        self._unhashed_bytes = 0
        # Everything a SIGTERM handler may touch while it interrupts the main thread is safe to
        # re-enter: the wake-up and flush markers are signal-safe events, the counters' lock is
        # reentrant, and the writer thread is never started from the handler.
        self._wake = SignalSafeEvent()
        self._start_lock = threading.Lock()
        self._counter_lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._exiting = False
        self._dropped = 0
        self._write_errors = 0
        self._drop_logged = False
        self._states = {id(sink): _SinkState() for sink in self._sinks}

    # -- the caller's side -------------------------------------------------------------------
    def submit(self, record: AttemptRecord, *, body_to_fingerprint: bytes | None = None) -> None:
        """Queue a record for every sink; never blocks (a full queue spills to the spool).

        With ``body_to_fingerprint``, the record's fingerprint is that body's, computed on the writer
        thread (or here, if :data:`MAX_UNHASHED_BYTES` of bodies already wait or the queue is full).
        """
        item: AttemptRecord | _Unhashed = record
        if body_to_fingerprint is not None:
            item = self._unhashed(record, body_to_fingerprint)
        if len(self._queue) >= self.capacity:
            self._spill([self._finished(item)], reason="the record queue is full")
            return
        self._queue.append(item)
        if self._thread is None:
            self._start()
        # Until the writer gets the GIL, every submit finds a full batch waiting: one wake-up is
        # enough. A set event is cleared by the writer only before it drains the queue, so this
        # record is delivered either way.
        if len(self._queue) >= self.batch_size and not self._wake.is_set():
            self._wake.set()

    @property
    def queue_depth(self) -> int:
        """Records waiting to be delivered."""
        return len(self._queue)

    @property
    def dropped(self) -> int:
        """Records lost because neither a sink nor the spool could take them."""
        return self._dropped

    @property
    def write_errors(self) -> int:
        """Failed ``export`` calls so far."""
        return self._write_errors

    @property
    def spooled_pending(self) -> int:
        """Records in the spool waiting to be replayed (as far as this process knows)."""
        return self.spool.pending()

    @property
    def rejected_records(self) -> int:
        """Records the sinks refused and kept apart (a sink's ``rejected_records``, summed)."""
        return sum(int(getattr(sink, "rejected_records", 0) or 0) for sink in self._sinks)

    def health(self) -> PipelineHealth:
        """The health counters, for the metrics exporter and for tests."""
        return PipelineHealth(
            queue_depth=self.queue_depth,
            spooled_pending=self.spooled_pending,
            write_errors=self._write_errors,
            dropped=self._dropped,
            rejected=self.rejected_records,
        )

    def add_sink(self, sink: Sink) -> None:
        """Deliver records to ``sink`` from now on."""
        if sink not in self._sinks:
            self._states[id(sink)] = _SinkState()
            self._sinks = [*self._sinks, sink]
            self._wake.set()  # a spool left by an earlier run may be waiting for this sink

    def remove_sink(self, sink: Sink) -> None:
        """Stop delivering to ``sink`` (after delivering what is queued) and shut it down."""
        self.flush()
        if sink in self._sinks:
            self._sinks = [s for s in self._sinks if s is not sink]
            self._states.pop(id(sink), None)
            sink.shutdown()

    @property
    def sinks(self) -> Sequence[Sink]:
        """The sinks records go to."""
        return tuple(self._sinks)

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Wait until every record submitted so far was delivered or spooled; False on timeout."""
        if self._thread is None and not self._queue:
            return True
        # A marker rather than a count: the writer may be in the middle of a batch it already took.
        marker = _Flushed()
        self._queue.append(marker)
        if self._thread is None:
            self._start()
        self._wake.set()
        return marker.done.wait(timeout)

    def retry_spool(self) -> None:
        """Replay spooled records to their sinks now instead of at the next backoff step."""
        for state in list(self._states.values()):  # a snapshot: sinks may be added meanwhile
            state.next_replay_at = 0.0
        if self._thread is None:
            self._start()
        self._wake.set()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Deliver what is queued, stop the thread and shut the sinks down."""
        self.flush(timeout)
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._spill_queue()
        for sink in self._sinks:
            try:
                sink.shutdown()
            except Exception:
                log.exception("costwatch: sink %s failed to shut down", getattr(sink, "name", sink))
        self._sinks = []
        self._states = {}
        self.spool.close()
        self._stopping = False

    def install_exit_handlers(self) -> None:
        """Flush at interpreter exit and on ``SIGTERM`` (chaining to the previous SIGTERM handler)."""
        atexit.register(self._shutdown_at_exit)
        _flush_on_sigterm.add(self)
        _install_sigterm_handler()

    # -- the writer's side -------------------------------------------------------------------
    def _start(self) -> None:
        # Not from a signal handler: the thread it interrupted may hold threading's own locks (inside
        # Thread.start) or this one; whoever holds this one is starting the writer anyway. (Other
        # threads, like the settler's while the handler waits for it, may start it.)
        in_handler = _in_signal_handler and threading.current_thread() is threading.main_thread()
        if in_handler or not self._start_lock.acquire(blocking=False):
            return
        try:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="costwatch-pipeline", daemon=True)
                self._thread.start()
        finally:
            self._start_lock.release()

    def _run(self) -> None:
        logged = False
        while True:
            try:
                self._wake.wait(self._seconds_to_next_event())
                self._wake.clear()
                self._drain()
                self._replay_spools()
                if not self._exiting:
                    self._revise(final=False)
            except Exception:  # the writer thread must outlive any bug in a sink or in itself
                self._count_write_error()
                if not logged:
                    log.exception("costwatch: record pipeline error (further errors are only counted)")
                    logged = True
                self._wake.wait(self.interval_s)  # an error that repeats must not spin the CPU
            if self._stopping:
                try:
                    self._drain(everything=True)
                except Exception:
                    self._count_write_error()
                return

    def _seconds_to_next_event(self) -> float:
        now = time.monotonic()
        waits = [self.interval_s]
        # A snapshot: application threads add and remove sinks (and their states) meanwhile.
        waits += [s.next_replay_at - now for s in list(self._states.values()) if s.failing]
        return max(0.0, min(waits))

    def _drain(self, *, everything: bool = False) -> None:
        """Deliver what was queued when the writer woke, then only full batches (all, with ``everything``).

        Records keep arriving while a batch is written: chasing them would write a batch of one or
        two records per transaction for as long as the application keeps up its pace. They wait for
        the next wake-up instead (``interval_s`` at most, or a full batch, or a flush).
        """
        woken_with = len(self._queue)
        while self._queue and (everything or woken_with > 0 or len(self._queue) >= self.batch_size):
            batch: list[AttemptRecord] = []
            markers: list[_Flushed] = []
            while self._queue and len(batch) < self.batch_size:
                item = self._queue.popleft()
                woken_with -= 1
                if isinstance(item, _Flushed):
                    markers.append(item)
                    break
                batch.append(self._finished(item))
            if batch:
                self._deliver(batch)
            if markers and not self._exiting:
                # A flush promises the sinks reflect everything seen so far: estimates included.
                self._revise(final=True)
            for marker in markers:
                marker.done.set()

    def _deliver(self, batch: list[AttemptRecord]) -> None:
        sinks = self._sinks
        if not sinks:
            if not self.sinkless_by_choice:
                # e.g. a stream that ended after uninstrument() detached the sinks
                self._count_dropped(len(batch), "no sink was attached when they were delivered")
            return
        for sink in sinks:
            state = self._states.setdefault(id(sink), _SinkState())
            if state.failing:
                self._spool_for(sink, batch)
                continue
            try:
                sink.export(batch)
            except Exception as exc:
                self._count_write_error()
                self._mark_failing(sink, state, exc)
                self._spool_for(sink, batch)

    def _revise(self, *, final: bool) -> None:
        """Deliver the revisions the sinks that find them (:class:`~costwatch.sinks.Reviser`) have now."""
        for sink in self._sinks:
            revisions = getattr(sink, "revisions", None)
            if revisions is None:
                continue
            try:
                for batch in revisions(final=final):
                    self._deliver([storable(record) for record in batch])
            except Exception:
                self._count_write_error()
                log.exception("costwatch: revising stored records failed")

    def _replay_spools(self) -> None:
        now = time.monotonic()
        for sink in self._sinks:
            state = self._states.setdefault(id(sink), _SinkState())
            if now < state.next_replay_at:
                continue
            if not self.spool.has_segments(sink.name):
                if state.failing:
                    state.failing = False  # nothing was spooled for it after all
                state.next_replay_at = now + self.retry_max_s
                continue
            try:
                delivered = self.spool.replay(sink.name, sink.export, batch_size=self.batch_size)
            except Exception as exc:
                self._count_write_error()
                self._mark_failing(sink, state, exc)
                continue
            if state.failing:
                log.warning("costwatch: sink %s recovered; replayed %d spooled records", sink.name, delivered)
            state.failing = False
            state.backoff_s = 0.0
            state.next_replay_at = now + self.retry_max_s

    def _mark_failing(self, sink: Sink, state: _SinkState, exc: BaseException) -> None:
        if not state.failing:
            # One warning per outage, not one per batch; the message is the exception's class and
            # text, which for the store never includes a password.
            log.warning(
                "costwatch: sink %s failed (%s: %s); spooling its records and retrying with backoff",
                sink.name,
                type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "",
            )
        state.failing = True
        state.backoff_s = min(
            self.retry_max_s, state.backoff_s * 2 if state.backoff_s else self.retry_initial_s
        )
        state.next_replay_at = time.monotonic() + state.backoff_s

    def _unhashed(self, record: AttemptRecord, body: bytes) -> AttemptRecord | _Unhashed:
        """A queue item that leaves hashing ``body`` to the writer, unless too many bodies wait."""
        size = len(body)
        with self._counter_lock:
            held = self._unhashed_bytes + size <= MAX_UNHASHED_BYTES
            if held:
                self._unhashed_bytes += size
        if held:
            return _Unhashed(record, body)
        return dataclasses.replace(record, fingerprint=fingerprint_of(body))  # the writer is behind

    def _finished(self, item: AttemptRecord | _Unhashed) -> AttemptRecord:
        """The record of a queue item, fingerprinted if it was left unhashed, as sinks can store it."""
        if not isinstance(item, _Unhashed):
            return storable(item)
        size = len(item.body)
        with self._counter_lock:
            self._unhashed_bytes -= size
        return storable(item.finished())

    def _count_write_error(self) -> None:
        with self._counter_lock:
            self._write_errors += 1

    def _spool_for(self, sink: Sink, batch: list[AttemptRecord]) -> None:
        try:
            self.spool.append(sink.name, batch)
        except Exception as exc:
            self._count_dropped(len(batch), f"the spool could not be written ({exc})")

    def _spill(self, records: list[AttemptRecord], *, reason: str) -> None:
        """Put records that cannot wait for the writer thread straight into every sink's spool."""
        sinks = self._sinks
        if not sinks:
            if not self.sinkless_by_choice:
                self._count_dropped(len(records), f"{reason} and no sink is configured")
            return
        for sink in sinks:
            self._spool_for(sink, records)

    def _spill_queue(self) -> None:
        """Move whatever is still queued (the writer is stopped or stuck) into the spool."""
        leftover: list[AttemptRecord] = []
        while self._queue:
            item = self._queue.popleft()
            if isinstance(item, _Flushed):
                item.done.set()
            else:
                leftover.append(self._finished(item))
        if leftover:
            self._spill(leftover, reason="the pipeline stopped before delivering them")

    def _count_dropped(self, count: int, reason: str) -> None:
        with self._counter_lock:
            self._dropped += count
            first = not self._drop_logged
            self._drop_logged = True
        if first:
            log.error(
                "costwatch: %d attempt record(s) dropped: %s (further drops are only counted)", count, reason
            )

    # -- exit, signals and fork --------------------------------------------------------------
    # Exit delivers the records and nothing more: no revision pass (any later process revises within
    # its window): its time is short.
    def _shutdown_at_exit(self) -> None:
        interrupted = _exiting_on_keyboard_interrupt()
        self._exiting = True
        try:
            _drain_upstream(EXIT_DRAIN_TIMEOUT_S, ending=True)
            self.shutdown()
        finally:
            if interrupted:
                _still_die_of_sigint()

    def _flush_for_exit(self, timeout: float) -> None:
        """On SIGTERM, in the handler: deliver what is queued, or spool it if no writer can in time."""
        self._exiting = True
        try:
            writer = self._thread
            if writer is None or not writer.is_alive() or not self.flush(timeout):
                self._spill_queue()
        finally:
            self._exiting = False  # an application's own SIGTERM handler may carry on

    def _after_fork_in_child(self) -> None:
        # The queued records are the parent's to deliver; the child starts empty, with its own thread
        # (started lazily by the next submit) and its own spool segments.
        self._reset_runtime()
        self.spool.after_fork_in_child()


_live_pipelines: weakref.WeakSet[Pipeline] = weakref.WeakSet()
_flush_on_sigterm: weakref.WeakSet[Pipeline] = weakref.WeakSet()
_previous_sigterm: Callable[[int, FrameType | None], Any] | int | None = None
_sigterm_installed = False
_in_signal_handler = False

SIGTERM_FLUSH_TIMEOUT_S = 10.0
"""How long a ``SIGTERM`` waits for queued records to be delivered before spooling the rest."""

EXIT_DRAIN_TIMEOUT_S = 10.0
"""How long interpreter exit and ``SIGTERM`` wait for each upstream stage to drain."""

_upstream_drains: list[Callable[[float], object]] = []
_interrupters: list[Callable[[float], object]] = []


def drain_before_exit(drain: Callable[[float], object]) -> None:
    """Have ``drain(timeout)`` run at interpreter exit and on ``SIGTERM`` before any pipeline flushes.

    For a stage upstream of the pipelines that may still hold records (the hooks' settler of streams
    closed early): what it submits while draining is then delivered with the rest, not left behind
    by a pipeline that has already shut down. Registering the same callable again does nothing.
    """
    if drain not in _upstream_drains:
        _upstream_drains.append(drain)


def interrupt_before_exit(interrupt: Callable[[float], object]) -> None:
    """Have ``interrupt(timeout)`` run first when the process is ending: at interpreter exit, and on
    ``SIGTERM`` when its default action (termination) follows.

    For the hooks' attempts still in flight: settled as interrupted, they are delivered with the
    rest instead of vanishing with the process. Not on a ``SIGTERM`` the application handles itself
    (it may go on serving, and those attempts finish). Registering it again does nothing.
    """
    if interrupt not in _interrupters:
        _interrupters.append(interrupt)


def _drain_upstream(timeout: float, *, ending: bool) -> None:
    deadline = time.monotonic() + timeout  # one budget for every stage, not one each
    for drain in [*(_interrupters if ending else ()), *_upstream_drains]:
        try:
            drain(max(0.0, deadline - time.monotonic()))
        except Exception:
            log.exception("costwatch: draining attempt records before exit failed")


def _exiting_on_keyboard_interrupt() -> bool:
    """Whether the interpreter is exiting because the program did not catch a KeyboardInterrupt."""
    if hasattr(sys, "ps1"):  # interactive: the last error shown is not why the interpreter exits
        return False
    uncaught = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)  # 3.12+ / older
    return isinstance(uncaught, KeyboardInterrupt)


def _still_die_of_sigint() -> None:
    """Make the interpreter end the process by SIGINT again, as it does after an uncaught Ctrl-C.

    CPython (before gh-128130) forgets that an uncaught KeyboardInterrupt is ending the process when
    any thread, until the very end, runs ``exec()`` of a string: SQLAlchemy, dataclasses and
    namedtuple generate code that way on first use, and the writer thread or this exit flush may be
    the first to use them. The process then exits with status 1 where a shell or supervisor expects
    death by SIGINT. Running a string that raises KeyboardInterrupt sets that state again.
    """
    with contextlib.suppress(KeyboardInterrupt):
        exec("raise KeyboardInterrupt")  # a string, not a code object: only that path sets the state


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    global _in_signal_handler
    _in_signal_handler = True
    try:
        _flush_on_sigterm_now()
    finally:
        _in_signal_handler = False
    previous = _previous_sigterm
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_IGN:
        return
    else:
        # The default action (terminate), as if we had never been here.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def _flush_on_sigterm_now() -> None:
    previous = _previous_sigterm
    # A handler of the application's own (or SIG_IGN) decides whether the process ends; if it does
    # end, interpreter exit settles what is still in flight then.
    _drain_upstream(EXIT_DRAIN_TIMEOUT_S, ending=not callable(previous) and previous != signal.SIG_IGN)
    for pipeline in list(_flush_on_sigterm):
        try:
            pipeline._flush_for_exit(SIGTERM_FLUSH_TIMEOUT_S)
        except Exception:
            log.exception("costwatch: flushing attempt records on SIGTERM failed")


def _install_sigterm_handler() -> None:
    global _previous_sigterm, _sigterm_installed
    if _sigterm_installed:
        return
    if threading.current_thread() is not threading.main_thread():
        log.debug("costwatch: not in the main thread; records are flushed at exit but not on SIGTERM")
        return
    _previous_sigterm = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _on_sigterm)
    _sigterm_installed = True


def _reset_pipelines_in_child() -> None:
    for pipeline in list(_live_pipelines):
        pipeline._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_pipelines_in_child)


_pipeline: Pipeline | None = None
_pipeline_lock = threading.Lock()


def get_pipeline(*, spool_dir: str | os.PathLike[str] | None = None) -> Pipeline:
    """The process-wide pipeline, created on first use and flushed at interpreter exit and on SIGTERM.

    ``spool_dir`` chooses the spool's directory, also for a pipeline an earlier call created without
    one (``costwatch.flush()`` or the metrics before ``instrument()``) as long as its writer has not
    started. Once it has, records may already be spooled where they are, so a different directory
    raises :class:`~costwatch.settings.SettingsError` instead of being silently ignored.
    """
    global _pipeline
    with _pipeline_lock:
        if _pipeline is None:
            _pipeline = Pipeline(spool=Spool(spool_dir))
            _pipeline.install_exit_handlers()
        elif spool_dir is not None:
            wanted = Spool(spool_dir)  # touches no disk until its first append
            if wanted.directory != _pipeline.spool.directory:
                if _pipeline._thread is not None or _pipeline._queue:
                    raise SettingsError(
                        f"spool_dir={str(spool_dir)!r} cannot take effect: costwatch's pipeline is already "
                        f"running with its spool in {_pipeline.spool.directory}; set spool_dir before "
                        "anything is recorded, or give instrument() a pipeline of your own"
                    )
                _pipeline.spool = wanted
        return _pipeline
