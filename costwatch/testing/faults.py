"""Scriptable faults: how the fake server breaks a response, and how faults are chosen per request.

A :class:`Fault` is a value: build it with one of its constructors (``Fault.cut_after_deltas(40)``,
``Fault.overloaded()``, ...), hand it to the server's queue, return it from a schedule callable, or
send it in the ``x-costwatch-fault`` request header (``Fault.header_value()`` gives the text).
See ``docs/testing.md`` for what the client sees and what the ledger bills for each kind.
"""

from __future__ import annotations

import enum
import hashlib
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

__all__ = [
    "FAULT_HEADER",
    "DropProfile",
    "Fault",
    "FaultKind",
    "FaultSchedule",
    "ReceivedRequest",
    "error_type_for_status",
]

FAULT_HEADER = "x-costwatch-fault"
"""The request header that forces a fault on one call (``extra_headers={FAULT_HEADER: ...}``)."""

_EMPTY_HEADERS: Mapping[str, str] = MappingProxyType({})


class FaultKind(str, enum.Enum):
    """The ways the fake server can fail a response."""

    CUT_AFTER_EVENTS = "cut_after_events"
    CUT_AFTER_DELTAS = "cut_after_deltas"
    CUT_AFTER_BYTES = "cut_after_bytes"
    CUT_MID_EVENT = "cut_mid_event"
    CUT_IN_CHUNK_SIZE = "cut_in_chunk_size"
    CUT_AFTER_SECONDS = "cut_after_seconds"
    CUT_BEFORE_MESSAGE_STOP = "cut_before_message_stop"
    ERROR_EVENT = "error_event"
    HTTP_ERROR = "http_error"
    RESET = "reset"
    STALL_BEFORE_HEADERS = "stall_before_headers"
    STALL_MID_BODY = "stall_mid_body"
    END_EARLY = "end_early"
    MALFORMED_JSON = "malformed_json"
    UNKNOWN_EVENT = "unknown_event"
    MALFORMED_THEN_END = "malformed_then_end"
    NON_UTF8_THEN_END = "non_utf8_then_end"

    @property
    def cuts(self) -> bool:
        """Whether the fault closes the TCP connection in the middle of the body."""
        return self.value.startswith("cut_")


_ERROR_TYPES: Mapping[int, str] = MappingProxyType(
    {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        413: "request_too_large",
        429: "rate_limit_error",
        500: "api_error",
        503: "api_error",
        504: "timeout_error",
        529: "overloaded_error",
    }
)


def error_type_for_status(status: int) -> str:
    """The API's ``error.type`` for an HTTP status (``api_error`` when unknown)."""
    return _ERROR_TYPES.get(status, "api_error")


@dataclass(frozen=True, slots=True)
class Fault:
    """One scripted failure of one HTTP attempt.

    ``count`` means events, ``content_block_delta`` events or body bytes, depending on ``kind``;
    ``seconds`` is a cut or stall time (``None`` for a stall: until the client hangs up).
    """

    kind: FaultKind
    count: int = 0
    seconds: float | None = None
    status: int = 529
    error_type: str = "overloaded_error"
    retry_after_s: int | None = None
    """Sent as ``retry-after`` with an HTTP error."""
    retry_after_ms: int | None = None
    """Sent as ``retry-after-ms`` with an HTTP error; the SDK prefers it, so small values keep tests fast."""

    # -- cuts ---------------------------------------------------------------------------------------
    @classmethod
    def cut_after_events(cls, count: int) -> Fault:
        """Close the connection after ``count`` whole SSE events (pings included)."""
        return cls(FaultKind.CUT_AFTER_EVENTS, count=count)

    @classmethod
    def cut_after_deltas(cls, count: int) -> Fault:
        """Close the connection right after the ``count``-th ``content_block_delta`` event."""
        return cls(FaultKind.CUT_AFTER_DELTAS, count=count)

    @classmethod
    def cut_after_bytes(cls, count: int) -> Fault:
        """Close the connection after ``count`` body bytes (chunk framing included) on the wire."""
        return cls(FaultKind.CUT_AFTER_BYTES, count=count)

    @classmethod
    def cut_mid_event(cls, after_events: int) -> Fault:
        """Write ``after_events`` whole events and half of the next one's chunk, then close."""
        return cls(FaultKind.CUT_MID_EVENT, count=after_events)

    @classmethod
    def cut_in_chunk_size(cls, after_events: int) -> Fault:
        """Write ``after_events`` whole events and the first hex digit of the next chunk-size line."""
        return cls(FaultKind.CUT_IN_CHUNK_SIZE, count=after_events)

    @classmethod
    def cut_after_seconds(cls, seconds: float) -> Fault:
        """Close the connection ``seconds`` after the response headers were written."""
        return cls(FaultKind.CUT_AFTER_SECONDS, seconds=seconds)

    @classmethod
    def cut_before_message_stop(cls) -> Fault:
        """Send everything through ``message_delta`` (full usage), then close before ``message_stop``."""
        return cls(FaultKind.CUT_BEFORE_MESSAGE_STOP)

    # -- errors -------------------------------------------------------------------------------------
    @classmethod
    def error_event(cls, after_deltas: int, error_type: str = "overloaded_error") -> Fault:
        """After ``after_deltas`` delta events, send an SSE ``error`` event and end the body."""
        return cls(FaultKind.ERROR_EVENT, count=after_deltas, error_type=error_type)

    @classmethod
    def http_error(
        cls, status: int = 529, *, retry_after_s: int | None = None, retry_after_ms: int | None = 1
    ) -> Fault:
        """Answer with ``status`` and the API's JSON error body instead of a message."""
        return cls(
            FaultKind.HTTP_ERROR,
            status=status,
            error_type=error_type_for_status(status),
            retry_after_s=retry_after_s,
            retry_after_ms=retry_after_ms,
        )

    @classmethod
    def overloaded(cls, *, retry_after_s: int | None = None, retry_after_ms: int | None = 1) -> Fault:
        """HTTP 529 ``overloaded_error`` before the body."""
        return cls.http_error(529, retry_after_s=retry_after_s, retry_after_ms=retry_after_ms)

    @classmethod
    def internal_server_error(
        cls, *, retry_after_s: int | None = None, retry_after_ms: int | None = 1
    ) -> Fault:
        """HTTP 500 ``api_error`` before the body."""
        return cls.http_error(500, retry_after_s=retry_after_s, retry_after_ms=retry_after_ms)

    @classmethod
    def rate_limited(cls, *, retry_after_s: int | None = None, retry_after_ms: int | None = 1) -> Fault:
        """HTTP 429 ``rate_limit_error`` before the body."""
        return cls.http_error(429, retry_after_s=retry_after_s, retry_after_ms=retry_after_ms)

    # -- no response --------------------------------------------------------------------------------
    @classmethod
    def reset(cls) -> Fault:
        """Read the request, then reset the connection (RST, via ``SO_LINGER`` 0) without answering."""
        return cls(FaultKind.RESET)

    @classmethod
    def stall_before_headers(cls, seconds: float | None = None) -> Fault:
        """Send no byte for ``seconds`` (``None``: until the client gives up), then close."""
        return cls(FaultKind.STALL_BEFORE_HEADERS, seconds=seconds)

    @classmethod
    def stall_mid_body(cls, after_deltas: int, seconds: float | None = None) -> Fault:
        """After ``after_deltas`` delta events, send nothing more for ``seconds``, then close."""
        return cls(FaultKind.STALL_MID_BODY, count=after_deltas, seconds=seconds)

    @classmethod
    def end_early(cls, after_deltas: int) -> Fault:
        """After ``after_deltas`` delta events, end the body cleanly (terminal chunk), without
        ``message_delta`` or ``message_stop`` — as a proxy that gives up politely does."""
        return cls(FaultKind.END_EARLY, count=after_deltas)

    # -- malformed streams --------------------------------------------------------------------------
    @classmethod
    def malformed_json(cls, after_events: int) -> Fault:
        """After ``after_events`` events, send a delta event whose data is broken JSON, then end the body."""
        return cls(FaultKind.MALFORMED_JSON, count=after_events)

    @classmethod
    def unknown_event(cls, after_events: int) -> Fault:
        """Insert an event of a type no SDK knows after ``after_events`` events; the stream goes on."""
        return cls(FaultKind.UNKNOWN_EVENT, count=after_events)

    @classmethod
    def malformed_then_end(cls, after_events: int) -> Fault:
        """Insert a delta event whose data is broken JSON after ``after_events`` events; the stream then
        goes on to its normal end (``message_delta``, ``message_stop``), billed in full."""
        return cls(FaultKind.MALFORMED_THEN_END, count=after_events)

    @classmethod
    def non_utf8_then_end(cls, after_events: int) -> Fault:
        """Insert a delta event with bytes that are not UTF-8 after ``after_events`` events; the stream
        then goes on to its normal end, billed in full."""
        return cls(FaultKind.NON_UTF8_THEN_END, count=after_events)

    # -- header form --------------------------------------------------------------------------------
    def header_value(self) -> str:
        """This fault as ``x-costwatch-fault`` header text: ``kind`` or ``kind:field=value,...``."""
        defaults = Fault.from_header(self.kind.value)
        parts = [
            f"{f.name}={getattr(self, f.name)}"
            for f in fields(self)
            if f.name != "kind" and getattr(self, f.name) != getattr(defaults, f.name)
        ]
        return self.kind.value + (":" + ",".join(parts) if parts else "")

    @classmethod
    def from_header(cls, text: str) -> Fault:
        """Parse ``x-costwatch-fault`` header text (see :meth:`header_value`); raises ``ValueError``."""
        kind_text, _, args_text = text.strip().partition(":")
        kind = FaultKind(kind_text.strip())
        kwargs: dict[str, Any] = {}
        if kind is FaultKind.HTTP_ERROR:
            kwargs["retry_after_ms"] = 1
        converters: dict[str, Callable[[str], Any]] = {
            "count": int,
            "seconds": float,
            "status": int,
            "error_type": str,
            "retry_after_s": int,
            "retry_after_ms": int,
        }
        for item in filter(None, (part.strip() for part in args_text.split(","))):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or key not in converters:
                raise ValueError(f"bad fault argument {item!r}")
            value = value.strip()
            kwargs[key] = None if value == "None" else converters[key](value)
        if kind is FaultKind.HTTP_ERROR and "status" in kwargs and "error_type" not in kwargs:
            kwargs["error_type"] = error_type_for_status(kwargs["status"])
        return cls(kind, **kwargs)


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """What a fault schedule sees of one HTTP attempt (no API key: the header is dropped)."""

    method: str
    path: str
    """The path without the query string, such as ``/v1/messages``."""
    query: str
    headers: Mapping[str, str] = field(default_factory=lambda: _EMPTY_HEADERS)
    """Lower-cased header names; ``x-api-key`` and ``authorization`` are left out."""
    body: Any = None
    """The parsed JSON body, or ``None`` when it was not JSON."""
    body_digest: str = ""
    """SHA-256 of the raw body: identical resends (retries) share it."""
    arrival: int = 1
    """1-based count of attempts received so far with this exact body: a retry loop gets 1, 2, 3, ..."""
    attempt: int = 1
    """1-based count of all attempts received by the server."""
    api_key_id: str | None = None
    """Which key sent it, as the fake's usage report names keys (never the key itself)."""

    @property
    def beta_features(self) -> tuple[str, ...]:
        """The betas named in the ``anthropic-beta`` header."""
        header = self.headers.get("anthropic-beta", "")
        return tuple(part.strip() for part in header.split(",") if part.strip())

    @property
    def beta(self) -> bool:
        """Whether a beta was used: the 0.x SDK's ``?beta=true`` route or an ``anthropic-beta`` header.

        The 2.x SDK sends ``client.beta.messages`` to plain ``/v1/messages``: without betas named,
        its beta calls look like any other on the wire.
        """
        return "beta=true" in self.query.split("&") or bool(self.beta_features)

    @property
    def stream(self) -> bool:
        """Whether the body asked for a stream (on Bedrock, the path: ``/invoke-with-response-stream``)."""
        if self.path.endswith("/invoke-with-response-stream"):
            return True
        return isinstance(self.body, dict) and bool(self.body.get("stream"))

    @property
    def retry_count(self) -> int | None:
        """The SDK's ``x-stainless-retry-count`` header, when sent."""
        value = self.headers.get("x-stainless-retry-count")
        return int(value) if value is not None and value.isdigit() else None


FaultSchedule = Callable[[ReceivedRequest], "Fault | None"]
"""A callable that picks the fault (or none) for each received request."""


@dataclass(frozen=True, slots=True)
class DropProfile:
    """Drop a random share of streams in the middle of a random ``content_block_delta`` event.

    Whether a request is dropped, and where, depends only on ``seed``, the request body and its
    arrival number, so a run is reproducible however the requests interleave.
    """

    drop_rate: float
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.drop_rate <= 1.0:
            raise ValueError("drop_rate must be within [0, 1]")

    def choose(self, request: ReceivedRequest, delta_events: int) -> int | None:
        """The 1-based delta event to cut in the middle of, or ``None`` to let the stream complete."""
        if delta_events <= 0 or self.drop_rate <= 0.0:
            return None
        key = f"{self.seed}:{request.body_digest}:{request.arrival}".encode()
        rng = random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))
        if rng.random() >= self.drop_rate:
            return None
        return rng.randint(1, delta_events)
