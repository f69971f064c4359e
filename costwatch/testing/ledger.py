"""The fake server's ledger: one frozen entry per HTTP attempt received, with what it billed.

The server records an entry before the client can observe the attempt's end (before the socket is
cut or closed, before the terminal chunk, before the error event), so a test that has just seen its
call fail or finish finds the entry already there.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .faults import Fault

__all__ = ["Ending", "Ledger", "LedgerEntry", "LedgerTotals"]

_EMPTY_COUNTS: Mapping[str, int] = MappingProxyType({})


class Ending(str, enum.Enum):
    """How the server ended one attempt."""

    COMPLETED = "completed"
    """The whole response was written (through ``message_stop`` and the terminal chunk)."""
    CUT = "cut"
    """The TCP connection was closed in the middle of the body."""
    ERROR_EVENT = "error_event"
    """An SSE ``error`` event was sent mid-stream and the body ended."""
    HTTP_ERROR = "http_error"
    """An error status and JSON error body were sent instead of a message."""
    RESET = "reset"
    """The connection was reset (RST) without any response."""
    STALL = "stall"
    """The server stopped sending (before the headers or mid-body) and closed when the client gave up."""
    MALFORMED = "malformed"
    """A malformed SSE event was sent and the body ended."""
    ENDED_EARLY = "ended_early"
    """The body ended cleanly before ``message_stop`` (no error, no cut)."""
    CLIENT_DISCONNECTED = "client_disconnected"
    """The client closed the connection before the response was written."""


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One HTTP attempt as the server saw it, and the tokens it billed for it.

    Billing rules (see ``docs/testing.md``): an attempt that got response headers for a message bills
    its input and cache tokens in full; output is the tokens of the delta events whose bytes were
    completely written (all of them for a completed stream or any non-stream body); HTTP errors,
    resets and stalls before headers bill nothing.
    """

    attempt: int
    """1-based arrival order at the server."""
    request_id: str
    method: str
    path: str
    query: str
    """The query string (``beta=true`` from the 0.x SDK's beta route; the 2.x SDK sends none)."""
    beta: bool
    """Whether the request used a beta: ``?beta=true`` or an ``anthropic-beta`` header."""
    beta_features: tuple[str, ...]
    """The ``anthropic-beta`` header's comma-separated values."""
    stream: bool
    model_requested: str
    retry_count: int | None
    """The ``x-stainless-retry-count`` header (``None`` if absent)."""
    arrival: int
    """1-based count of attempts with this exact body (the same body resent by a retry loop)."""
    request_body_bytes: int
    fault: Fault | None
    ending: Ending
    http_status: int | None
    """The status written, or ``None`` when no status line was written (reset, stall before headers)."""
    model: str | None = None
    """The model the response named (``None`` when no message was sent)."""
    message_id: str | None = None
    stop_reason: str | None = None
    """The stop reason delivered (``None`` unless ``message_delta`` or the JSON body reached the wire)."""
    input_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_5m_tokens: int = 0
    cache_write_1h_tokens: int = 0
    output_tokens: int = 0
    events_sent: int = 0
    deltas_sent: int = 0
    body_bytes_sent: int = 0
    chars_by_type: Mapping[str, int] = field(default_factory=lambda: _EMPTY_COUNTS)
    """Characters of output sent per content type (``text``, ``thinking``, ``tool_input``, ...)."""
    tokens_by_type: Mapping[str, int] = field(default_factory=lambda: _EMPTY_COUNTS)
    """Output tokens sent per content type; they add up to ``output_tokens``."""
    recorded_at: float = 0.0
    """``time.monotonic()`` when the entry was recorded."""
    billed_at: float = 0.0
    """``time.time()`` when the request arrived: the moment the usage report buckets the attempt by."""
    api_key_id: str | None = None
    """The tagged id of the API key that sent the request (a digest of the key, never the key)."""

    @property
    def cache_write_tokens(self) -> int:
        """Cache writes of both lifetimes."""
        return self.cache_write_5m_tokens + self.cache_write_1h_tokens

    @property
    def billed_tokens(self) -> int:
        """All billed tokens of the attempt."""
        return self.input_tokens + self.cache_read_tokens + self.cache_write_tokens + self.output_tokens

    @property
    def billed(self) -> bool:
        """Whether the attempt billed anything."""
        return self.billed_tokens > 0


@dataclass(frozen=True, slots=True)
class LedgerTotals:
    """Sums over ledger entries."""

    attempts: int = 0
    billed_attempts: int = 0
    input_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_5m_tokens: int = 0
    cache_write_1h_tokens: int = 0
    output_tokens: int = 0
    events_sent: int = 0
    body_bytes_sent: int = 0
    chars_by_type: Mapping[str, int] = field(default_factory=lambda: _EMPTY_COUNTS)
    tokens_by_type: Mapping[str, int] = field(default_factory=lambda: _EMPTY_COUNTS)
    endings: Mapping[str, int] = field(default_factory=lambda: _EMPTY_COUNTS)
    """Number of attempts per :class:`Ending` value."""

    @property
    def billed_tokens(self) -> int:
        """All billed tokens together."""
        return (
            self.input_tokens
            + self.cache_read_tokens
            + self.cache_write_5m_tokens
            + self.cache_write_1h_tokens
            + self.output_tokens
        )

    @classmethod
    def of(cls, entries: tuple[LedgerEntry, ...] | list[LedgerEntry]) -> LedgerTotals:
        """The totals of ``entries``."""
        chars: dict[str, int] = {}
        tokens: dict[str, int] = {}
        endings: dict[str, int] = {}
        for entry in entries:
            for key, value in entry.chars_by_type.items():
                chars[key] = chars.get(key, 0) + value
            for key, value in entry.tokens_by_type.items():
                tokens[key] = tokens.get(key, 0) + value
            endings[entry.ending.value] = endings.get(entry.ending.value, 0) + 1
        return cls(
            attempts=len(entries),
            billed_attempts=sum(1 for entry in entries if entry.billed),
            input_tokens=sum(entry.input_tokens for entry in entries),
            cache_read_tokens=sum(entry.cache_read_tokens for entry in entries),
            cache_write_5m_tokens=sum(entry.cache_write_5m_tokens for entry in entries),
            cache_write_1h_tokens=sum(entry.cache_write_1h_tokens for entry in entries),
            output_tokens=sum(entry.output_tokens for entry in entries),
            events_sent=sum(entry.events_sent for entry in entries),
            body_bytes_sent=sum(entry.body_bytes_sent for entry in entries),
            chars_by_type=MappingProxyType(chars),
            tokens_by_type=MappingProxyType(tokens),
            endings=MappingProxyType(endings),
        )


class Ledger:
    """The thread-safe list of :class:`LedgerEntry`, in the order the attempts arrived."""

    def __init__(self) -> None:
        self._entries: list[LedgerEntry] = []
        self._changed = threading.Condition()

    def record(self, entry: LedgerEntry) -> None:
        """Add ``entry``, or replace the entry of the same attempt (a correction)."""
        with self._changed:
            for position, existing in enumerate(self._entries):
                if existing.attempt == entry.attempt:
                    self._entries[position] = entry
                    break
            else:
                self._entries.append(entry)
                self._entries.sort(key=lambda e: e.attempt)
            self._changed.notify_all()

    @property
    def entries(self) -> tuple[LedgerEntry, ...]:
        """A snapshot of the entries."""
        with self._changed:
            return tuple(self._entries)

    def totals(self) -> LedgerTotals:
        """Sums over all entries."""
        return LedgerTotals.of(self.entries)

    def clear(self) -> None:
        """Forget all entries."""
        with self._changed:
            self._entries.clear()

    def wait_for(self, count: int, timeout: float = 5.0) -> tuple[LedgerEntry, ...]:
        """Block until at least ``count`` entries exist; raises ``TimeoutError`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self._entries) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"ledger has {len(self._entries)} entries, wanted {count}")
                self._changed.wait(remaining)
            return tuple(self._entries)

    def __len__(self) -> int:
        with self._changed:
            return len(self._entries)

    def __iter__(self) -> Iterator[LedgerEntry]:
        return iter(self.entries)

    def __getitem__(self, position: int) -> LedgerEntry:
        with self._changed:
            return self._entries[position]
