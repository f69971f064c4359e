"""Exact output of cut streams: the text that arrived, counted by the Messages API (opt-in).

The API reports a stream's output tokens only at its end; for a stream cut before that, costwatch
estimates them (:mod:`costwatch.estimation`). With ``instrument(count_partial_output=True)`` it also
asks the Messages API's ``POST /v1/messages/count_tokens`` (free, and rate-limited apart from
messages) for the tokens of the text that did arrive, and records that figure with ``output_source``
``counted`` (docs/estimation.md says what it is exact to).

* The record of a cut stream waits here, in memory, until its count is made or fails, then goes to
  the pipeline once: counted, or with its estimate. No sink sees the estimate first, so no rollup,
  metric or exporter has a figure to take back; nor does a listener (the attempt's span ends then,
  with the counted figure: docs/tracing.md). A waste flip (``abandoned`` to ``retried``) of a
  waiting record replaces it here; a flip of a record already counted gets its count
  (:meth:`PartialOutputCounter.revision`).
* The application never waits: one daemon thread makes the counts, from a bounded queue, at most
  ``count_partial_output_rate`` calls a second (a token bucket). A record waits at most
  :data:`HOLD_S`; past that, with the queue full, or on any failure of a count (an error status, a
  timeout, no connection), it keeps its estimate. Failures are counted as instrumentation errors and
  logged once; a 429 also pauses the counts for its ``retry-after``.
* Each content type's text (text, thinking, tool input) is counted as the text of one user message,
  never as an assistant prefill (which Claude 4.6 and later reject). The message's framing is taken
  off by a baseline per URL and model, counted once and cached: a user message of one character,
  which is one token in any tokenizer.
* The counts go where the SDK's request went, with its headers (its key or token, API version and
  betas), which are held in memory only until the count is made and never stored or logged, like
  the text. Attempts to Bedrock, Vertex AI and Foundry are not counted (docs/platforms.md).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any

from .health import instrumentation_errors
from .records import AttemptRecord, OutputSource, Usage, WasteReason

__all__ = [
    "BURST_CALLS",
    "CALL_TIMEOUT_S",
    "HOLD_S",
    "MAX_PENDING",
    "CountTarget",
    "PartialOutputCounter",
    "count_target",
]

log = logging.getLogger("costwatch")

HOLD_S = 60.0
"""The longest a cut stream's record waits for its count before it goes out with its estimate."""
CALL_TIMEOUT_S = 10.0
"""How long one ``count_tokens`` call may take (each socket operation)."""
MAX_PENDING = 1000
"""Cut streams waiting to be counted, at most; beyond it a record keeps its estimate at once."""
MAX_PENDING_CHARS = 32 * 1024 * 1024
"""Characters of text waiting to be counted, at most (the memory the waiting texts may hold)."""
BURST_CALLS = 10
"""Calls the token bucket allows at once, after a quiet spell, before the rate applies."""
_RETRY_AFTER_MAX_S = 60.0
_COUNT_SUFFIX = "/count_tokens"
_MESSAGES_SUFFIX = "/v1/messages"
_BASELINE_TEXT = "."
"""The one-character user message whose count, less its one token, is a message's framing."""
# Headers of the SDK's request that describe that request or its connection, not the caller.
_NOT_FORWARDED = frozenset(
    {
        "host",
        "content-length",
        "content-type",
        "accept",
        "accept-encoding",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "upgrade",
        "expect",
        "idempotency-key",
        "x-stainless-retry-count",
        "x-stainless-timeout",
        "x-stainless-read-timeout",
    }
)


class CountTarget:
    """Where, and as whom, to count an attempt's text: the SDK request's URL and headers (in memory only)."""

    __slots__ = ("headers", "url")

    def __init__(self, url: str, headers: tuple[tuple[str, str], ...]) -> None:
        self.url = url
        """The ``count_tokens`` URL beside the request's ``/v1/messages`` (its query kept: ``?beta=true``)."""
        self.headers = headers

    def __repr__(self) -> str:
        # Never the headers: they hold the API key.
        return f"CountTarget({self.url!r}, <{len(self.headers)} headers>)"


def count_target(url: Any, raw_headers: Iterable[tuple[bytes, bytes]]) -> CountTarget | None:
    """The count target of a first-party Messages request (its ``httpx`` URL and raw headers), if any."""
    base, _, query = str(url).partition("?")
    if not base.endswith(_MESSAGES_SUFFIX):
        return None
    headers = tuple(
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in raw_headers
        if name.decode("latin-1").lower() not in _NOT_FORWARDED
    )
    return CountTarget(base + _COUNT_SUFFIX + (f"?{query}" if query else ""), headers)


class _CountFailed(Exception):
    """A count that could not be made; the message names why, never a header or the text."""


class _RateLimited(_CountFailed):
    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"count_tokens answered 429 (retry after {retry_after_s:g} s)")
        self.retry_after_s = retry_after_s


class _OutOfTime(Exception):
    """The record's wait for its count ran out while calls waited for the rate limit."""


def _post_count(target: CountTarget, body: bytes, timeout_s: float) -> int:
    """``POST`` a ``count_tokens`` body with the SDK request's headers; its ``input_tokens``.

    Plain ``urllib``, not the SDK's HTTP client: costwatch's hooks on that client must not see it.
    """
    headers = {**dict(target.headers), "content-type": "application/json", "accept": "application/json"}
    request = urllib.request.Request(target.url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            payload = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        retry_after = exc.headers.get("retry-after") if exc.headers is not None else None
        exc.close()
        if exc.code == 429:
            raise _RateLimited(_seconds(retry_after)) from None
        raise _CountFailed(f"count_tokens answered HTTP {exc.code}") from None
    except (OSError, ValueError) as exc:  # URLError, timeouts and resets are OSErrors
        raise _CountFailed(f"count_tokens did not answer ({type(exc).__name__})") from None
    tokens = payload.get("input_tokens") if isinstance(payload, Mapping) else None
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise _CountFailed("count_tokens answered without a count of input_tokens")
    return tokens


def _seconds(text: str | None) -> float:
    try:
        value = float(text) if text else 1.0
    except ValueError:
        value = 1.0
    return min(max(value, 0.0), _RETRY_AFTER_MAX_S)


class _TokenBucket:
    """``rate`` calls a second on average, ``burst`` at once; a 429 pauses it."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.tokens = float(burst)
        self.at = clock()
        self.paused_until = 0.0

    def wait_s(self) -> float:
        """Seconds until a call may be made (0: now)."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if now < self.paused_until:
            return self.paused_until - now
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate

    def take(self) -> None:
        self.tokens -= 1

    def pause(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, self.clock() + seconds)


class _Job:
    """One cut stream to count: its record (the latest revision), where to count, and its text."""

    __slots__ = ("chars", "deadline", "done", "on_sent", "record", "target", "texts")

    def __init__(
        self,
        record: AttemptRecord,
        target: CountTarget,
        texts: Mapping[str, str],
        deadline: float,
        on_sent: Callable[[AttemptRecord], None] | None,
    ) -> None:
        self.record = record
        self.target = target
        self.texts = texts
        self.chars = sum(map(len, texts.values()))
        self.deadline = deadline
        self.done = False
        self.on_sent = on_sent


class PartialOutputCounter:
    """Holds the records of cut streams until the API has counted the text they received.

    ``submit`` hands a record on (the pipeline's ``submit``); ``with_usage`` gives a record with a new
    usage, priced. ``rate_per_s`` bounds the calls; ``remember_s`` is how long a counted record's
    count is kept for its waste flip (the retry window). ``observe`` learns of each counted record (to
    calibrate the estimator on it). ``hold_s`` and ``call_timeout_s`` default to :data:`HOLD_S` and
    :data:`CALL_TIMEOUT_S`.
    """

    def __init__(
        self,
        *,
        submit: Callable[[AttemptRecord], None],
        with_usage: Callable[[AttemptRecord, Usage], AttemptRecord],
        rate_per_s: float,
        remember_s: float = 600.0,
        observe: Callable[[AttemptRecord], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        hold_s: float | None = None,
        call_timeout_s: float | None = None,
    ) -> None:
        self._submit = submit
        self._with_usage = with_usage
        self._observe = observe
        self._clock = clock
        self.hold_s = HOLD_S if hold_s is None else hold_s
        self.call_timeout_s = CALL_TIMEOUT_S if call_timeout_s is None else call_timeout_s
        self.remember_s = remember_s
        self._bucket = _TokenBucket(rate_per_s, BURST_CALLS, clock)
        self._baselines: dict[tuple[str, str], int] = {}
        self._behind_logged = False
        self._limited_logged = False
        self._reset()
        _live.add(self)

    def _reset(self) -> None:
        # Reentrant: drain() runs in a SIGTERM handler, which may have interrupted this thread inside
        # hold() or revision(); it then waits (within its deadline) instead of deadlocking.
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._queue: deque[_Job] = deque()
        self._pending: dict[str, _Job] = {}
        self._pending_chars = 0
        self._counted: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._thread: threading.Thread | None = None

    # -- the hooks' side ---------------------------------------------------------------------------
    def hold(
        self,
        record: AttemptRecord,
        target: CountTarget,
        texts: Mapping[str, str],
        on_sent: Callable[[AttemptRecord], None] | None = None,
    ) -> bool:
        """Take a cut stream's record to count ``texts`` (by content type); False to leave it to the
        caller (nothing to count, or too much waiting already). Never blocks. ``on_sent`` is called
        with the record as it goes to the pipeline (counted or not), on this object's thread, outside
        its lock; it must not raise."""
        texts = {kind: text for kind, text in texts.items() if text}
        if not texts or self._stop.is_set():
            return False
        job = _Job(record, target, texts, self._clock() + self.hold_s, on_sent)
        with self._lock:
            if len(self._pending) >= MAX_PENDING or self._pending_chars + job.chars > MAX_PENDING_CHARS:
                return False
            self._pending[record.attempt_id] = job
            self._pending_chars += job.chars
            self._queue.append(job)
            self._changed.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="costwatch-counter", daemon=True)
                self._thread.start()
        return True

    def revision(self, record: AttemptRecord) -> AttemptRecord | None:
        """A later revision of an attempt (a waste flip), as it should go out: ``None`` while its
        attempt waits here to be counted (the revision waits with it), with the count once counted."""
        with self._lock:
            job = self._pending.get(record.attempt_id)
            if job is not None and not job.done:
                if record.revision > job.record.revision:
                    job.record = record
                return None
            counted = self._counted.get(record.attempt_id)
        return self._with_count(record, counted[0]) if counted is not None else record

    @property
    def pending(self) -> int:
        """Records waiting for their count."""
        return len(self._pending)

    def wait(self, timeout: float | None) -> bool:
        """Wait until every record held so far went out (counted or not); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._pending:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._changed.wait(remaining)
        return True

    def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the counts, then send what still waits with its estimate (at exit,
        or when costwatch is uninstrumented: nothing held is lost)."""
        if self.wait(timeout):
            return
        with self._lock:
            left = [job for job in self._pending.values() if not job.done]
            sent = [(job, self._finish(job, None)) for job in left]
            self._queue.clear()
        for job, record in sent:
            _tell(job, record)

    def close(self, timeout: float = 10.0) -> None:
        """:meth:`drain`, then stop the counting thread."""
        self.drain(timeout)
        self._stop.set()
        with self._lock:
            self._changed.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(self.call_timeout_s)

    # -- the counting thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stop.is_set():
                    self._changed.wait()
                if self._stop.is_set():
                    return
                job = self._queue.popleft()
            try:
                tokens: int | None = self._count(job)
            except _OutOfTime:
                tokens = None
                if not self._behind_logged:
                    self._behind_logged = True
                    log.warning(
                        "costwatch: count_partial_output is behind its rate limit; cut streams it could "
                        "not count within %g s keep their estimate (see docs/estimation.md)",
                        self.hold_s,
                    )
            except _RateLimited as exc:
                tokens = None
                self._bucket.pause(exc.retry_after_s)
                instrumentation_errors.record("count_partial_output", exc)
            except Exception as exc:  # any failure: the record keeps its estimate
                tokens = None
                instrumentation_errors.record("count_partial_output", exc)
            with self._lock:
                sent = None if job.done else self._finish(job, tokens)
            if sent is not None:
                _tell(job, sent)

    def _finish(self, job: _Job, tokens: int | None) -> AttemptRecord:
        """Send a job's record on, with its count if made (the caller holds the lock); the record sent.
        The caller then tells the job's ``on_sent`` (:func:`_tell`), outside the lock: a listener may
        take its time (a span processor that exports as a span ends), and ``hold`` must not wait."""
        job.done = True
        record = job.record
        if tokens is not None:
            record = self._with_count(record, tokens)
            if self._observe is not None:
                try:
                    self._observe(record)
                except Exception as exc:
                    instrumentation_errors.record("count_partial_output", exc)
            if record.waste_reason is WasteReason.ABANDONED:  # a retry may still flip it
                now = self._clock()
                self._counted[record.attempt_id] = (tokens, now + self.remember_s)
                while self._counted and (
                    len(self._counted) > MAX_PENDING * 10 or next(iter(self._counted.values()))[1] < now
                ):
                    self._counted.popitem(last=False)
        # Under the lock: a revision arriving now waits for this record, or finds its count.
        self._submit(record)
        del self._pending[job.record.attempt_id]
        self._pending_chars -= job.chars
        job.texts = {}
        self._changed.notify_all()
        return record

    def _with_count(self, record: AttemptRecord, tokens: int) -> AttemptRecord:
        usage = replace(
            record.usage,
            output_tokens=tokens,
            output_source=OutputSource.COUNTED,
            output_estimated=False,
            estimated_output_tokens=0,
        )
        return self._with_usage(record, usage)

    def _count(self, job: _Job) -> int:
        """The output tokens of the job's text: each content type as one user message, less its framing."""
        model = job.record.model_name
        framing = self._framing(job, model)
        return sum(max(self._call(job, model, text) - framing, 0) for text in job.texts.values())

    def _framing(self, job: _Job, model: str) -> int:
        key = (job.target.url, model)
        framing = self._baselines.get(key)
        if framing is None:
            framing = self._baselines[key] = self._call(job, model, _BASELINE_TEXT) - 1
        return framing

    def _call(self, job: _Job, model: str, text: str) -> int:
        while True:
            wait = self._bucket.wait_s()
            if wait <= 0:
                break
            if self._clock() + wait > job.deadline:
                raise _OutOfTime
            if self._stop.wait(wait):
                raise _OutOfTime
        self._bucket.take()
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": text}]}).encode()
        timeout = min(self.call_timeout_s, max(job.deadline - self._clock(), 0.1))
        return _post_count(job.target, body, timeout)

    def _after_fork_in_child(self) -> None:
        # The waiting records are the parent's to send; the child starts empty, its thread lazily.
        self._reset()


def _tell(job: _Job, record: AttemptRecord) -> None:
    on_sent, job.on_sent = job.on_sent, None
    if on_sent is not None:
        on_sent(record)


_live: weakref.WeakSet[PartialOutputCounter] = weakref.WeakSet()


def _reset_in_child() -> None:
    for counter in list(_live):
        counter._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_in_child)
