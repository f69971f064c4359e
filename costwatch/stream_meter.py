"""Reading the Messages API's response bytes as they pass: usage, content sizes, and how a body ended.

This is pure logic with no I/O: the SDK hooks feed it the raw body chunks the application receives,
and it keeps only numbers (token counts, character counts per content type, ids, the stop reason).
It never keeps the text it measures beyond the life of the body it reads, and keeps it at all only
when asked (:attr:`BodyMeter.texts`: the text of a cut stream, to be counted by the API).

Reading every event as it passes would cost a few microseconds per event, a sizeable share of what
the SDK itself spends. So a stream is read chunk by chunk only up to its first delta (its id, model,
input usage and time to first delta); after that the hooks only keep references to the chunks
(:meth:`BodyMeter.defer`), and the meter reads them once, when the body ends
(:meth:`BodyMeter.finish_stream`). A completed stream then needs only its tail, where the API
reports the final usage; a cut stream, or one sampled to calibrate the output estimator, is read in
full, so its characters per content type are exact. Kept chunks are read early once they pass
``fold_bytes`` (:meth:`BodyMeter.fold`), which bounds the memory a long stream holds.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Mapping
from typing import Any

from .estimation import CONTENT_TYPES, count_scripts

__all__ = ["CHAR_KEYS", "FOLD_BYTES", "BodyMeter", "ReportedUsage"]

_MAPPING = (dict, Mapping)
"""What a JSON object may be, for ``isinstance``: a parsed one is a ``dict``, which this tuple answers
at its first entry, without ``Mapping``'s ``__instancecheck__`` (a Python-level call: ~2.3 k
instructions a check against ~0.6 k, and a body's meter makes several)."""


CHAR_KEYS = (*CONTENT_TYPES, "cjk", "symbol", "space")
"""The keys of :attr:`BodyMeter.chars`."""
_ZERO_CHARS = dict.fromkeys(CHAR_KEYS, 0)
"""Every key of :attr:`BodyMeter.chars` at zero: each meter starts from a copy (a dict's copy is a
fraction of what building it from the keys costs)."""

# Which content type a block's deltas count toward, by the block's type. Blocks not listed (tool
# results, documents, redacted thinking) carry no output text that the client sees as deltas.
_BLOCK_CONTENT_TYPE = {
    "text": "text",
    "thinking": "thinking",
    "tool_use": "tool_input",
    "server_tool_use": "tool_input",
    "mcp_tool_use": "tool_input",
}
FOLD_BYTES = 4 * 1024 * 1024
"""Kept (not yet read) bytes of a stream past which :meth:`BodyMeter.fold` reads them."""

_MESSAGE_EVENTS = frozenset(
    {
        b"message_start",
        b"message_delta",
        b"message_stop",
        b"content_block_start",
        b"content_block_delta",
        b"content_block_stop",
    }
)
"""The event names whose data every SDK line parses as JSON (and raises on when it cannot)."""
_DELTA_FIELD = {"text_delta": "text", "thinking_delta": "thinking", "input_json_delta": "partial_json"}
_DELTA_CONTENT_TYPE = {"text_delta": "text", "thinking_delta": "thinking", "input_json_delta": "tool_input"}


class ReportedUsage:
    """Token counts as the API reported them (``message_start``, ``message_delta`` or a JSON body)."""

    __slots__ = (
        "cache_read_tokens",
        "cache_write_1h_tokens",
        "cache_write_5m_tokens",
        "inference_geo",
        "input_tokens",
        "output_tokens",
        "server_tool_use",
    )

    def __init__(self) -> None:
        self.input_tokens = 0
        self.cache_write_5m_tokens = 0
        self.cache_write_1h_tokens = 0
        self.cache_read_tokens = 0
        self.output_tokens = 0
        self.server_tool_use: dict[str, int] = {}
        self.inference_geo: str | None = None

    def update(self, usage: Mapping[str, Any]) -> None:
        """Merge a ``usage`` object; fields that are absent or null keep their value."""
        value = _count(usage.get("input_tokens"))
        if value is not None:
            self.input_tokens = value
        value = _count(usage.get("cache_read_input_tokens"))
        if value is not None:
            self.cache_read_tokens = value
        creation = usage.get("cache_creation")
        total_write = _count(usage.get("cache_creation_input_tokens"))
        if isinstance(creation, _MAPPING):
            five = _count(creation.get("ephemeral_5m_input_tokens")) or 0
            hour = _count(creation.get("ephemeral_1h_input_tokens")) or 0
            # The split is authoritative when it adds up; otherwise the total wins and any
            # unexplained remainder is priced at the 5-minute rate (the API's default lifetime).
            if total_write is None or five + hour == total_write:
                self.cache_write_5m_tokens, self.cache_write_1h_tokens = five, hour
            else:
                self.cache_write_5m_tokens = max(total_write - hour, 0)
                self.cache_write_1h_tokens = min(hour, total_write)
        elif (
            total_write is not None and total_write != self.cache_write_5m_tokens + self.cache_write_1h_tokens
        ):
            # A total without a split (e.g. a later message_delta) keeps the split already known.
            hour = min(self.cache_write_1h_tokens, total_write)
            self.cache_write_5m_tokens, self.cache_write_1h_tokens = total_write - hour, hour
        value = _count(usage.get("output_tokens"))
        if value is not None:
            self.output_tokens = value
        geo = usage.get("inference_geo")
        if isinstance(geo, str) and geo:
            self.inference_geo = geo[:_GEO_LENGTH]
        tools = usage.get("server_tool_use")
        if isinstance(tools, _MAPPING):
            for name, count in tools.items():
                n = _count(count)
                if n is not None and isinstance(name, str):
                    self.server_tool_use[name] = n


_GEO_LENGTH = 32
"""Longest ``inference_geo`` kept: a region name, never a place for anything larger."""


def _count(value: Any) -> int | None:
    """A token count from the wire: a non-negative int, or None when absent or nonsensical."""
    # A parsed JSON number is exactly an int or a float (true and false are bools, not ints here).
    return value if type(value) is int and value >= 0 else None


class BodyMeter:
    """Measures one response body, chunk by chunk, for a streaming (SSE) or a JSON response.

    Feed it the raw bytes with :meth:`feed`; read the results from its attributes. Malformed
    input never raises: bad events are counted in ``malformed_events`` and skipped.
    """

    __slots__ = (
        "_blocks",
        "_buffer",
        "_chars",
        "_decompressor",
        "_json_body",
        "_kept_bytes",
        "_kept_counted",
        "_stream",
        "_tail",
        "_waiting",
        "api_error_type",
        "bytes_received",
        "chars_measured",
        "events",
        "first_delta_at",
        "fold_bytes",
        "kept",
        "malformed_events",
        "message_id",
        "message_stop_seen",
        "model",
        "now",
        "output_reported",
        "parsed",
        "stop_reason",
        "texts",
        "unreadable",
        "usage",
    )

    def __init__(
        self,
        *,
        stream: bool,
        content_encoding: str | None = None,
        clock: Any = None,
        fold_bytes: int = FOLD_BYTES,
    ) -> None:
        self._stream = stream
        self._buffer = b""
        # Chunks of an event still incomplete after _buffer, joined only once the event can end: a
        # single event of many megabytes would otherwise be copied and searched again per chunk.
        self._waiting: list[bytes] = []
        self._tail = b""
        self._json_body: list[bytes] = []
        self._decompressor = _decompressor(content_encoding) if content_encoding else None
        self.now = clock
        self.usage = ReportedUsage()
        self._chars = _ZERO_CHARS.copy()
        self._blocks: list[Any] | None = None
        self.events = 0
        self.malformed_events = 0
        self.bytes_received = 0
        self.first_delta_at: float | None = None
        self.message_id: str | None = None
        self.model: str | None = None
        self.stop_reason: str | None = None
        self.api_error_type: str | None = None
        self.message_stop_seen = False
        self.output_reported = False
        """True once the API reported the final output count (``message_delta`` or a JSON body)."""
        self.unreadable: str | None = None
        """The exception both SDK lines raise on the first event they cannot read, by class name:
        ``UnicodeDecodeError`` for bytes that are not UTF-8, ``JSONDecodeError`` for broken JSON in an
        event of the Messages API's own types (others the 0.x SDK skips unread)."""
        self.parsed: dict[str, Any] | None = None
        """A non-streaming body as :meth:`take_json` parsed it (a JSON object), for whoever parses the
        same body next to take instead (:meth:`take_parsed`; costwatch reads nothing of it after that)."""
        self.chars_measured = True
        """False when a completed stream was read from its tail only: ``chars`` is then empty."""
        self.kept: list[bytes] | None = None
        """Chunks kept to be read when the body ends, once :meth:`defer` was called."""
        self.texts: dict[str, list[str]] | None = None
        """Set to ``{}`` to keep the text read, per content type (text, thinking, tool input), as the
        pieces that arrived; ``None`` (the default) keeps none."""
        self.fold_bytes = fold_bytes
        self._kept_bytes = 0
        self._kept_counted = 0

    @property
    def chars(self) -> dict[str, int]:
        """Characters received: per content type those of Latin and other alphabetic scripts (with
        their whitespace), then ``cjk`` and ``symbol`` characters of any type, and ``space``, the
        whitespace among the content types' counts (a subset of them, kept for calibration).

        A JSON body's content blocks are counted here, when first asked: most completed bodies are
        never asked (their output is reported, and only a sample is measured to calibrate).
        """
        if self._blocks is not None:
            self._count_blocks()
        return self._chars

    def _count_blocks(self) -> None:
        blocks, self._blocks = self._blocks, None
        for block in blocks or ():
            if isinstance(block, _MAPPING):
                self._count_whole_block(block)

    @property
    def complete(self) -> bool:
        """Whether the whole response arrived (``message_stop`` for a stream, a parsed JSON body)."""
        return self.message_stop_seen

    def feed(self, chunk: bytes) -> None:
        """Account for the next chunk of raw body bytes."""
        self.bytes_received += len(chunk)
        if self._decompressor is not None:
            chunk = self._decompressor.decompress(chunk)
        if not self._stream:
            self._json_body.append(chunk)
            return
        if self._buffer:
            # Only a blank line that begins in the new bytes (or the last three before them) can
            # end the waiting event; "\r\n" counts as "\n", as _frame reads it.
            window = self._tail + chunk
            if b"\r" in window:
                window = window.replace(b"\r\n", b"\n")
            if b"\n\n" not in window:
                self._waiting.append(chunk)
                self._tail = window[-3:] if len(chunk) >= 3 else (self._tail + chunk)[-3:]
                return
            chunk = b"".join([self._buffer, *self._waiting, chunk])
            self._waiting.clear()
            self._frame(chunk)
            return
        self._frame(chunk)

    def _frame(self, buffer: bytes) -> None:
        """Account for every whole SSE event in ``buffer``; keep the incomplete rest for later."""
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        start = 0
        while True:
            end = buffer.find(b"\n\n", start)
            if end < 0:
                break
            delta = _COMPACT_DELTA.match(buffer, start, end)
            if delta is None or not self._delta_in_place(buffer, delta, end):
                self._event(buffer[start:end])
            start = end + 2
        self._buffer = buffer[start:]
        self._tail = self._buffer[-3:]

    # -- deferred reading ----------------------------------------------------------------------
    def defer(self) -> list[bytes] | None:
        """The list to append the stream's next chunks to, unread, or None while they must be fed.

        A stream is fed chunk by chunk until its first delta has been timed; compressed bodies and
        meters without a clock are always fed.
        """
        if self.kept is None and self.first_delta_at is not None and self._decompressor is None:
            self.kept = []
        return self.kept

    def fold(self) -> None:
        """Read the kept chunks now if they hold more than ``fold_bytes``: bounds a long stream's memory."""
        kept = self.kept
        if kept is None:
            return
        self._kept_bytes += sum(map(len, kept[self._kept_counted :]))
        self._kept_counted = len(kept)
        if self._kept_bytes > self.fold_bytes:
            self._read_kept()

    def finish_stream(self, *, read_all: bool) -> None:
        """Read what was kept of a stream whose body ended.

        With ``read_all`` False, a stream that ended the API's usual way (``message_delta`` with the
        output count, then ``message_stop``) is read from its tail only and ``chars`` is left empty;
        anything else is read in full, exactly as if it had been fed.
        """
        if self.kept is None:
            return
        if read_all or not self._read_tail():
            self._read_kept()
        self.kept = None

    def _read_kept(self) -> None:
        kept = self.kept
        if kept:
            self.feed(b"".join(kept))
            kept.clear()  # the same list: the hooks keep appending to it
        self._kept_bytes = self._kept_counted = 0

    def _read_tail(self) -> bool:
        """Read only the final events of a completed stream; False (nothing changed) if it is unusual.

        Between the first delta and ``message_delta`` the API sends only content blocks and pings:
        they carry characters but no usage, ids or errors. The checks below (byte searches, no
        parsing) make sure the skipped part is only such events, each in the API's framing (an
        ``event:`` line first), so that the event count stays exact too.
        """
        body = b"".join(self.kept or ())
        received = len(body)
        if self._buffer:
            body = b"".join([self._buffer, *self._waiting, body])
        if not body.endswith(_MESSAGE_STOP) or b"\r" in body or not body.startswith(b"event: "):
            return False
        # The last message_delta: an earlier one would show in the skipped part, which is checked.
        at = body.rfind(b"\n\nevent: message_delta\n") + 2
        if at < 2 or body.find(b'"output_tokens":', at) < 0 or body.find(b'"type":"error"', at) >= 0:
            return False
        if (
            body.find(b'"type":"message_', 0, at) >= 0  # a message_start, _delta or _stop
            or body.find(b'"type":"error"', 0, at) >= 0
        ):
            return False
        # Every blank line before message_delta must end an event that starts with its name: as many
        # blank lines as names after one. (Counted apart, a run of n newlines is n // 2 blank lines: so
        # a run of three before a name passes, and frames the same events, a blank line ignored.)
        named = body.count(b"\n\nevent: ", 0, at + 7)
        if body.count(b"\n\n", 0, at) != named:
            return False
        self.events += named
        self.bytes_received += received
        self._buffer = b""
        self._waiting.clear()
        self._frame(body[at:])
        self._chars = {}
        self.chars_measured = False
        return True

    def _count(self, content_type: str, piece: str) -> None:
        """Count ``piece`` toward ``content_type``, its CJK and symbol characters toward their classes."""
        texts = self.texts
        if texts is not None:
            texts.setdefault(content_type, []).append(piece)
        cjk, symbol, space = count_scripts(piece)
        chars = self._chars
        chars[content_type] += len(piece) - cjk - symbol
        if cjk:
            chars["cjk"] += cjk
        if symbol:
            chars["symbol"] += symbol
        if space:
            chars["space"] += space

    def _delta_in_place(self, buffer: bytes, delta: re.Match[bytes], end: int) -> bool:
        """Count a text, thinking or tool-input delta in the API's own compact form, in place.

        Deltas are nearly every event of a stream, so this is the meter's hot path: it measures the
        delta's JSON string from its raw bytes without slicing the event or parsing it (an escape
        sequence is one character). False leaves anything unusual to the full parser.
        """
        first, close = delta.end(), end - 3
        if close < first or not buffer.startswith(b'"}}', close) or self.texts is not None:
            return False  # (the parser unescapes a text to be kept)
        backslashes = buffer.count(b"\\", first, close)
        if backslashes:
            # every quote must be an escaped one, and \uXXXX escapes are left to the parser
            if buffer.count(b'"', first, close) != buffer.count(b'\\"', first, close):
                return False
            if buffer.find(b"\\u", first, close) >= 0:
                return False
            folded = backslashes - buffer.count(b"\\\\", first, close)
        elif buffer.find(b'"', first, close) >= 0:
            return False
        else:
            folded = 0
        try:
            text = buffer[first:close].decode()
        except UnicodeDecodeError:
            return False
        content_type = _COMPACT_DELTA_TYPES[delta.group(1)]
        if len(text) == close - first:
            # ASCII (the usual case): no CJK or symbols; spaces by one byte count, escapes folded.
            chars = self._chars
            chars[content_type] += len(text) - folded
            chars["space"] += buffer.count(b" ", first, close)
        elif folded:
            return False  # escapes in non-ASCII text: the parser unescapes them before counting
        else:
            self._count(content_type, text)
        self.events += 1
        if self.first_delta_at is None and self.now is not None:
            self.first_delta_at = self.now()
        return True

    def finish_json(self) -> None:
        """Parse a complete non-streaming body (a Message, or an error object)."""
        body = b"".join(self._json_body)
        self._json_body = []
        if self._decompressor is not None:
            body += self._decompressor.flush()
        self.take_json(body)

    def take_json(self, body: bytes) -> None:
        """Account for a whole non-streaming body given at once.

        Its content blocks are read when :attr:`chars` is first asked for; :meth:`take_parsed` lets go
        of them with the parse.
        """
        try:
            data = _decode_body(body)
        except (ValueError, UnicodeDecodeError):
            self.malformed_events += 1
            return
        if not isinstance(data, dict):
            return
        self.parsed = data
        if data.get("type") == "error":
            self._error(data)
            return
        self._message(data)
        usage = data.get("usage")
        if isinstance(usage, _MAPPING):
            self.usage.update(usage)
            self.output_reported = "output_tokens" in usage
        self.stop_reason = data.get("stop_reason") or self.stop_reason
        content = data.get("content")
        if isinstance(content, list):
            self._blocks = content  # counted if :attr:`chars` is asked for
            if self.texts is not None:
                self._count_blocks()  # the text to keep is taken now
        self.message_stop_seen = True

    def take_parsed(self) -> dict[str, Any] | None:
        """The body as :meth:`take_json` parsed it, once: the meter keeps no reference to it after."""
        parsed, self.parsed, self._blocks = self.parsed, None, None
        return parsed

    # -- SSE -------------------------------------------------------------------------------
    def _event(self, raw: bytes) -> None:
        name, data = _split_event(raw)
        if not data and not name:
            return  # a comment or keep-alive
        self.events += 1
        if name == b"ping":
            return
        try:
            text = data.decode()
        except UnicodeDecodeError:
            self.malformed_events += 1
            self.unreadable = self.unreadable or "UnicodeDecodeError"
            return
        try:
            payload = _decode_json(text)
        except ValueError:
            self.malformed_events += 1
            if name in _MESSAGE_EVENTS and text:
                self.unreadable = self.unreadable or "JSONDecodeError"
            return
        if not isinstance(payload, dict):
            self.malformed_events += 1
            return
        kind = payload.get("type")
        if kind == "content_block_delta":
            delta = payload.get("delta")
            if isinstance(delta, dict):
                delta_type = delta.get("type")
                content_type = _DELTA_CONTENT_TYPE.get(delta_type)  # type: ignore[arg-type]
                if content_type is not None:
                    piece = delta.get(_DELTA_FIELD[delta_type])  # type: ignore[index]
                    if isinstance(piece, str):
                        self._count(content_type, piece)
                if self.first_delta_at is None and self.now is not None:
                    self.first_delta_at = self.now()
        elif kind == "content_block_start":
            block = payload.get("content_block")
            if isinstance(block, _MAPPING):
                # A block may arrive whole in its start event (e.g. text with content, tool input).
                self._count_whole_block(block)
        elif kind == "message_start":
            message = payload.get("message")
            if isinstance(message, _MAPPING):
                self._message(message)
                usage = message.get("usage")
                if isinstance(usage, _MAPPING):
                    self.usage.update(usage)
        elif kind == "message_delta":
            usage = payload.get("usage")
            if isinstance(usage, _MAPPING):
                self.usage.update(usage)
                if "output_tokens" in usage:
                    self.output_reported = True
            delta = payload.get("delta")
            if isinstance(delta, _MAPPING) and delta.get("stop_reason"):
                self.stop_reason = delta["stop_reason"]
        elif kind == "message_stop":
            self.message_stop_seen = True
        elif kind == "error":
            self._error(payload)

    def _message(self, message: Mapping[str, Any]) -> None:
        message_id = message.get("id")
        if isinstance(message_id, str):
            self.message_id = message_id
        model = message.get("model")
        if isinstance(model, str):
            self.model = model

    def _error(self, payload: Mapping[str, Any]) -> None:
        error = payload.get("error")
        if isinstance(error, _MAPPING) and isinstance(error.get("type"), str):
            self.api_error_type = error["type"]
        else:
            self.api_error_type = "error"

    def _count_whole_block(self, block: Mapping[str, Any]) -> None:
        content_type = _BLOCK_CONTENT_TYPE.get(block.get("type"))  # type: ignore[arg-type]
        if content_type == "text":
            text = block.get("text")
            if isinstance(text, str):
                self._count("text", text)
        elif content_type == "thinking":
            text = block.get("thinking")
            if isinstance(text, str):
                self._count("thinking", text)
        elif content_type == "tool_input":
            tool_input = block.get("input")
            if tool_input:  # a streamed block starts with {} and sends its JSON as deltas
                self._count("tool_input", json.dumps(tool_input, separators=(",", ":"), ensure_ascii=False))


_COMPACT_DELTA = re.compile(
    rb'event: content_block_delta\ndata: \{"type":"content_block_delta","index":\d+,"delta":\{"type":'
    rb'"(text_delta|thinking_delta|input_json_delta)","(?:text|thinking|partial_json)":"'
)
_MESSAGE_STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
_COMPACT_DELTA_TYPES = {name.encode(): kind for name, kind in _DELTA_CONTENT_TYPE.items()}
_DECODER = json.JSONDecoder()


def _decode_json(text: str) -> Any:
    """``json.loads(text)``. The API's JSON has no whitespace around it, which ``raw_decode`` alone
    reads (``loads`` also checks the text's type and for a BOM, and matches whitespace before and
    after it with a regex, twice); text it does not read whole goes to ``loads``, for its result or
    its error."""
    try:
        parsed, end = _DECODER.raw_decode(text)
    except ValueError:
        return json.loads(text)
    return parsed if end == len(text) else json.loads(text)


def _decode_body(body: bytes) -> Any:
    """``json.loads(body)``, as both SDK lines parse a body, with a UTF-8 body (the API's) decoded
    first: ``json.loads`` looks for another encoding in Python code at every call."""
    try:
        return _decode_json(body.decode())
    except ValueError:  # UnicodeDecodeError too: another encoding, or a BOM, or no JSON at all
        return json.loads(body)


def _split_event(raw: bytes) -> tuple[bytes, bytes]:
    """The event name and data of one SSE event (its lines, without the blank line ending it)."""
    # The API's own framing, "event: NAME\ndata: JSON", takes the fast path.
    if raw.startswith(b"event: "):
        newline = raw.find(b"\n")
        if newline > 0 and raw.startswith(b"data: ", newline + 1) and raw.find(b"\n", newline + 1) < 0:
            return raw[7:newline].strip(), raw[newline + 7 :]
    name = b""
    data = b""
    for line in raw.split(b"\n"):
        if line.startswith(b"data:"):
            part = line[5:]
            part = part[1:] if part.startswith(b" ") else part
            data = data + b"\n" + part if data else part
        elif line.startswith(b"event:"):
            name = line[6:].strip()
    return name, data


def _decompressor(content_encoding: str | None) -> Any:
    if not content_encoding:
        return None
    encoding = content_encoding.strip().lower()
    if encoding == "gzip":
        return zlib.decompressobj(zlib.MAX_WBITS | 16)
    if encoding == "deflate":
        return zlib.decompressobj()
    return None
