"""Which attempts are retries of one another, and which billed tokens were therefore wasted.

Attempts form a *logical request* in one of three ways, strongest first:

1. the application said so, with ``costwatch.logical_request(id)``;
2. the SDK retried internally (its ``x-stainless-retry-count`` header is above zero), so the attempt
   belongs with the previous attempt made in the same thread or task;
3. the request's fingerprint equals that of an attempt that *failed* within the retry window (an
   application retry loop resending the same body).

Every billed token of a failed attempt is wasted: ``abandoned`` while no later attempt of its logical
request exists, ``retried`` once one does. The tracker holds only ids, fingerprints and the pending
records, bounded in number and age.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from .records import AttemptRecord, WasteReason

__all__ = ["Assignment", "RetryTracker", "waste_reason_at_finish"]


@dataclass(frozen=True, slots=True)
class Assignment:
    """Where a new attempt belongs, and the earlier attempts it turns into ``retried`` waste."""

    logical_request_id: str
    attempt_number: int
    now_retried: tuple[AttemptRecord, ...] = ()


@dataclass(slots=True)
class _LogicalRequest:
    id: str
    attempts: int = 0
    last_seen: float = 0.0
    fingerprint: str | None = None
    retryable_as: str | None = None
    """The fingerprint under which a resent request joins this one (of its last failed attempt)."""
    abandoned: list[AttemptRecord] = field(default_factory=list)


def waste_reason_at_finish(record: AttemptRecord, later_attempts: bool) -> WasteReason | None:
    """The waste reason of a just-finished attempt: none if it succeeded or billed nothing."""
    if not record.outcome.failed or record.usage.billed_tokens == 0:
        return None
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
        self._failed_by_fingerprint: dict[str, str] = {}

    def begin(
        self, *, explicit_id: str | None, fingerprint: str | None, previous_id: str | None
    ) -> Assignment:
        """Place a new attempt; ``previous_id`` is set for an SDK-internal retry."""
        now = self._clock()
        with self._lock:
            self._expire(now)
            request_id = explicit_id or previous_id
            if request_id is None and fingerprint is not None:
                request_id = self._failed_by_fingerprint.pop(fingerprint, None)
            request = self._requests.get(request_id) if request_id is not None else None
            if request is None:
                request = _LogicalRequest(id=request_id or os.urandom(16).hex())
                self._requests[request.id] = request
            else:
                self._requests.move_to_end(request.id)
                self._forget_retryable(request)  # retried now; findable again only if this one fails
            request.attempts += 1
            request.last_seen = now
            if fingerprint is not None:
                request.fingerprint = fingerprint
            retried = tuple(r.with_waste(WasteReason.RETRIED) for r in request.abandoned)
            request.abandoned.clear()
            return Assignment(request.id, request.attempts, retried)

    def finish(self, record: AttemptRecord) -> AttemptRecord:
        """Settle a finished attempt's waste reason and remember it if it may still be retried."""
        with self._lock:
            request = self._requests.get(record.logical_request_id)
            later = request is not None and request.attempts > record.attempt_number
            reason = waste_reason_at_finish(record, later)
            if reason is not None:
                # Not emitted yet, so this is still revision 0 of the record.
                record = dataclasses.replace(record, wasted=True, waste_reason=reason)
                if reason is WasteReason.ABANDONED and request is not None:
                    request.abandoned.append(record)
            if request is not None and not later:
                request.last_seen = self._clock()
                self._forget_retryable(request)
                fingerprint = record.fingerprint or request.fingerprint
                if fingerprint is not None and record.outcome.failed:
                    self._failed_by_fingerprint[fingerprint] = request.id
                    request.retryable_as = fingerprint
            return record

    def _forget_retryable(self, request: _LogicalRequest) -> None:
        # Each logical request is findable by at most one fingerprint, so none outlives it.
        if request.retryable_as is not None:
            if self._failed_by_fingerprint.get(request.retryable_as) == request.id:
                del self._failed_by_fingerprint[request.retryable_as]
            request.retryable_as = None

    def _expire(self, now: float) -> None:
        while self._requests:
            oldest = next(iter(self._requests.values()))
            if now - oldest.last_seen <= self.window_s and len(self._requests) < self.max_requests:
                return
            self._requests.popitem(last=False)
            self._forget_retryable(oldest)
