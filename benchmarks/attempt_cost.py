"""What one attempt costs the caller's thread, without the network: ``Accountant.begin`` + ``settle``.

``begin`` reads the request (headers, and the body: searched for the model, and hashed for the
fingerprint when it is small) and places the attempt in its logical request; ``settle`` builds the
record (usage from a body meter that has read a small completed stream, the price) and queues it for
the pipeline. Every attempt has a different body, as in production, so none is taken for a retry of
another. The pipeline has no sink, so its writer thread does little: it fingerprints the larger
bodies (hashlib releases the GIL meanwhile) and counts the records dropped; it shares the interpreter.
The value is wall time; ``detail.caller_cpu_us`` is the caller's thread CPU (steadier when other
processes share the cores) and ``detail.process_cpu_us`` the whole process's CPU per attempt, writer
and flush included, so that work moved off the caller's thread still shows.
"""

from __future__ import annotations

import importlib
import json
import statistics
import time
from collections.abc import Sequence
from typing import Any

from measure import Measurement

from costwatch.accounting import Accountant
from costwatch.pipeline import Pipeline
from costwatch.pricing import load_prices
from costwatch.records import Outcome
from costwatch.stream_meter import BodyMeter

__all__ = ["ATTEMPT_COST_TARGET_US", "measure_attempt_cost", "request_body"]

ATTEMPT_COST_TARGET_US = 20.0
MODEL = "claude-opus-4-6"

_SMALL_ANSWER = b"".join(
    f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
    for name, data in [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_bench",
                    "type": "message",
                    "role": "assistant",
                    "model": MODEL,
                    "content": [],
                    "stop_reason": None,
                    "usage": {"input_tokens": 310, "cache_read_input_tokens": 0, "output_tokens": 1},
                },
            },
        ),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text"}},
        ),
        *[
            (
                "content_block_delta",
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " word"}},
            )
            for _ in range(20)
        ],
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 20}},
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
)


def request_body(size: int, i: int) -> bytes:
    """A Messages API request body of about ``size`` bytes, distinct for each ``i``."""
    head = {
        "max_tokens": 4096,
        "messages": [{"role": "user", "content": f"request {i}: "}],
        "model": MODEL,
        "system": "You are a careful assistant that summarises reports.",
        "stream": True,
    }
    filler = max(0, size - len(json.dumps(head)))
    head["messages"][0]["content"] += "lorem ipsum " * (filler // 12)  # type: ignore[index]
    return json.dumps(head).encode()


def _http_module() -> Any:
    try:
        return importlib.import_module("httpx2")
    except ImportError:
        return importlib.import_module("httpx")


def _per_attempt_us(accountant: Accountant, requests: Sequence[Any], meter: BodyMeter) -> tuple[float, float]:
    """Wall and caller's-thread CPU microseconds per attempt (CPU is steadier on a loaded machine)."""
    started, cpu = time.perf_counter(), time.thread_time()
    for request in requests:
        attempt = accountant.begin(request)
        attempt.http_status = 200
        attempt.stream = True
        attempt.request_id = "req_bench"
        attempt.meter = meter  # settle only reads the meter: one that read a small answer serves all
        accountant.settle(attempt, Outcome.COMPLETED, None)
    wall, cpu = time.perf_counter() - started, time.thread_time() - cpu
    return wall / len(requests) * 1e6, cpu / len(requests) * 1e6


def _timed_run(
    accountant: Accountant, requests: Sequence[Any], meter: BodyMeter
) -> tuple[float, float, float]:
    """Per attempt: wall and CPU of the caller's thread, and the whole process's CPU to the flush."""
    process = time.process_time()
    wall, cpu = _per_attempt_us(accountant, requests, meter)
    accountant.pipeline.flush(30)
    return wall, cpu, (time.process_time() - process) / len(requests) * 1e6


def measure_attempt_cost(
    body_sizes: Sequence[int], *, attempts: int, repeats: int, small_size: int = 1_000
) -> list[Measurement]:
    """Median microseconds per attempt for each request body size (fewer attempts for big bodies)."""
    http = _http_module()
    headers = {
        "anthropic-version": "2023-06-01",
        "x-stainless-retry-count": "0",
        "content-type": "application/json",
    }
    meter = BodyMeter(stream=True, clock=time.perf_counter)
    meter.feed(_SMALL_ANSWER)
    rows = []
    for size in body_sizes:
        # Bound the bytes held at once: a 1 MB body is measured over fewer attempts.
        count = max(10, min(attempts, (200 * 1_000_000) // (size * repeats)))
        pipeline = Pipeline()
        accountant = Accountant(pipeline=pipeline, prices=load_prices())
        try:
            warm = [
                http.Request(
                    "POST", "http://bench/v1/messages", headers=headers, content=request_body(size, -i - 1)
                )
                for i in range(10)
            ]
            _per_attempt_us(accountant, warm, meter)
            samples, cpu_samples, process_samples = [], [], []
            for r in range(repeats):
                requests = [
                    http.Request(
                        "POST",
                        "http://bench/v1/messages",
                        headers=headers,
                        content=request_body(size, r * count + i),
                    )
                    for i in range(count)
                ]
                wall, cpu, process = _timed_run(accountant, requests, meter)
                samples.append(wall)
                cpu_samples.append(cpu)
                process_samples.append(process)
        finally:
            pipeline.shutdown()
        value = statistics.median(samples)
        gated = size == small_size
        rows.append(
            Measurement(
                benchmark="attempt cost",
                case=f"begin + settle, {_size_text(size)} request body",
                metric="caller's thread per attempt",
                value=value,
                unit="us",
                target=f"< {ATTEMPT_COST_TARGET_US:g} us" if gated else "",
                met=(value < ATTEMPT_COST_TARGET_US) if gated else None,
                detail={
                    "attempts_per_run": count,
                    "runs": repeats,
                    "samples_us": samples,
                    "caller_cpu_us": statistics.median(cpu_samples),
                    "process_cpu_us": statistics.median(process_samples),
                },
            )
        )
    return rows


def _size_text(size: int) -> str:
    if size >= 1_000_000:
        return f"{size / 1_000_000:g} MB"
    return f"{size / 1_000:g} KB"
