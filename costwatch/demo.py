"""The demo workload: agentic streams that drop mid-answer, retried by the application, accounted.

``run_demo`` starts :class:`~costwatch.testing.FakeAnthropicServer` with a drop profile like the
production report (long streams with thinking, code execution and tool use, cut in the middle of a
``content_block_delta``), sends a workload through the real ``anthropic.Anthropic`` client with an
ordinary application retry loop, and lets ``costwatch.instrument(...)`` record every attempt in the
SQL store. The server's ledger is returned too: it is the ground truth the store must agree with.
"""

from __future__ import annotations

import hashlib
import importlib
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import anthropic

import costwatch

from .pipeline import Pipeline
from .pricing import PriceTable
from .testing import (
    BlockKind,
    BlockSpec,
    DropProfile,
    FakeAnthropicServer,
    LedgerEntry,
    ReceivedRequest,
    ResponseSpec,
)

__all__ = [
    "DEFAULT_WORKFLOWS",
    "DEMO_BLOCKS",
    "DemoError",
    "DemoOptions",
    "DemoRequest",
    "DemoResult",
    "default_models",
    "demo_requests",
    "demo_response_spec",
    "ledger_summary",
    "run_demo",
]

DEFAULT_WORKFLOWS: tuple[str, ...] = ("code-review", "nightly-refactor", "support-triage")
"""The ``workflow`` tags the demo spreads its requests over."""

DEMO_BLOCKS: tuple[BlockSpec, ...] = (
    BlockSpec(BlockKind.THINKING, 700),
    BlockSpec(BlockKind.TEXT, 250),
    BlockSpec(BlockKind.BASH_CODE_EXECUTION, 250),
    BlockSpec(BlockKind.TEXT, 300),
    BlockSpec(BlockKind.TOOL_USE, 120, name="apply_patch"),
)
"""One agentic turn: thinking, prose, a bash run, more prose and a tool call (1,620 output tokens).

Shorter than :data:`~costwatch.testing.DEFAULT_BLOCKS` so the default demo finishes in seconds;
each stream is still several hundred delta events long, so a drop lands mid-answer.
"""

_MAX_TOKENS = 16_000
_THINKING_BUDGET = 8_000


class DemoError(Exception):
    """The demo cannot run as asked (a bad option, or costwatch already instrumenting the process)."""


@dataclass(frozen=True)
class DemoOptions:
    """How big the demo workload is and how often its streams drop."""

    requests: int = 40
    """Logical requests (each retried until it completes or ``max_attempts`` is reached)."""
    drop_rate: float = 0.3
    """The share of streams the server cuts mid-answer."""
    concurrency: int = 4
    """Worker threads sending requests at once."""
    models: tuple[str, ...] = ()
    """The model mix; empty means :func:`default_models` of the price table."""
    workflows: tuple[str, ...] = DEFAULT_WORKFLOWS
    max_attempts: int = 4
    """Attempts per logical request before the application gives up."""
    backoff_s: float = 0.05
    """The application's first back-off; it doubles on each further retry."""
    seed: int = 0
    """Fixes the whole run: each request's model, workflow, prompt sizes, and which streams drop where."""

    def check(self) -> None:
        """Raise :class:`DemoError` naming the first option that cannot work."""
        if self.requests < 1:
            raise DemoError(f"--requests must be at least 1, got {self.requests}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise DemoError(f"--drop-rate must be at least 0 and below 1, got {self.drop_rate}")
        if self.concurrency < 1:
            raise DemoError(f"--concurrency must be at least 1, got {self.concurrency}")
        if self.max_attempts < 1:
            raise DemoError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if not self.workflows or any(not w for w in self.workflows):
            raise DemoError("--workflows needs at least one non-empty name, e.g. --workflows nightly,triage")


@dataclass(frozen=True)
class DemoRequest:
    """One logical request of the workload: which model, which workflow tag, and its body."""

    index: int
    model: str
    workflow: str
    body: dict[str, Any]
    """Keyword arguments for ``client.messages.create`` (without ``stream``)."""


@dataclass(frozen=True)
class DemoResult:
    """What a demo run did, with the fake server's ledger as ground truth."""

    database_url: str
    requests: int
    completed: int
    """Logical requests that got a whole answer."""
    gave_up: int
    """Logical requests the application abandoned after ``max_attempts`` failures."""
    ledger: tuple[LedgerEntry, ...] = field(repr=False)
    elapsed_s: float = 0.0
    after: Any = None
    """What ``run_demo``'s ``while_serving`` returned (the CLI's reconciliation), else ``None``."""


def default_models(prices: PriceTable) -> tuple[str, ...]:
    """The current (``active``) priced models of the price table, for a realistic model mix."""
    active = []
    for model in prices.models:
        price = prices.lookup(model)
        if price is not None and price.status == "active":
            active.append(model)
    return tuple(active) or prices.models[:3]


def demo_requests(options: DemoOptions, models: Sequence[str]) -> list[DemoRequest]:
    """The workload: ``options.requests`` requests over ``models`` and ``options.workflows``, seeded."""
    if not models:
        raise DemoError("--models needs at least one model id")
    rng = random.Random(options.seed)
    requests = []
    for index in range(options.requests):
        model = rng.choice(list(models))
        workflow = options.workflows[index % len(options.workflows)]
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": _MAX_TOKENS,
            "thinking": {"type": "enabled", "budget_tokens": _THINKING_BUDGET},
            "system": "You are a coding agent in a large repository. Make the smallest correct change.",
            "tools": [
                {
                    "name": "apply_patch",
                    "description": "Apply a unified diff to the working tree.",
                    "input_schema": {"type": "object", "properties": {"diff": {"type": "string"}}},
                }
            ],
            "messages": [
                {"role": "user", "content": f"[{workflow}] task {index}: find and fix the failing test."}
            ],
        }
        requests.append(DemoRequest(index=index, model=model, workflow=workflow, body=body))
    return requests


def demo_response_spec(body_digest: str, *, seed: int = 0) -> ResponseSpec:
    """The answer to one request body: a large cached prompt and an agentic turn.

    Sizes depend only on the body, so a retry of the same request bills the same prompt again,
    as the real API does.
    """
    rng = random.Random(int.from_bytes(hashlib.sha256(f"{seed}:{body_digest}".encode()).digest()[:8], "big"))
    cache_read = rng.randrange(60_000, 160_000, 1_000)
    fresh_input = rng.randrange(2_000, 24_000, 100)
    # Agent loops mostly re-read a cached prefix; some turns also extend the cache.
    cache_write = rng.choice((0, 0, rng.randrange(1_000, 12_000, 100)))
    return ResponseSpec(
        blocks=DEMO_BLOCKS,
        input_tokens=fresh_input,
        cache_read_tokens=cache_read,
        cache_write_5m_tokens=cache_write,
        seed=seed,
    )


def _transport_errors() -> tuple[type[BaseException], ...]:
    """What a dropped stream raises while it is read: the transport error of either SDK line (anthropic
    2.17 on raises an ``APIConnectionError`` from it, which the retry loop catches as an ``APIError``)."""
    errors: list[type[BaseException]] = []
    for name in ("httpx", "httpx2"):
        try:
            errors.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _send_until_answered(
    client: anthropic.Anthropic,
    request: DemoRequest,
    options: DemoOptions,
    retryable: tuple[type[BaseException], ...],
) -> bool:
    """A typical application retry loop: send, read the stream, and on failure back off and resend."""
    with costwatch.tags(workflow=request.workflow):
        for attempt in range(1, options.max_attempts + 1):
            try:
                stream: Any = client.messages.create(stream=True, **request.body)
                for _event in stream:
                    pass
                return True
            except retryable:
                if attempt == options.max_attempts:
                    return False
                time.sleep(options.backoff_s * 2 ** (attempt - 1))
    return False


def run_demo(
    options: DemoOptions,
    database_url: str,
    *,
    prices: PriceTable,
    on_request_done: Callable[[bool], None] | None = None,
    while_serving: Callable[[str], Any] | None = None,
) -> DemoResult:
    """Run the workload against a fresh fake server, recording every attempt in ``database_url``.

    ``on_request_done`` is called (from worker threads) as each logical request finishes, with
    whether it was answered. Every record is in the store when this returns. ``while_serving`` is
    called with the fake server's base URL once every record is stored, before the server stops
    (the CLI reconciles the run with the fake's usage report there); its result is ``after``.
    """
    options.check()
    models = options.models or default_models(prices)
    requests = demo_requests(options, models)
    if costwatch.is_instrumented():
        raise DemoError("costwatch is already instrumenting this process; run the demo on its own")
    retryable: tuple[type[BaseException], ...] = (anthropic.APIError, *_transport_errors())
    started = time.monotonic()
    server = FakeAnthropicServer(
        drop_profile=DropProfile(options.drop_rate, seed=options.seed),
        spec_for=lambda received: _spec_for(received, options.seed),
        seed=options.seed,
    )
    outcomes: list[bool] = []
    lock = threading.Lock()

    def work(request: DemoRequest) -> None:
        answered = _send_until_answered(client, request, options, retryable)
        with lock:
            outcomes.append(answered)
        if on_request_done is not None:
            on_request_done(answered)

    with server:
        # The SDK's own retries stay on (as in production); drops are never retried by the SDK.
        client = anthropic.Anthropic(base_url=server.base_url, api_key="demo", max_retries=2, timeout=60.0)
        # The demo's own pipeline, shut down when it ends, so that the process-wide one (and its
        # writer thread and spool) is left untouched for whatever runs after the demo in this process.
        pipeline = Pipeline()
        # The one line an application adds (without the pipeline argument):
        costwatch.instrument(pipeline=pipeline, database_url=database_url, metrics=False, prices=prices)
        try:
            with ThreadPoolExecutor(
                max_workers=options.concurrency, thread_name_prefix="costwatch-demo"
            ) as pool:
                for future in [pool.submit(work, request) for request in requests]:
                    future.result()
            if not costwatch.flush(timeout=60.0):
                raise DemoError("the demo's attempt records did not reach the database within 60 s")
        finally:
            costwatch.uninstrument()
            pipeline.shutdown()
            client.close()
        ledger = server.ledger.entries
        after = while_serving(server.base_url) if while_serving is not None else None
    return DemoResult(
        database_url=database_url,
        requests=len(requests),
        completed=sum(outcomes),
        gave_up=len(outcomes) - sum(outcomes),
        ledger=ledger,
        elapsed_s=time.monotonic() - started,
        after=after,
    )


def _spec_for(received: ReceivedRequest, seed: int) -> ResponseSpec:
    return demo_response_spec(received.body_digest, seed=seed)


def ledger_summary(entries: Sequence[LedgerEntry]) -> dict[str, Any]:
    """What the fake server billed, in the report's terms, to set beside the report as ground truth.

    Output is split by how the attempt ended, because a dropped stream's output reaches costwatch
    only as an estimate from the text that arrived.
    """
    completed = [e for e in entries if e.ending.value == "completed"]
    return {
        "attempts": len(entries),
        "billed_tokens": {
            "input": sum(e.input_tokens for e in entries),
            "output": sum(e.output_tokens for e in entries),
            "cache_read": sum(e.cache_read_tokens for e in entries),
            "cache_write": sum(e.cache_write_tokens for e in entries),
        },
        "completed_attempts": len(completed),
        "completed_output_tokens": sum(e.output_tokens for e in completed),
        "failed_output_tokens": sum(e.output_tokens for e in entries if e.ending.value != "completed"),
    }
