"""Which attempts are retries of one another, and which billed tokens were therefore wasted.

Attempts form a *logical request* in one of three ways, strongest first:

1. the application said so, with ``costwatch.logical_request(id)``;
2. the SDK retried internally (its ``x-stainless-retry-count`` header is above zero), so the attempt
   belongs with the previous attempt made in the same thread or task;
3. the request's fingerprint equals that of an attempt that *failed* within the retry window (an
   application retry loop resending the same body): first the failed attempt made in the same thread
   or asyncio task (its context), else the oldest failure with that fingerprint that no other attempt
   claimed and whose own context will not resend it (that context ended, or went on to other work).
   Each failure is claimed at most once, so a worker pool sending one body for many jobs at once
   keeps every job's attempts together and apart from the others'.

Every billed token of a failed attempt is wasted: ``abandoned`` while no later attempt of its logical
request exists, ``retried`` once one does; an attempt the application stopped reading is
``cancelled`` waste and is never a failure to resend. The tracker holds only ids, fingerprints,
weak references to the threads or tasks that made failed attempts and the pending records, bounded
in number and age.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

from .records import AttemptRecord, Outcome, WasteReason, new_id

__all__ = ["Assignment", "RetryTracker", "waste_reason_at_finish"]


class Assignment(NamedTuple):
    """Where a new attempt belongs, and the earlier attempts it turns into ``retried`` waste."""

    logical_request_id: str
    attempt_number: int
    now_retried: tuple[AttemptRecord, ...] = ()


class _LogicalRequest:
    """What the tracker remembers of one logical request (one per attempt begun: kept small)."""

    __slots__ = (
        "abandoned",
        "attempts",
        "held",
        "id",
        "last_seen",
        "owner",
        "retryable_as",
        "retryable_size",
    )

    def __init__(self, request_id: str, now: float) -> None:
        self.id = request_id
        self.attempts = 0
        self.last_seen = now
        self.retryable_as: str | None = None
        """The fingerprint under which a resent request joins this one (of its last failed attempt)."""
        self.retryable_size: int | None = None
        """The size of that failed attempt's body, when known."""
        self.abandoned: list[AttemptRecord] | None = None
        """Its failed attempts waiting for a retry to turn their waste from abandoned to retried."""
        self.owner: weakref.ref[Any] | None = None
        """The thread or task that made its latest attempt, when the caller said."""
        self.held = False
        """Whether its failure waits for its own context's resend (that context lives, not moved on)."""


def waste_reason_at_finish(record: AttemptRecord, later_attempts: bool) -> WasteReason | None:
    """The waste reason of a just-finished attempt: none if it succeeded or billed nothing."""
    if not record.outcome.failed or record.usage.billed_tokens == 0:
        return None
    if record.outcome is Outcome.CANCELLED:
        return WasteReason.CANCELLED  # the application's choice, not a failure a retry repeats
    return WasteReason.RETRIED if later_attempts else WasteReason.ABANDONED


class RetryTracker:
    """Assigns attempts to logical requests and re-attributes waste when a retry arrives.

    Thread-safe; called once when an attempt starts and once when it ends, never per event.
    """

    def __init__(
        self,
        *,
        window_s: float = 600.0,
        max_requests: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window_s = window_s
        self.max_requests = max_requests
        self._clock = clock
        self._lock = threading.Lock()
        self._requests: OrderedDict[str, _LogicalRequest] = OrderedDict()
        self._failed_by_fingerprint: dict[str, dict[str, _LogicalRequest]] = {}
        """Failed logical requests waiting for a resend, by fingerprint, oldest failure first."""
        self._failed_sizes: dict[int | None, int] = {}
        """How many logical requests are findable by fingerprint, by the size of the failed body."""
        self._next_sweep = 0.0

    def wants_fingerprint(self, body_size: int) -> bool:
        """Whether ``begin`` needs the fingerprint of a request body of ``body_size`` bytes.

        Only the resend of a failed attempt joins it by fingerprint, and a resent body has the
        failed one's size (a resend can only follow a failure that has already finished). When no
        failure of that size, or of unknown size, waits, the caller may leave hashing for later.
        """
        sizes = self._failed_sizes
        return bool(sizes) and (body_size in sizes or None in sizes)

    def joins(
        self,
        *,
        explicit_id: str | None,
        fingerprint: str | None,
        previous_id: str | None,
        context_id: str | None = None,
    ) -> tuple[str, int] | None:
        """The logical request ``begin`` would place such an attempt in, if it exists, and how many
        attempts it has had; places nothing."""
        with self._lock:
            request_id = explicit_id or previous_id
            request: _LogicalRequest | None = None
            if request_id is None and fingerprint is not None:
                request = self._claim(fingerprint, context_id)
            elif request_id is not None:
                request = self._requests.get(request_id)
            if request is None or self._clock() - request.last_seen > self.window_s:
                return None
            return request.id, request.attempts

    def begin(
        self,
        *,
        explicit_id: str | None,
        fingerprint: str | None,
        previous_id: str | None,
        context_id: str | None = None,
        owner: object | None = None,
    ) -> Assignment:
        """Place a new attempt.

        ``previous_id`` is set for an SDK-internal retry. ``context_id`` is the logical request of the
        last attempt made in the same thread or task, and ``owner`` that thread or task: a resend
        joins its own context's failure first, and a failure waits for its owner while the owner
        lives and has not gone on to other work.
        """
        now = self._clock()
        with self._lock:
            self._expire(now)
            request_id = explicit_id or previous_id
            request: _LogicalRequest | None = None
            by_fingerprint = False
            if request_id is None and fingerprint is not None and self._failed_by_fingerprint:
                request = self._claim(fingerprint, context_id)
                by_fingerprint = request is not None
            if context_id is not None and context_id != (request.id if request is not None else request_id):
                self._moved_on(context_id)  # its context went on to other work: others may resend it
            if request is None and request_id is not None:
                request = self._requests.get(request_id)
            if request is not None and now - request.last_seen > self.window_s:
                self._drop(request)  # out of the window, though not swept yet: as if it were gone
                request = None
                if by_fingerprint:
                    request_id = None
            if request is None:
                request = _LogicalRequest(request_id or new_id(), now)
                self._requests[request.id] = request
            else:
                self._requests.move_to_end(request.id)
                if request.retryable_as is not None:
                    self._forget_retryable(request)  # retried now; findable again only if this one fails
                request.last_seen = now
            request.attempts += 1
            request.owner = _weak(owner)
            if not request.abandoned:
                return Assignment(request.id, request.attempts)
            retried = tuple(r.with_waste(WasteReason.RETRIED) for r in request.abandoned)
            request.abandoned = None
            return Assignment(request.id, request.attempts, retried)

    def _claim(self, fingerprint: str, context_id: str | None) -> _LogicalRequest | None:
        """The failure a resend of ``fingerprint`` repeats: its own context's, else the oldest free one."""
        waiting = self._failed_by_fingerprint.get(fingerprint)
        if not waiting:
            return None
        if context_id is not None:
            own = waiting.get(context_id)
            if own is not None:
                return own
        for request in waiting.values():  # oldest first; held ones are few (one per live context)
            if not request.held or not _alive(request.owner):
                return request
        return None

    def _moved_on(self, context_id: str) -> None:
        request = self._requests.get(context_id)
        if request is not None:
            request.held = False

    def finish(self, record: AttemptRecord, *, body_size: int | None = None) -> AttemptRecord:
        """Settle a finished attempt's waste reason and remember it if it may still be retried.

        ``body_size``, the size of the request body, lets :meth:`wants_fingerprint` say no to
        bodies of other sizes while this attempt waits for a resend.
        """
        failed = record.outcome.failed
        with self._lock:
            request = self._requests.get(record.logical_request_id)
            later = request is not None and request.attempts > record.attempt_number
            reason = waste_reason_at_finish(record, later) if failed else None
            if reason is not None:
                # Not emitted yet, so this is still revision 0 of the record.
                record = dataclasses.replace(record, wasted=True, waste_reason=reason)
                if reason is WasteReason.ABANDONED and request is not None:
                    if request.abandoned is None:
                        request.abandoned = []
                    request.abandoned.append(record)
            if request is not None and not later:
                request.last_seen = self._clock()
                if request.retryable_as is not None:
                    self._forget_retryable(request)
                fingerprint = record.fingerprint  # the failed attempt's own body, never an earlier one's
                if fingerprint is not None and failed and reason is not WasteReason.CANCELLED:
                    waiting = self._failed_by_fingerprint.get(fingerprint)
                    if waiting is None:
                        waiting = self._failed_by_fingerprint[fingerprint] = {}
                    waiting[request.id] = request
                    request.retryable_as = fingerprint
                    request.retryable_size = body_size
                    request.held = request.owner is not None
                    self._failed_sizes[body_size] = self._failed_sizes.get(body_size, 0) + 1
            return record

    def _forget_retryable(self, request: _LogicalRequest) -> None:
        # Each logical request is findable by at most one fingerprint, so none outlives it. (Callers
        # on the per-attempt path test retryable_as first: most requests never failed, and the test
        # is cheaper than the call.)
        if request.retryable_as is not None:
            waiting = self._failed_by_fingerprint.get(request.retryable_as)
            if waiting is not None and waiting.pop(request.id, None) is not None and not waiting:
                del self._failed_by_fingerprint[request.retryable_as]
            request.retryable_as = None
            request.held = False
            left = self._failed_sizes[request.retryable_size] - 1
            if left:
                self._failed_sizes[request.retryable_size] = left
            else:
                del self._failed_sizes[request.retryable_size]

    def _drop(self, request: _LogicalRequest) -> None:
        del self._requests[request.id]
        self._forget_retryable(request)

    def _expire(self, now: float) -> None:
        requests = self._requests
        while len(requests) >= self.max_requests:
            evicted = requests.popitem(last=False)[1]
            if evicted.retryable_as is not None:
                self._forget_retryable(evicted)
        # Sweeping by age touches the oldest (long evicted from the CPU's caches) entries, so it runs
        # at most once a second; begin() checks the age of the one request it looks up itself.
        if now < self._next_sweep:
            return
        self._next_sweep = now + min(1.0, self.window_s)
        while requests:
            oldest = next(iter(requests.values()))
            if now - oldest.last_seen <= self.window_s:
                return
            self._drop(oldest)


def _weak(owner: object | None) -> weakref.ref[Any] | None:
    if owner is None:
        return None
    try:
        return weakref.ref(owner)
    except TypeError:  # an owner that cannot be referenced weakly holds nothing
        return None


def _alive(owner: weakref.ref[Any] | None) -> bool:
    """Whether the thread or task behind ``owner`` may still resend: it exists and has not ended."""
    found = owner() if owner is not None else None
    if found is None:
        return False
    done = getattr(found, "done", None)  # an asyncio task
    if done is not None:
        return not done()
    is_alive = getattr(found, "is_alive", None)  # a thread
    return bool(is_alive()) if is_alive is not None else True
