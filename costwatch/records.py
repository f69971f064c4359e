"""The attempt record: one immutable row per HTTP attempt to the Messages API.

Everything downstream of the SDK hooks (the store, the metrics, the spans, the reports) consumes
these records and nothing else, so this module imports nothing from the rest of costwatch.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import math
import os
import random
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any, TypeVar

__all__ = [
    "WORKFLOW_LABEL_LENGTH",
    "AttemptRecord",
    "AttemptStart",
    "Cost",
    "Outcome",
    "OutputSource",
    "TokenType",
    "Usage",
    "WasteReason",
    "fingerprint_of",
    "new_id",
]

_EMPTY: Mapping[str, Any] = MappingProxyType({})

WORKFLOW_LABEL_LENGTH = 64
"""How much of the ``workflow`` tag labels metrics and rollups (tags themselves keep 200 characters)."""


def fingerprint_of(body: bytes) -> str:
    """The fingerprint of a request body: a 128-bit hash that identifies a resent body, never its content."""
    return hashlib.blake2b(body, digest_size=16).hexdigest()


# Ids need uniqueness, not secrecy: a private generator seeded from the OS is 3x cheaper than
# os.urandom per id. It is private so an application's random.seed() cannot make two processes
# draw the same ids, and reseeded in a forked child, which would otherwise repeat its parent's.
_ids = random.Random(os.urandom(32))
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: _ids.seed(os.urandom(32)))


# UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then the version (7) and variant (0b10) bits over
# 80 random bits, of which 74 are left.
_V7_CLEAR = ((1 << 128) - 1) ^ (0xF << 76 | 0x3 << 62)
_V7_SET = 0x7 << 76 | 0x2 << 62


def new_id() -> str:
    """A fresh id for an attempt or a logical request: a UUIDv7 as 32 hex digits.

    Ids start with the time they were drawn (to the millisecond), so ids drawn later sort later:
    the store's indexes on them grow at one end instead of at random places (a SQLite or
    PostgreSQL B-tree then touches a few pages per batch, not one per row). The other 74 bits
    are random.
    """
    return (
        ((time.time_ns() // 1_000_000 << 80 | _ids.getrandbits(80)) & _V7_CLEAR | _V7_SET)
        .to_bytes(16, "big")
        .hex()
    )


_Frozen = TypeVar("_Frozen", bound=type)


def _fast_frozen_init(cls: _Frozen) -> _Frozen:
    """Give a frozen, slotted dataclass an ``__init__`` that fills its slots directly.

    The ``__init__`` that dataclasses generates for a frozen class calls ``object.__setattr__`` once
    per field, which made building a record a tenth of an attempt's whole cost on the caller's
    thread (the attempt-cost benchmark's 1 KB row would miss its target without this; see
    benchmarks/README.md). This one has the same signature and effect. It lends the new instance,
    for the length of the call, a mutable twin class with the same slots (so the same layout): under the twin,
    ``self.field = value`` is a plain slot store, several times cheaper than calling each slot's
    descriptor, and the instance gets its own class back before anyone else can see it. An
    instance of a subclass, whose layout may differ, is filled through the descriptors instead.
    Every default of the classes it is used on is immutable, so a ``default_factory`` is called
    once here and its value shared. A ``__post_init__`` is called at the end, as dataclasses do.
    """
    if any(getattr(base, "__slots__", ()) for base in cls.__mro__[1:]):
        raise TypeError(f"{cls.__name__}: a fast __init__ would skip a base's slots")
    # Called last, on the instance's own class (a frozen class sets through object.__setattr__).
    post_init = "    self.__post_init__()" if hasattr(cls, "__post_init__") else ""
    params: list[str] = []
    stores: list[str] = []
    sets: list[str] = []
    # Where __class__ assignment stops the world (free-threaded CPython), fill through descriptors.
    borrow = getattr(sys, "_is_gil_enabled", lambda: True)()
    namespace: dict[str, Any] = {
        "_cls": cls if borrow else None,
        "_twin": type(f"_Open{cls.__name__}", (), {"__slots__": cls.__slots__}),  # type: ignore[attr-defined]
        "_set_class": object.__setattr__,
    }
    for i, f in enumerate(dataclasses.fields(cls)):
        namespace[f"_set{i}"] = cls.__dict__[f.name].__set__
        if f.default is not dataclasses.MISSING:
            namespace[f"_default{i}"] = f.default
            params.append(f"{f.name}=_default{i}")
        elif f.default_factory is not dataclasses.MISSING:
            namespace[f"_default{i}"] = f.default_factory()
            params.append(f"{f.name}=_default{i}")
        else:
            params.append(f.name)
        stores.append(f"        self.{f.name} = {f.name}")
        sets.append(f"        _set{i}(self, {f.name})")
    source = "\n".join(
        [
            f"def __init__(self, {', '.join(params)}):",
            "    if type(self) is _cls:",
            "        _set_class(self, '__class__', _twin)",
            *stores,
            "        self.__class__ = _cls",
            "    else:",
            *sets,
            post_init,
            "",
        ]
    )
    exec(source, namespace)
    init: Callable[..., None] = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = init  # type: ignore[misc]
    return cls


class Outcome(str, enum.Enum):
    """How one HTTP attempt ended."""

    COMPLETED = "completed"
    """The response arrived whole (a JSON body, or a stream through ``message_stop``)."""
    DROPPED = "dropped"
    """The connection was lost in the middle of the body (the seed's ``RemoteProtocolError``)."""
    STREAM_ERROR = "stream_error"
    """The server sent an SSE ``error`` event (for example ``overloaded_error``) mid-stream."""
    HTTP_ERROR = "http_error"
    """The server answered with an error status (429, 500, 529, ...) before any body."""
    CONNECT_ERROR = "connect_error"
    """No response at all: refused, reset, or timed out before the headers."""
    CANCELLED = "cancelled"
    """The application stopped reading (``break``, ``close()``, task cancellation, garbage collection)."""
    INTERRUPTED = "interrupted"
    """The process exited (``SIGTERM``, interpreter exit) while the attempt was still in flight."""

    @property
    def failed(self) -> bool:
        """Whether the attempt did not deliver a whole response."""
        return self is not Outcome.COMPLETED


class WasteReason(str, enum.Enum):
    """Why the billed tokens of a failed attempt count as wasted."""

    RETRIED = "retried"
    """A later attempt of the same logical request exists: these tokens were paid for twice."""
    ABANDONED = "abandoned"
    """No later attempt exists (yet): the tokens bought nothing."""
    CANCELLED = "cancelled"
    """The application stopped reading (break, close, cancellation): its choice, not retry waste."""


class OutputSource(str, enum.Enum):
    """Where an attempt's output token count came from (``Usage.output_source``)."""

    REPORTED = "reported"
    """The API reported the output usage (a completed response, or a ``message_delta`` before the cut)."""
    ESTIMATED = "estimated"
    """The stream was cut before the API reported it: estimated from the text received
    (``costwatch.estimation``); ``Usage.output_estimated`` is then true."""
    COUNTED = "counted"
    """The stream was cut, and the text received was counted exactly by the Messages API's
    ``count_tokens`` endpoint (``instrument(count_partial_output=True)``; docs/estimation.md)."""
    RECONCILED = "reconciled"
    """Set by reconciliation: the count was corrected from Anthropic's own usage report."""


class TokenType(str, enum.Enum):
    """The billed token kinds, as used in metric labels and report columns."""

    INPUT = "input"
    OUTPUT = "output"
    CACHE_READ = "cache_read"
    CACHE_WRITE = "cache_write"


@_fast_frozen_init
@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens billed for one attempt.

    ``input_tokens`` excludes cache reads and writes, as in the API's ``usage`` object. When
    ``output_estimated`` is true, ``estimated_output_tokens`` of ``output_tokens`` were estimated
    from the text that arrived before the stream was cut; the rest were reported by the API.
    ``output_source`` says where ``output_tokens`` came from; ``output_estimated`` is true exactly
    when it is ``estimated`` (a usage built with only the flag set is ``estimated``).
    """

    input_tokens: int = 0
    cache_write_5m_tokens: int = 0
    cache_write_1h_tokens: int = 0
    cache_read_tokens: int = 0
    output_tokens: int = 0
    output_estimated: bool = False
    estimated_output_tokens: int = 0
    tokens_clamped: bool = False
    """Whether a count beyond what any attempt can bill was clamped (see :mod:`costwatch.validation`)."""
    output_source: OutputSource = OutputSource.REPORTED
    """Where ``output_tokens`` came from: reported by the API, estimated, counted or reconciled."""

    def __post_init__(self) -> None:
        # One account of the output's source: code that sets only the older flag means "estimated",
        # and a source decides the flag (a counted or reconciled figure is no estimate).
        source, flagged = self.output_source, self.output_estimated
        if flagged is (source is OutputSource.ESTIMATED):
            return
        if flagged and source is OutputSource.REPORTED:
            object.__setattr__(self, "output_source", OutputSource.ESTIMATED)
        elif flagged:
            object.__setattr__(self, "output_estimated", False)
        else:
            object.__setattr__(self, "output_estimated", True)
            if not self.estimated_output_tokens:
                object.__setattr__(self, "estimated_output_tokens", self.output_tokens)

    @property
    def cache_write_tokens(self) -> int:
        """Cache writes of both lifetimes."""
        return self.cache_write_5m_tokens + self.cache_write_1h_tokens

    @property
    def billed_tokens(self) -> int:
        """Every billed token of the attempt, all kinds together."""
        return self.input_tokens + self.cache_write_tokens + self.cache_read_tokens + self.output_tokens

    def by_type(self) -> dict[TokenType, int]:
        """The billed tokens keyed by :class:`TokenType`."""
        return {
            TokenType.INPUT: self.input_tokens,
            TokenType.OUTPUT: self.output_tokens,
            TokenType.CACHE_READ: self.cache_read_tokens,
            TokenType.CACHE_WRITE: self.cache_write_tokens,
        }


@_fast_frozen_init
@dataclass(frozen=True, slots=True)
class Cost:
    """The price of one attempt in US dollars, by component."""

    input_usd: float = 0.0
    cache_write_usd: float = 0.0
    cache_read_usd: float = 0.0
    output_usd: float = 0.0
    server_tool_usd: float = 0.0
    """Fees for server tools the API reported using (web searches), on top of the tokens."""

    @property
    def total_usd(self) -> float:
        """The sum of the components."""
        return (
            self.input_usd
            + self.cache_write_usd
            + self.cache_read_usd
            + self.output_usd
            + self.server_tool_usd
        )

    def by_type(self) -> dict[TokenType, float]:
        """The cost keyed by :class:`TokenType`."""
        return {
            TokenType.INPUT: self.input_usd,
            TokenType.OUTPUT: self.output_usd,
            TokenType.CACHE_READ: self.cache_read_usd,
            TokenType.CACHE_WRITE: self.cache_write_usd,
        }


@_fast_frozen_init
@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One HTTP attempt to the Messages API, with what it billed, whether it was wasted and its price.

    Records hold no prompt or completion text and no credentials. A record whose waste attribution
    changes after the fact (an ``abandoned`` attempt whose retry arrives) is emitted again with the
    same ``attempt_id`` and a higher ``revision``; sinks keep the highest revision.
    """

    attempt_id: str
    logical_request_id: str
    attempt_number: int
    """1-based position of this attempt within its logical request (SDK and application retries)."""
    started_at: datetime
    """When the request was sent (timezone-aware, UTC)."""
    outcome: Outcome
    model_requested: str = ""
    model: str | None = None
    """The model the API answered with, when a response said so."""
    stream: bool = False
    beta_features: tuple[str, ...] = ()
    request_id: str | None = None
    """Anthropic's ``request-id`` response header."""
    message_id: str | None = None
    sdk_retry: int = 0
    """The SDK's own retry count for this attempt (``x-stainless-retry-count``)."""
    http_status: int | None = None
    error_type: str | None = None
    """The class name of the exception the application saw from this attempt, if any."""
    api_error_type: str | None = None
    """The API's error type, such as ``overloaded_error``, from an error body or SSE ``error`` event."""
    time_to_first_token_s: float | None = None
    duration_s: float = 0.0
    usage: Usage = field(default_factory=Usage)
    server_tool_use: Mapping[str, int] = field(default_factory=lambda: _EMPTY)
    stop_reason: str | None = None
    events_received: int = 0
    bytes_received: int = 0
    cost: Cost | None = None
    """``None`` when the model has no known price (the tokens are still recorded)."""
    wasted: bool = False
    waste_reason: WasteReason | None = None
    tags: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    fingerprint: str | None = None
    """A hash of the request's model, system, messages, tools and parameters; never the content."""
    revision: int = 0
    prompt_bytes: int | None = None
    """The size of the request's prompt (tools, system, messages) in bytes of compact JSON, measured
    for retries only (``None`` otherwise, or when the body could not be read)."""
    stable_prefix_bytes: int | None = None
    """The part of ``prompt_bytes`` before the last message: what a retry resends unchanged and could
    read from the prompt cache (see ``costwatch.prompt_prefix``). Sizes only, never content."""
    inference_geo: str | None = None
    """Where the API said inference ran (``usage.inference_geo``: ``global``, ``us``), when it said."""
    platform: str = "anthropic"
    """Where the attempt went: ``anthropic`` (the first-party API), ``bedrock``, ``vertex`` or ``foundry``."""
    endpoint: str | None = None
    """Bedrock's and Vertex's endpoint kind, ``global`` or ``regional`` (priced apart); ``None`` where
    the request did not tell or the platform does not price by it."""
    output_chars: Mapping[str, int] = field(default_factory=lambda: _EMPTY)
    """Characters of output received, per content type and character class (counts, never text):
    kept for an attempt whose output was estimated, and for a completed one measured to calibrate."""

    @property
    def output_source(self) -> OutputSource:
        """Where the output token count came from (``usage.output_source``)."""
        return self.usage.output_source

    @property
    def model_name(self) -> str:
        """The model that answered, else the model asked for; what metrics and rollups label by."""
        return self.model or self.model_requested

    @property
    def error_label(self) -> str:
        """The exception class name, else the API's error type, else ``""``."""
        return self.error_type or self.api_error_type or ""

    @property
    def workflow(self) -> str:
        """The ``workflow`` tag cut to :data:`WORKFLOW_LABEL_LENGTH` characters; ``""`` when untagged."""
        return str(self.tags.get("workflow") or "")[:WORKFLOW_LABEL_LENGTH]

    @property
    def priced(self) -> bool:
        """Whether a price was known for the model."""
        return self.cost is not None

    @property
    def wasted_tokens(self) -> int:
        """Billed tokens that bought nothing (zero unless the attempt is wasted)."""
        return self.usage.billed_tokens if self.wasted else 0

    @property
    def wasted_cost_usd(self) -> float:
        """The wasted part of the cost (zero unless wasted or unpriced)."""
        return self.cost.total_usd if (self.wasted and self.cost is not None) else 0.0

    def with_waste(self, reason: WasteReason | None) -> AttemptRecord:
        """A copy with its waste attribution set to ``reason`` and its revision bumped."""
        return dataclasses.replace(
            self, wasted=reason is not None, waste_reason=reason, revision=self.revision + 1
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the record (enums as their values, datetimes as ISO 8601), with ``priced``."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, datetime):
                value = value.isoformat()
            elif isinstance(value, Usage):
                value = dataclasses.asdict(value)
                value["output_source"] = value["output_source"].value
            elif isinstance(value, Cost):
                value = dataclasses.asdict(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        # Derived, but said outright: a reader of the JSON must not mistake a missing cost for $0.
        out["priced"] = self.priced
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AttemptRecord:
        """The inverse of :meth:`to_dict`; raises ``ValueError`` on a malformed record.

        Every value is checked against its field's type (a number is finite, a count a whole number),
        so a corrupt spool line is refused here rather than failing a batch in the database.
        """
        try:
            kwargs = dict(data)
            kwargs.pop("priced", None)  # derived from ``cost`` (see to_dict)
            for name, kinds in _FIELD_KINDS.items():
                if name in kwargs:
                    _check_kind(name, kwargs[name], kinds)
            kwargs["started_at"] = datetime.fromisoformat(kwargs["started_at"])
            kwargs["outcome"] = Outcome(kwargs["outcome"])
            reason = kwargs.get("waste_reason")
            kwargs["waste_reason"] = WasteReason(reason) if reason is not None else None
            usage = _checked_mapping("usage", kwargs.get("usage") or {}, _USAGE_KINDS)
            if "output_source" in usage:  # absent from records written before it (the flag says)
                usage["output_source"] = OutputSource(usage["output_source"])
            kwargs["usage"] = Usage(**usage)
            cost = kwargs.get("cost")
            kwargs["cost"] = Cost(**_checked_mapping("cost", cost, _COST_KINDS)) if cost is not None else None
            beta = _checked_items("beta_features", kwargs.get("beta_features") or ())
            kwargs["beta_features"] = tuple(beta)
            tool_use = _checked_pairs("server_tool_use", kwargs.get("server_tool_use") or {}, (int,))
            kwargs["server_tool_use"] = MappingProxyType(tool_use)
            kwargs["tags"] = MappingProxyType(_checked_pairs("tags", kwargs.get("tags") or {}, (str,)))
            chars = _checked_pairs("output_chars", kwargs.get("output_chars") or {}, (int,))
            kwargs["output_chars"] = MappingProxyType(chars)
            return cls(**kwargs)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed attempt record: {exc}") from exc


_NONE = type(None)
_FIELD_KINDS: dict[str, tuple[type, ...]] = {
    "attempt_id": (str,),
    "logical_request_id": (str,),
    "attempt_number": (int,),
    "started_at": (str,),
    "outcome": (str,),
    "model_requested": (str,),
    "model": (str, _NONE),
    "stream": (bool,),
    "request_id": (str, _NONE),
    "message_id": (str, _NONE),
    "sdk_retry": (int,),
    "http_status": (int, _NONE),
    "error_type": (str, _NONE),
    "api_error_type": (str, _NONE),
    "time_to_first_token_s": (float, _NONE),
    "duration_s": (float,),
    "stop_reason": (str, _NONE),
    "events_received": (int,),
    "bytes_received": (int,),
    "wasted": (bool,),
    "waste_reason": (str, _NONE),
    "fingerprint": (str, _NONE),
    "revision": (int,),
    "prompt_bytes": (int, _NONE),
    "stable_prefix_bytes": (int, _NONE),
    "inference_geo": (str, _NONE),
    "platform": (str,),
    "endpoint": (str, _NONE),
}
"""What JSON gives each scalar field of a record; a float field also takes a whole number."""

_USAGE_KINDS: dict[str, tuple[type, ...]] = {
    f.name: (bool,) if f.type in ("bool", bool) else (int,) for f in dataclasses.fields(Usage)
}
_USAGE_KINDS["output_source"] = (str,)
_COST_KINDS: dict[str, tuple[type, ...]] = {f.name: (float,) for f in dataclasses.fields(Cost)}


def _check_kind(name: str, value: Any, kinds: tuple[type, ...]) -> None:
    if value is None and _NONE in kinds:
        return
    if isinstance(value, bool):
        if bool in kinds:
            return
    elif float in kinds and isinstance(value, (int, float)):
        if math.isfinite(value):
            return
        raise ValueError(f"{name} is {value!r}, not a finite number")
    elif isinstance(value, tuple(k for k in kinds if k is not bool)):
        return
    wanted = " or ".join("null" if k is _NONE else k.__name__ for k in kinds)
    raise ValueError(f"{name} is {type(value).__name__} {value!r:.40}, expected {wanted}")


def _checked_mapping(name: str, value: Any, kinds: Mapping[str, tuple[type, ...]]) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} is {type(value).__name__}, expected an object")
    for key, item in value.items():
        if key not in kinds:
            raise ValueError(f"{name} has an unknown field {key!r:.40}")
        _check_kind(f"{name}.{key}", item, kinds[key])
    return dict(value)


def _checked_pairs(name: str, value: Any, kinds: tuple[type, ...]) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} is {type(value).__name__}, expected an object")
    for key, item in value.items():
        _check_kind(f"{name} key", key, (str,))
        _check_kind(f"{name}.{key}", item, kinds)
    return dict(value)


def _checked_items(name: str, value: Any) -> list[str]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} is {type(value).__name__}, expected a list")
    for item in value:
        _check_kind(f"{name} item", item, (str,))
    return list(value)


@_fast_frozen_init
@dataclass(frozen=True, slots=True)
class AttemptStart:
    """What is known of an attempt when it is sent: handed to listeners that trace attempts live."""

    attempt_id: str
    logical_request_id: str
    attempt_number: int
    started_at: datetime
    model_requested: str = ""
    sdk_retry: int = 0
    tags: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
