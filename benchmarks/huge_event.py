"""6. One very large SSE event: costwatch's body meter must cost time in proportion to its size.

A stream whose single ``content_block_delta`` carries megabytes of text arrives in many chunks
before the event ends. The meter is fed the stream in 64 KiB chunks (httpx's read size) and timed
at two sizes; linear cost means the seconds per megabyte stay the same. For scale, each row also
gives the time ``json.loads`` takes for the event alone, which the SDK itself pays to parse it.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence

from measure import Measurement

from costwatch.stream_meter import BodyMeter

__all__ = ["LINEARITY_TARGET", "measure_huge_event"]

LINEARITY_TARGET = 1.5
"""Seconds per MB at the largest size over the smallest: 1.0 is linear; quadratic would be the size ratio."""

_CHUNK = 64 * 1024


def _stream(megabytes: int) -> tuple[bytes, bytes]:
    """A whole stream with one delta of ``megabytes`` of text, and that delta's JSON."""
    text = {"type": "text_delta", "text": "x" * (megabytes << 20)}
    delta = json.dumps({"type": "content_block_delta", "index": 0, "delta": text}).encode()
    head = (
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1",'
        b'"model":"claude-sonnet-4-5","usage":{"input_tokens":10,"output_tokens":1}}}\n\n'
        b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
        b'"content_block":{"type":"text","text":""}}\n\n'
    )
    tail = (
        b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},'
        b'"usage":{"output_tokens":5}}\n\nevent: message_stop\ndata: {"type":"message_stop"}\n\n'
    )
    return head + b"event: content_block_delta\ndata: " + delta + b"\n\n" + tail, delta


def _meter_seconds(body: bytes) -> float:
    chunks = [body[i : i + _CHUNK] for i in range(0, len(body), _CHUNK)]
    meter = BodyMeter(stream=True)
    start = time.perf_counter()
    for chunk in chunks:
        meter.feed(chunk)
    elapsed = time.perf_counter() - start
    if not meter.complete:
        raise RuntimeError("the meter did not see the stream end")
    return elapsed


def _parse_seconds(delta: bytes) -> float:
    start = time.perf_counter()
    json.loads(delta)
    return time.perf_counter() - start


def measure_huge_event(sizes_mb: Sequence[int], *, repeats: int) -> list[Measurement]:
    """Meter time for one event of each size (median of ``repeats``), and the linearity row."""
    rows: list[Measurement] = []
    per_mb: dict[int, float] = {}
    for megabytes in sizes_mb:
        body, delta = _stream(megabytes)
        meter = statistics.median(_meter_seconds(body) for _ in range(repeats))
        parse = statistics.median(_parse_seconds(delta) for _ in range(repeats))
        per_mb[megabytes] = meter / megabytes
        rows.append(
            Measurement(
                benchmark="huge SSE event",
                case=f"one {megabytes} MB content_block_delta in 64 KiB chunks",
                metric="body meter time",
                value=meter * 1e3,
                unit="ms",
                detail={"json_loads_of_the_event_ms": parse * 1e3, "repeats": repeats},
            )
        )
    smallest, largest = min(sizes_mb), max(sizes_mb)
    if largest > smallest:
        ratio = per_mb[largest] / per_mb[smallest]
        rows.append(
            Measurement(
                benchmark="huge SSE event",
                case=f"{largest} MB vs {smallest} MB",
                metric="meter seconds per MB, ratio",
                value=ratio,
                unit="ratio",
                target=f"<= {LINEARITY_TARGET:g} (linear)",
                met=ratio <= LINEARITY_TARGET,
                detail={"seconds_per_mb": per_mb},
            )
        )
    return rows
