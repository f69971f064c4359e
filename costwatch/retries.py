"""A retry loop for streams, done once and right: what the SDK cannot retry, and what every team rewrites.

The SDK retries a request whose response never started, but nothing once a stream has begun: a
connection cut mid-body surfaces as the HTTP library's own ``RemoteProtocolError`` (``httpx`` on
anthropic 0.x, ``httpx2`` on 1.x/2.x; from 2.17 on wrapped in an ``APIConnectionError`` raised from
it), a mid-stream ``overloaded_error`` as an ``APIStatusError`` with status 200.
:func:`stream_with_retries` and :func:`astream_with_retries` retry those, and the SDK's own
retryable failures, with exponential backoff and jitter, within a maximum number of
attempts and of total time, honouring ``retry-after``. They turn off the SDK's internal retries
for their calls so that ``max_attempts`` counts every HTTP attempt, and group the attempts into one
logical request. Any other exception (a bad request, the application's own) propagates unchanged.

With ``cache_prefix_on_retry=True`` a retry (never the first attempt) carries one ``cache_control``
breakpoint at the end of the request's stable prefix (see :mod:`costwatch.prompt_prefix`): the first
retry writes the prefix to the prompt cache, and each later one reads it at a tenth of the price.
"""

from __future__ import annotations

import asyncio
import email.utils
import importlib
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import context
from .prompt_prefix import with_cache_breakpoint
from .records import new_id

if TYPE_CHECKING:  # the SDK is imported when a retry loop first runs, not with costwatch
    import anthropic

__all__ = [
    "IncompleteStreamError",
    "RetriedStream",
    "RetryPolicy",
    "astream_with_retries",
    "is_retryable",
    "retry_after_s",
    "stream_with_retries",
]

log = logging.getLogger("costwatch")

_RETRYABLE_STATUSES = frozenset({408, 409, 429})
# The API's error types that a fresh attempt may not meet again (the rest describe the request).
_RETRYABLE_ERROR_TYPES = frozenset({"overloaded_error", "api_error", "rate_limit_error", "timeout_error"})


class IncompleteStreamError(Exception):
    """Every attempt's stream ended without ``message_stop`` (a proxy ended the body early)."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How long and how often to retry a stream."""

    max_attempts: int = 4
    """Attempts in all, the first included."""
    max_total_s: float = 600.0
    """No retry starts (nor waits) past this many seconds after the first attempt started."""
    initial_backoff_s: float = 0.5
    """The wait before the first retry; it doubles before each further one."""
    max_backoff_s: float = 30.0
    """The longest wait between attempts, unless the API's ``retry-after`` asks for longer."""
    jitter: float = 0.25
    """Each wait is shortened by a random fraction up to this, so that clients cut together spread out."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.max_total_s <= 0 or self.initial_backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("max_total_s must be above 0, and the backoffs at least 0")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be within [0, 1], got {self.jitter}")

    def backoff_s(self, retry: int, error: BaseException, rng: random.Random) -> float:
        """The wait before the ``retry``-th retry (1-based) after ``error``."""
        asked = retry_after_s(error)
        if asked is not None:
            return asked
        base = min(self.max_backoff_s, self.initial_backoff_s * 2 ** (retry - 1))
        return base * (1.0 - self.jitter * rng.random())


@dataclass(frozen=True, slots=True)
class RetriedStream:
    """The outcome of a stream that completed, perhaps after retries."""

    message: Any
    """The final ``Message``, as ``get_final_message()`` returns it."""
    events: tuple[Any, ...]
    """The events of the attempt that completed, in order (those of failed attempts are dropped)."""
    attempts: int
    """How many attempts it took (1: no retry)."""
    logical_request_id: str
    """The logical request the attempts were recorded under."""


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP library errors of a connection lost or timed out mid-body, on both SDK lines."""
    errors: list[type[BaseException]] = []
    for name in ("httpx", "httpx2"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        errors += [module.NetworkError, module.RemoteProtocolError, module.TimeoutException]
    return tuple(errors)


_TRANSPORT_ERRORS = _transport_errors()


class _EndedEarly(Exception):
    """A stream's body ended cleanly before ``message_stop``."""


def is_retryable(error: BaseException) -> bool:
    """Whether a fresh attempt may succeed where this one failed."""
    import anthropic

    if isinstance(error, (_EndedEarly, anthropic.APIConnectionError, *_TRANSPORT_ERRORS)):
        return True
    if isinstance(error, anthropic.APIStatusError):
        if error.response.headers.get("x-should-retry") == "false":
            return False
        status = error.status_code
        if status in _RETRYABLE_STATUSES or status >= 500:
            return True
        body = error.body
        detail = body.get("error") if isinstance(body, Mapping) else None
        # A mid-stream SSE error event arrives as status 200; its type says whether to retry.
        return isinstance(detail, Mapping) and detail.get("type") in _RETRYABLE_ERROR_TYPES
    return False


def retry_after_s(error: BaseException) -> float | None:
    """The wait the API asked for with ``retry-after-ms`` or ``retry-after``, if it did."""
    response = getattr(error, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    try:
        millis = headers.get("retry-after-ms")
        if millis is not None:
            return max(float(millis) / 1000.0, 0.0)
        seconds = headers.get("retry-after")
        if seconds is None:
            return None
        try:
            return max(float(seconds), 0.0)
        except ValueError:
            when = email.utils.parsedate_to_datetime(seconds)
            return max(when.timestamp() - time.time(), 0.0)
    except (TypeError, ValueError):
        return None


class _Retrying:
    """The state of one logical request's attempts, shared by the sync and async loops."""

    def __init__(
        self, policy: RetryPolicy, request: dict[str, Any], cache_prefix: bool, ttl: str | None
    ) -> None:
        self.policy = policy
        self.request = request
        self.started = time.monotonic()
        self.rng = random.Random()
        self.logical_request_id = context.current_logical_request() or new_id()
        self._retry_request: dict[str, Any] | None = None
        if cache_prefix:
            self._retry_request = with_cache_breakpoint(request, ttl=ttl)

    def params(self, attempt: int) -> dict[str, Any]:
        """The keyword arguments of the ``attempt``-th attempt."""
        if attempt > 1 and self._retry_request is not None:
            return self._retry_request
        return self.request

    def wait_before_retry(self, attempt: int, error: BaseException) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or None to give up and re-raise ``error``.

        Where giving up must not show ``error`` itself, raises what the caller gets instead: the waste
        budget's refusal, or :class:`IncompleteStreamError` for a stream that ended early every time.
        """
        from .budget_exceeded import WasteBudgetExceeded  # with the SDK: not when costwatch is imported

        refusal = WasteBudgetExceeded.found_in(error)
        if refusal is not None:
            raise refusal  # the SDK wrapped it in an APIConnectionError, which reads as retryable
        delay: float | None = None
        if attempt < self.policy.max_attempts and is_retryable(error):
            delay = self.policy.backoff_s(attempt, error, self.rng)
            if time.monotonic() - self.started + delay >= self.policy.max_total_s:
                delay = None
        if delay is None:
            if isinstance(error, _EndedEarly):
                raise IncompleteStreamError("the stream ended before message_stop on every attempt") from None
            return None
        log.info(
            "costwatch: attempt %d of logical request %s failed (%s); retrying in %.2f s",
            attempt,
            self.logical_request_id,
            type(error).__name__,
            delay,
        )
        return delay

    def done(self, message: Any, events: list[Any], attempt: int) -> RetriedStream:
        return RetriedStream(message, tuple(events), attempt, self.logical_request_id)


def _prepare(request: dict[str, Any]) -> dict[str, Any]:
    if request.pop("stream", True) is not True:
        raise TypeError("stream_with_retries streams: leave out stream=, or pass stream=True")
    return request


def _policy(policy: RetryPolicy | None, overrides: dict[str, Any]) -> RetryPolicy:
    if policy is not None and overrides:
        raise TypeError("pass either policy= or its fields (max_attempts=, ...), not both")
    return policy or RetryPolicy(**overrides)


_POLICY_FIELDS = ("max_attempts", "max_total_s", "initial_backoff_s", "max_backoff_s", "jitter")


def _split(request: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    overrides = {name: request.pop(name) for name in _POLICY_FIELDS if name in request}
    return overrides, request


def stream_with_retries(
    client: anthropic.Anthropic,
    *,
    cache_prefix_on_retry: bool = False,
    cache_ttl: str | None = None,
    policy: RetryPolicy | None = None,
    **request: Any,
) -> RetriedStream:
    """Stream ``client.messages.stream(**request)`` to its end, retrying the failures a retry can fix.

    ``max_attempts``, ``max_total_s``, ``initial_backoff_s``, ``max_backoff_s`` and ``jitter`` may be
    given as keywords (see :class:`RetryPolicy`). ``cache_prefix_on_retry`` adds a ``cache_control``
    breakpoint (lifetime ``cache_ttl``, default 5 minutes) at the end of the stable prefix of every
    retry, unless the request has one already. Returns the final message and the completed
    attempt's events; raises the last failure when retries run out, the first that is not
    retryable as it is, :class:`IncompleteStreamError` when every stream ended before
    ``message_stop``, and :class:`~costwatch.WasteBudgetExceeded` when the waste budget
    (:func:`costwatch.waste_budget`) refuses a retry, which is then never sent.
    """
    overrides, request = _split(request)
    state = _Retrying(_policy(policy, overrides), _prepare(request), cache_prefix_on_retry, cache_ttl)
    sdk = client.with_options(max_retries=0)
    attempt = 0
    with context.logical_request(state.logical_request_id):
        while True:
            attempt += 1
            events: list[Any] = []
            try:
                with sdk.messages.stream(**state.params(attempt)) as stream:
                    for event in stream:
                        events.append(event)
                    if not events or events[-1].type != "message_stop":
                        raise _EndedEarly
                    return state.done(stream.get_final_message(), events, attempt)
            except Exception as error:
                delay = state.wait_before_retry(attempt, error)
                if delay is None:
                    raise
                time.sleep(delay)


async def astream_with_retries(
    client: anthropic.AsyncAnthropic,
    *,
    cache_prefix_on_retry: bool = False,
    cache_ttl: str | None = None,
    policy: RetryPolicy | None = None,
    **request: Any,
) -> RetriedStream:
    """The async twin of :func:`stream_with_retries`, for ``anthropic.AsyncAnthropic``."""
    overrides, request = _split(request)
    state = _Retrying(_policy(policy, overrides), _prepare(request), cache_prefix_on_retry, cache_ttl)
    sdk = client.with_options(max_retries=0)
    attempt = 0
    with context.logical_request(state.logical_request_id):
        while True:
            attempt += 1
            events: list[Any] = []
            try:
                async with sdk.messages.stream(**state.params(attempt)) as stream:
                    async for event in stream:
                        events.append(event)
                    if not events or events[-1].type != "message_stop":
                        raise _EndedEarly
                    return state.done(await stream.get_final_message(), events, attempt)
            except Exception as error:
                delay = state.wait_before_retry(attempt, error)
                if delay is None:
                    raise
                await asyncio.sleep(delay)
