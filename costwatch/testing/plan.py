"""Turn a :class:`ResponseSpec` into the exact bytes of a response, and say where a fault cuts them.

Everything here is pure: the server only writes what a :class:`ResponsePlan` holds, and bills what
:func:`sent_prefix` says reached the wire, so the billing rules can be tested without sockets.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import json
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ..event_stream import encode_frame
from .faults import Fault, FaultKind
from .prompt_cache import CacheUsage
from .spec import BlockKind, BlockSpec, ContentType, ResponseSpec, input_tokens_for_body
from .tokenizer import Piece
from .vocabulary import (
    cjk_fragments,
    command_json_fragments,
    json_object_fragments,
    prose_fragments,
)

__all__ = [
    "TERMINAL_CHUNK",
    "PlannedEvent",
    "ResponsePlan",
    "SentPrefix",
    "StreamCut",
    "bedrock_events",
    "bedrock_exception_frame",
    "bedrock_frame",
    "capped",
    "chunk",
    "error_body",
    "error_event",
    "error_message",
    "malformed_event",
    "max_tokens_of",
    "non_utf8_event",
    "plan_response",
    "position_after_deltas",
    "position_of_delta",
    "sent_prefix",
    "sse_event",
    "stream_cut_for",
    "unknown_event",
]

TERMINAL_CHUNK = b"0\r\n\r\n"
"""The zero-length chunk that ends a chunked body."""

_EMPTY_COUNTS: Mapping[str, int] = MappingProxyType({})
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def sse_event(name: str, data: Mapping[str, Any]) -> bytes:
    """One SSE event as the API writes it: ``event:`` and ``data:`` lines and a blank line."""
    return f"event: {name}\ndata: {_dumps(data)}\n\n".encode()


def chunk(payload: bytes) -> bytes:
    """``payload`` framed as one HTTP/1.1 chunk (size line, data, CRLF)."""
    return f"{len(payload):x}\r\n".encode() + payload + b"\r\n"


def error_body(error_type: str, message: str, request_id: str) -> dict[str, Any]:
    """The API's error object, as sent in an error response body and in an SSE ``error`` event."""
    return {"type": "error", "error": {"type": error_type, "message": message}, "request_id": request_id}


_ERROR_MESSAGES: Mapping[str, str] = MappingProxyType(
    {
        "overloaded_error": "Overloaded",
        "api_error": "Internal server error",
        "rate_limit_error": "Number of request tokens has exceeded your per-minute rate limit",
        "invalid_request_error": "Invalid request",
    }
)


def error_message(error_type: str) -> str:
    """The human message the API sends with ``error_type``."""
    return _ERROR_MESSAGES.get(error_type, error_type.replace("_", " ").capitalize())


def error_event(error_type: str, request_id: str) -> bytes:
    """An SSE ``error`` event, as the API sends mid-stream when it is overloaded."""
    return sse_event("error", error_body(error_type, error_message(error_type), request_id))


def malformed_event() -> bytes:
    """A ``content_block_delta`` event whose data is cut-off JSON."""
    return (
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"te\n\n'
    )


def non_utf8_event() -> bytes:
    """A text ``content_block_delta`` event with two bytes that are not UTF-8 in its text."""
    return (
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta","text":"\xff\xfe"}}\n\n'
    )


def unknown_event() -> bytes:
    """An event of a type that no SDK version knows (the API may add event types at any time)."""
    return sse_event("costwatch_unknown", {"type": "costwatch_unknown", "detail": "ignored"})


_BEDROCK_CHUNK_HEADERS = {
    ":event-type": "chunk",
    ":content-type": "application/json",
    ":message-type": "event",
}


def bedrock_frame(event_json: bytes) -> bytes:
    """One Messages event as Bedrock streams it: a ``chunk`` frame with the JSON base64 in ``bytes``."""
    payload = _dumps({"bytes": base64.b64encode(event_json).decode("ascii")}).encode()
    return encode_frame(_BEDROCK_CHUNK_HEADERS, payload)


def bedrock_exception_frame(exception_type: str, message: str) -> bytes:
    """An event-stream ``exception`` frame, as Bedrock sends when a stream fails mid-answer."""
    headers = {
        ":exception-type": exception_type,
        ":content-type": "application/json",
        ":message-type": "exception",
    }
    return encode_frame(headers, _dumps({"message": message}).encode())


def bedrock_events(events: tuple[PlannedEvent, ...], plan: ResponsePlan) -> tuple[PlannedEvent, ...]:
    """The planned SSE events as Bedrock's event-stream frames, invocation metrics on ``message_stop``.

    Each frame takes the place of its SSE text, so every cut position keeps its meaning: a frame
    counts as delivered once it is all on the wire, as an SSE event does.
    """
    out = []
    for event in events:
        carried = event.payload.split(b"\ndata: ", 1)[1]
        try:
            data = json.loads(carried)
        except ValueError:  # a malformed or non-UTF-8 event: carried as it is, in a well-formed frame
            out.append(dataclasses.replace(event, payload=bedrock_frame(carried.rstrip(b"\n"))))
            continue
        if event.name == "message_stop":
            data["amazon-bedrock-invocationMetrics"] = {
                "inputTokenCount": plan.input_tokens,
                "outputTokenCount": plan.output_tokens,
                "invocationLatency": 0,
                "firstByteLatency": 0,
            }
        framed = bedrock_frame(_dumps(data).encode())
        out.append(dataclasses.replace(event, payload=framed))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class PlannedEvent:
    """One SSE event of a planned stream, with the output it carries."""

    name: str
    payload: bytes
    """The SSE text of the event (``event: ...\\ndata: ...\\n\\n``), unframed."""
    tokens: int = 0
    content_type: ContentType | None = None
    chars: int = 0
    """Characters of the delta's text, thinking or partial JSON."""

    @property
    def is_delta(self) -> bool:
        """Whether this is a ``content_block_delta`` event (signature deltas included)."""
        return self.name == "content_block_delta"

    @property
    def framed(self) -> bytes:
        """The event as one chunk on the wire."""
        return chunk(self.payload)


@dataclass(frozen=True, slots=True)
class ResponsePlan:
    """Everything one answer will send: the stream's events and the non-stream JSON body."""

    message_id: str
    model: str
    events: tuple[PlannedEvent, ...]
    message: Mapping[str, Any]
    """The non-stream response body (a complete ``Message``)."""
    input_tokens: int
    cache_read_tokens: int
    cache_write_5m_tokens: int
    cache_write_1h_tokens: int
    output_tokens: int
    stop_reason: str

    @property
    def json_body(self) -> bytes:
        """The non-stream response body as bytes."""
        return _dumps(self.message).encode()

    @property
    def delta_count(self) -> int:
        """How many ``content_block_delta`` events the stream has."""
        return sum(1 for event in self.events if event.is_delta)

    def chars_by_type(self) -> dict[str, int]:
        """Characters of the whole answer per content type."""
        return _counts(self.events, "chars")

    def tokens_by_type(self) -> dict[str, int]:
        """Output tokens of the whole answer per content type."""
        return _counts(self.events, "tokens")


def _counts(events: tuple[PlannedEvent, ...] | list[PlannedEvent], attribute: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for event in events:
        if event.content_type is not None:
            key = event.content_type.value
            out[key] = out.get(key, 0) + int(getattr(event, attribute))
    return out


def _rng(*parts: object) -> random.Random:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _ident(rng: random.Random, prefix: str, length: int = 24) -> str:
    return prefix + "".join(rng.choice(_BASE62) for _ in range(length))


def _split(rng: random.Random, pieces: list[Piece], low: int, high: int) -> list[tuple[str, int]]:
    """``pieces`` in groups of ``low`` to ``high`` tokens each (one group per delta event): the
    text of each group and the tokens it counts.

    A group ends at a piece boundary, never inside a piece: the API never sends part of a character,
    and a cut between deltas must leave a text that counts exactly what the sent deltas billed. Pieces
    that count no token (merged into the token before them) are kept with the group before, at the end.
    """
    groups: list[tuple[str, int]] = []
    texts: list[str] = []
    tokens = size = 0
    for text, count in pieces:
        if not texts:
            size = rng.randint(low, high)
        texts.append(text)
        tokens += count
        if tokens >= size:
            groups.append(("".join(texts), tokens))
            texts, tokens = [], 0
    if texts:
        if tokens == 0 and groups:
            groups[-1] = (groups[-1][0] + "".join(texts), groups[-1][1])
        else:
            groups.append(("".join(texts), tokens))
    return groups


_SEARCH_STEPS = 12
_SEARCH_DRAWS = 40


@dataclass
class _Builder:
    spec: ResponseSpec
    rng: random.Random
    id_rng: random.Random
    events: list[PlannedEvent] = field(default_factory=list)
    content: list[dict[str, Any]] = field(default_factory=list)
    deltas_since_ping: int = 0

    def add(self, name: str, data: Mapping[str, Any], **kwargs: Any) -> None:
        self.events.append(PlannedEvent(name, sse_event(name, data), **kwargs))

    def ping(self) -> None:
        self.add("ping", {"type": "ping"})

    def exactly(self, write: Callable[[random.Random, int], list[str]], count: int) -> list[Piece]:
        """Text that ``write(rng, n)`` writes, cut by the spec's tokenizer into ``count`` tokens.

        The tokenizer, not the writer, says how many tokens a text is (it is what the fake bills and
        what its ``count_tokens`` answers), so ``n`` is searched for: from ``count`` times the scale,
        corrected by how far the text's count is off, with a fresh draw of text when no ``n`` lands
        exactly (a piece counting two tokens can step over ``count``). At the default scale English,
        code and JSON land at once on ``n = count``. If no draw lands (a block too small for its
        shape, such as one token of JSON at a small scale), the closest text is taken.
        """
        if count <= 0:
            return []
        tokenizer = self.spec.tokenizer
        start = self.rng.getstate()
        best: tuple[int, list[Piece], Any] | None = None
        for draw in range(_SEARCH_DRAWS):
            rng = self.rng if draw == 0 else _rng(repr(start), draw)
            draw_start = rng.getstate()
            n = max(1, round(count * self.spec.chars_per_token_scale))
            tried: set[int] = set()
            for _ in range(_SEARCH_STEPS):
                tried.add(n)
                rng.setstate(draw_start)
                pieces = tokenizer.pieces("".join(write(rng, n)))
                have = sum(tokens for _, tokens in pieces)
                if have == count:
                    self.rng.setstate(rng.getstate())
                    return pieces
                if best is None or abs(have - count) < best[0]:
                    best = (abs(have - count), pieces, rng.getstate())
                step = round((count - have) * n / have) if have else count
                n = max(1, n + (step or (1 if have < count else -1)))
                if n in tried:
                    break
        assert best is not None
        self.rng.setstate(best[2])
        return best[1]

    def prose(self, count: int) -> list[Piece]:
        """``count`` tokens of text or thinking, in the spec's script."""
        script = self.spec.script
        if script == "latin":
            return self.exactly(prose_fragments, count)
        share = 0.2 if script == "emoji_cjk" else 0.0
        return self.exactly(lambda rng, n: cjk_fragments(rng, n, emoji_share=share), count)

    def deltas(
        self, index: int, pieces: list[Piece], delta_type: str, field_name: str, ct: ContentType
    ) -> str:
        low, high = self.spec.tokens_per_delta
        for text, tokens in _split(self.rng, pieces, low, high):
            self.add(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": delta_type, field_name: text},
                },
                tokens=tokens,
                content_type=ct,
                chars=len(text),
            )
            self.deltas_since_ping += 1
            if self.spec.ping_every and self.deltas_since_ping >= self.spec.ping_every:
                self.ping()
                self.deltas_since_ping = 0
        return "".join(text for text, _ in pieces)

    def block(self, index: int, start: Mapping[str, Any]) -> None:
        self.add(
            "content_block_start", {"type": "content_block_start", "index": index, "content_block": start}
        )

    def stop(self, index: int) -> None:
        self.add("content_block_stop", {"type": "content_block_stop", "index": index})


def _usage(
    spec_plan: dict[str, int],
    server_tool_use: Mapping[str, int],
    output_tokens: int,
    inference_geo: str | None = None,
) -> dict[str, Any]:
    usage = {
        "input_tokens": spec_plan["input"],
        "cache_creation_input_tokens": spec_plan["write_5m"] + spec_plan["write_1h"],
        "cache_read_input_tokens": spec_plan["read"],
        "cache_creation": {
            "ephemeral_5m_input_tokens": spec_plan["write_5m"],
            "ephemeral_1h_input_tokens": spec_plan["write_1h"],
        },
        "output_tokens": output_tokens,
        "service_tier": "standard",
        "server_tool_use": dict(server_tool_use),
    }
    if inference_geo is not None:
        usage["inference_geo"] = inference_geo
    return usage


def max_tokens_of(body: bytes) -> int | None:
    """The request's ``max_tokens``, or ``None`` when the body does not give a positive integer."""
    try:
        value = json.loads(body).get("max_tokens") if body else None
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def capped(spec: ResponseSpec, max_tokens: int | None) -> ResponseSpec:
    """``spec`` cut to ``max_tokens`` output tokens, as the API stops generating at the limit.

    The block that reaches the limit is shortened, the blocks after it are left out, and the stop
    reason becomes ``max_tokens``. A spec within the limit is returned unchanged.
    """
    if max_tokens is None or spec.output_tokens <= max_tokens:
        return spec
    blocks: list[BlockSpec] = []
    left = max_tokens
    for block in spec.blocks:
        if left <= 0:
            break
        blocks.append(dataclasses.replace(block, output_tokens=min(block.output_tokens, left)))
        left -= block.output_tokens
    return dataclasses.replace(spec, blocks=tuple(blocks), stop_reason="max_tokens")


def plan_response(
    spec: ResponseSpec,
    *,
    body: bytes,
    model_requested: str,
    arrival: int = 1,
    cache: CacheUsage | None = None,
) -> ResponsePlan:
    """The full answer to a request with this raw ``body``.

    Content depends only on ``spec.seed`` and the body; ids also depend on ``arrival`` so a retried
    request gets a fresh ``msg_...`` id, as from the real API. ``cache``, when given, is how the
    server's prompt cache split the prompt, and replaces the spec's input and cache counts. Output
    stops at the body's ``max_tokens`` (see :func:`capped`).
    """
    spec = capped(spec, max_tokens_of(body))
    digest = hashlib.sha256(body).hexdigest()
    b = _Builder(spec, _rng(spec.seed, digest), _rng(spec.seed, digest, arrival, "ids"))
    model = spec.model or model_requested or "claude-sonnet-4-5"
    message_id = _ident(b.id_rng, "msg_01")
    tokens = {
        "input": spec.input_tokens if spec.input_tokens is not None else input_tokens_for_body(len(body)),
        "read": spec.cache_read_tokens,
        "write_5m": spec.cache_write_5m_tokens,
        "write_1h": spec.cache_write_1h_tokens,
    }
    if cache is not None:
        tokens = {
            "input": cache.input_tokens,
            "read": cache.cache_read_tokens,
            "write_5m": cache.cache_write_5m_tokens,
            "write_1h": cache.cache_write_1h_tokens,
        }
    server_tool_use = {"web_search_requests": 0, "web_fetch_requests": 0, **spec.server_tool_use}
    stop_reason = spec.derived_stop_reason
    shell: dict[str, Any] = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        # The real API reports 1 output token in message_start, whatever follows.
        "usage": _usage(tokens, server_tool_use, 1, spec.inference_geo),
    }
    b.add("message_start", {"type": "message_start", "message": shell})
    b.ping()

    index = 0
    for block in spec.blocks:
        n = block.output_tokens
        if block.kind is BlockKind.TEXT:
            b.block(index, {"type": "text", "text": ""})
            text = b.deltas(index, b.prose(n), "text_delta", "text", ContentType.TEXT)
            b.stop(index)
            b.content.append({"type": "text", "text": text})
        elif block.kind is BlockKind.THINKING:
            b.block(index, {"type": "thinking", "thinking": "", "signature": ""})
            thinking = b.deltas(index, b.prose(n), "thinking_delta", "thinking", ContentType.THINKING)
            signature = base64.b64encode(b.rng.randbytes(b.rng.randint(96, 192))).decode()
            # Signature deltas carry no billed output: they are not model tokens.
            b.add(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": "signature_delta", "signature": signature},
                },
            )
            b.stop(index)
            b.content.append({"type": "thinking", "thinking": thinking, "signature": signature})
        elif block.kind is BlockKind.TOOL_USE:
            tool_id = _ident(b.id_rng, "toolu_01")
            b.block(index, {"type": "tool_use", "id": tool_id, "name": block.name, "input": {}})
            raw = b.deltas(
                index,
                b.exactly(json_object_fragments, n),
                "input_json_delta",
                "partial_json",
                ContentType.TOOL_INPUT,
            )
            b.stop(index)
            b.content.append(
                {"type": "tool_use", "id": tool_id, "name": block.name, "input": json.loads(raw or "{}")}
            )
        else:
            bash = block.kind is BlockKind.BASH_CODE_EXECUTION
            name, key = ("bash_code_execution", "command") if bash else ("code_execution", "code")
            tool_id = _ident(b.id_rng, "srvtoolu_01")
            b.block(index, {"type": "server_tool_use", "id": tool_id, "name": name, "input": {}})
            raw = b.deltas(
                index,
                b.exactly(functools.partial(command_json_fragments, key=key), n),
                "input_json_delta",
                "partial_json",
                ContentType.SERVER_TOOL_INPUT,
            )
            b.stop(index)
            b.content.append(
                {"type": "server_tool_use", "id": tool_id, "name": name, "input": json.loads(raw or "{}")}
            )
            # The API keeps the connection warm with a ping while the code runs.
            b.ping()
            index += 1
            result_type = "bash_code_execution" if bash else "code_execution"
            result = {
                "type": f"{result_type}_tool_result",
                "tool_use_id": tool_id,
                "content": {
                    "type": f"{result_type}_result",
                    "stdout": f"total={b.rng.randint(1, 99999)}\n",
                    "stderr": "",
                    "return_code": 0,
                    "content": [],
                },
            }
            b.block(index, result)
            b.stop(index)
            b.content.append(result)
        index += 1

    # What the tokenizer cut, which is the spec's output unless a block was too small for its shape.
    output_tokens = sum(event.tokens for event in b.events)
    delta_usage = _usage(tokens, server_tool_use, output_tokens, spec.inference_geo)
    del delta_usage["cache_creation"], delta_usage["service_tier"]
    b.add(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": delta_usage,
        },
    )
    b.add("message_stop", {"type": "message_stop"})

    message = {
        **shell,
        "content": b.content,
        "stop_reason": stop_reason,
        "usage": _usage(tokens, server_tool_use, output_tokens, spec.inference_geo),
    }
    return ResponsePlan(
        message_id=message_id,
        model=model,
        events=tuple(b.events),
        message=message,
        input_tokens=tokens["input"],
        cache_read_tokens=tokens["read"],
        cache_write_5m_tokens=tokens["write_5m"],
        cache_write_1h_tokens=tokens["write_1h"],
        output_tokens=output_tokens,
        stop_reason=stop_reason,
    )


@dataclass(frozen=True, slots=True)
class StreamCut:
    """Where a stream stops early: after ``whole_events`` events plus ``partial_bytes`` of the next chunk.

    When ``whole_events`` equals the number of events, ``partial_bytes`` are of the terminal chunk.
    """

    whole_events: int
    partial_bytes: int = 0


def position_after_deltas(events: tuple[PlannedEvent, ...], count: int) -> int:
    """The number of events up to and including the ``count``-th delta (up to the first delta if 0)."""
    seen = 0
    for position, event in enumerate(events):
        if event.is_delta:
            if seen == count:
                return position
            seen += 1
            if seen == count:
                return position + 1
    return len(events)


def stream_cut_for(fault: Fault | None, events: tuple[PlannedEvent, ...]) -> StreamCut | None:
    """Where a count-based cut fault stops this stream, or ``None`` if the stream runs to its end.

    Time-based cuts (``cut_after_seconds``) are decided while writing and give ``None`` here.
    """
    if fault is None:
        return None
    n = len(events)
    kind = fault.kind
    if kind is FaultKind.CUT_AFTER_EVENTS:
        return StreamCut(fault.count) if fault.count < n else None
    if kind is FaultKind.CUT_AFTER_DELTAS:
        position = position_after_deltas(events, fault.count)
        return StreamCut(position) if position < n else None
    if kind is FaultKind.CUT_MID_EVENT and fault.count < n:
        frame = events[fault.count].framed
        header = len(frame) - len(events[fault.count].payload) - 2
        return StreamCut(fault.count, header + len(events[fault.count].payload) // 2)
    if kind is FaultKind.CUT_IN_CHUNK_SIZE and fault.count < n:
        return StreamCut(fault.count, 1)
    if kind is FaultKind.CUT_BEFORE_MESSAGE_STOP:
        return StreamCut(n - 1)
    if kind is FaultKind.CUT_AFTER_BYTES:
        remaining = fault.count
        for position, event in enumerate(events):
            size = len(event.framed)
            if remaining < size:
                return StreamCut(position, remaining)
            remaining -= size
        return StreamCut(n, remaining) if remaining < len(TERMINAL_CHUNK) else None
    return None


def position_of_delta(events: tuple[PlannedEvent, ...], nth: int) -> int:
    """The index of the ``nth`` (1-based) delta event; the last event's index if there are fewer."""
    seen = 0
    for position, event in enumerate(events):
        if event.is_delta:
            seen += 1
            if seen == nth:
                return position
    return len(events) - 1


@dataclass(frozen=True, slots=True)
class SentPrefix:
    """What a stream cut at a :class:`StreamCut` delivered, and so what it bills."""

    events: int
    """Events whose SSE text was written completely."""
    body_bytes: int
    output_tokens: int
    deltas: int
    chars_by_type: Mapping[str, int] = field(default_factory=lambda: _EMPTY_COUNTS)
    tokens_by_type: Mapping[str, int] = field(default_factory=lambda: _EMPTY_COUNTS)
    message_delta_sent: bool = False
    """Whether ``message_delta`` (stop reason and final usage) reached the client."""


def sent_prefix(events: tuple[PlannedEvent, ...], cut: StreamCut) -> SentPrefix:
    """The events, bytes and output a stream delivered before ``cut``.

    An event counts once its whole SSE text is on the wire, even if the chunk's trailing CRLF is
    not: the client's SSE decoder has it by then.
    """
    complete = list(events[: cut.whole_events])
    body_bytes = sum(len(event.framed) for event in complete) + cut.partial_bytes
    if cut.whole_events < len(events) and cut.partial_bytes:
        following = events[cut.whole_events]
        header = len(following.framed) - len(following.payload) - 2
        if cut.partial_bytes >= header + len(following.payload):
            complete.append(following)
    return SentPrefix(
        events=len(complete),
        body_bytes=body_bytes,
        output_tokens=sum(event.tokens for event in complete),
        deltas=sum(1 for event in complete if event.is_delta),
        chars_by_type=MappingProxyType(_counts(complete, "chars")),
        tokens_by_type=MappingProxyType(_counts(complete, "tokens")),
        message_delta_sent=any(event.name == "message_delta" for event in complete),
    )
