"""Bedrock's streaming body: the AWS event-stream binary framing, read as it passes.

Pure logic, no I/O. Each frame is ``total length, headers length, prelude CRC32, headers, payload,
message CRC32`` (big-endian). A Messages event arrives as a ``chunk`` event whose JSON payload holds
the event's JSON, base64-encoded, in ``bytes``; Bedrock adds ``amazon-bedrock-invocationMetrics``
(input and output token counts) to ``message_stop``. An ``exception`` frame carries an error.
:class:`EventStreamMeter` is a :class:`~costwatch.stream_meter.BodyMeter` that decodes the frames
and reads each carried event exactly as the SSE meter reads it.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
import zlib
from collections.abc import Iterator
from typing import Any

from .stream_meter import BodyMeter

__all__ = ["CONTENT_TYPE", "EventStreamError", "EventStreamMeter", "decode_frames", "encode_frame"]

CONTENT_TYPE = "application/vnd.amazon.eventstream"
"""The content type of an event-stream body."""

_PRELUDE = struct.Struct(">III")
_MIN_FRAME = _PRELUDE.size + 4
_MAX_FRAME = 16 * 1024 * 1024  # the framing's own limit: a larger length is corruption, not a frame
_FIXED_SIZES = {2: 1, 3: 2, 4: 4, 5: 8, 8: 8, 9: 16}


class EventStreamError(ValueError):
    """The bytes are not a well-formed event stream (bad length or CRC)."""


def encode_frame(headers: dict[str, str], payload: bytes) -> bytes:
    """One event-stream frame with string ``headers`` and ``payload``."""
    encoded = b"".join(
        bytes([len(name)]) + name.encode() + b"\x07" + struct.pack(">H", len(value)) + value.encode()
        for name, value in headers.items()
    )
    total = _MIN_FRAME + len(encoded) + len(payload)
    prelude = struct.pack(">II", total, len(encoded))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    body = prelude + encoded + payload
    return body + struct.pack(">I", zlib.crc32(body))


def decode_frames(buffer: bytearray) -> Iterator[tuple[dict[str, Any], bytes]]:
    """Take every whole frame off the front of ``buffer``, yielding its headers and payload."""
    while len(buffer) >= _MIN_FRAME:
        total, headers_length, prelude_crc = _PRELUDE.unpack_from(buffer)
        if zlib.crc32(bytes(buffer[:8])) != prelude_crc or not _MIN_FRAME <= total <= _MAX_FRAME:
            raise EventStreamError("event-stream prelude is corrupt")
        if headers_length > total - _MIN_FRAME:
            raise EventStreamError("event-stream headers overrun the frame")
        if len(buffer) < total:
            return
        frame = bytes(buffer[:total])
        del buffer[:total]
        (message_crc,) = struct.unpack_from(">I", frame, total - 4)
        if zlib.crc32(frame[: total - 4]) != message_crc:
            raise EventStreamError("event-stream message CRC does not match")
        start = _PRELUDE.size
        yield _headers(frame[start : start + headers_length]), frame[start + headers_length : total - 4]


def _headers(raw: bytes) -> dict[str, Any]:
    headers: dict[str, Any] = {}
    at = 0
    while at < len(raw):
        name_length = raw[at]
        name = raw[at + 1 : at + 1 + name_length].decode("utf-8", "replace")
        kind = raw[at + 1 + name_length]
        at += 2 + name_length
        if kind in (0, 1):
            headers[name] = kind == 0
        elif kind in (6, 7):
            (length,) = struct.unpack_from(">H", raw, at)
            value = raw[at + 2 : at + 2 + length]
            headers[name] = value.decode("utf-8", "replace") if kind == 7 else value
            at += 2 + length
        elif kind in _FIXED_SIZES:
            headers[name] = raw[at : at + _FIXED_SIZES[kind]]
            at += _FIXED_SIZES[kind]
        else:
            raise EventStreamError(f"event-stream header type {kind} is unknown")
    return headers


class EventStreamMeter(BodyMeter):
    """Measures a Bedrock event-stream body: each chunk's Messages event is read as the SSE meter reads it.

    ``invocation_metrics`` holds Bedrock's own counts from ``message_stop``; they fill in the usage
    only where the events did not report it.
    """

    __slots__ = ("_frames", "invocation_metrics")

    def __init__(self, *, clock: Any = None) -> None:
        super().__init__(stream=True, clock=clock)
        self._frames: bytearray | None = bytearray()
        self.invocation_metrics: dict[str, Any] | None = None

    def feed(self, chunk: bytes) -> None:
        """Account for the next chunk of the raw event-stream body."""
        self.bytes_received += len(chunk)
        frames = self._frames
        if frames is None:
            return  # the framing broke earlier: nothing after it can be located
        frames += chunk
        try:
            for headers, payload in decode_frames(frames):
                self._frame_event(headers, payload)
        except EventStreamError:
            self.malformed_events += 1
            self._frames = None

    def defer(self) -> None:
        """Never defer: frames are decoded as they pass (the SSE tail shortcut does not apply)."""
        return None

    def _frame_event(self, headers: dict[str, Any], payload: bytes) -> None:
        kind = headers.get(":message-type")
        if kind in ("exception", "error"):
            self.events += 1
            self.api_error_type = str(headers.get(":exception-type") or headers.get(":error-code") or "error")
            return
        if headers.get(":event-type") != "chunk":
            self.events += 1
            return
        try:
            event = base64.b64decode(json.loads(payload)["bytes"], validate=True)
        except (ValueError, KeyError, TypeError, binascii.Error):
            self.events += 1
            self.malformed_events += 1
            return
        before = self.malformed_events
        self._event(b"data: " + event)
        if self.malformed_events > before and self.unreadable is None:
            # The SDK names an event it cannot parse as JSON "completion" and then fails parsing it
            # (an SSE event here has no name to skip it by): the application sees that error.
            self.unreadable = "JSONDecodeError"
        if self.message_stop_seen and b"amazon-bedrock-invocationMetrics" in event:
            self._take_invocation_metrics(event)

    def _take_invocation_metrics(self, event: bytes) -> None:
        try:
            metrics = json.loads(event).get("amazon-bedrock-invocationMetrics")
        except ValueError:
            return
        if not isinstance(metrics, dict):
            return
        self.invocation_metrics = metrics
        output = metrics.get("outputTokenCount")
        if not self.output_reported and isinstance(output, int) and output >= 0:
            self.usage.output_tokens = output
            self.output_reported = True
        given = metrics.get("inputTokenCount")
        if self.usage.input_tokens == 0 and isinstance(given, int) and given > 0:
            self.usage.input_tokens = given
