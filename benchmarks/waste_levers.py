"""What each lever against retry waste saves on the fake API's production-like workload.

The workload: agentic requests, each with a large stable prefix (tool definitions, a long system
prompt, the earlier turns of its session) and a short new turn, answered with a long agentic turn
(thinking, prose, a bash run, a tool call) by ``costwatch.testing.FakeAnthropicServer``, which bills
prompt caching as the API does. A seeded schedule fails a share of attempts as production does
(streams cut in the middle of an event, mid-stream ``overloaded_error`` events), and fails
the same attempt of the same request in every variant, so the variants differ only in the lever:

* ``baseline``: the retry loop most applications write (catch ``APIError`` and the transport error,
  back off, resend), no caching;
* ``stream_with_retries``: costwatch's retry helper, no caching;
* ``+ cache_prefix_on_retry``: the helper putting a breakpoint on the stable prefix of retries only;
* ``cache every request``: the application marks the prefix on every request, first attempts too
  (what the report's avoidable figure assumes);
* ``+ waste budget``: the helper under ``costwatch.waste_budget`` (a circuit breaker: it trades
  answers for dollars once the hour's waste passes the budget).

Costs are the fake's ledger priced with the built-in price table (the ground truth); the avoidable
figure is what ``costwatch report`` predicts from the baseline's records. Prints a markdown table
and a JSON line. Run: ``python benchmarks/waste_levers.py [--requests N] [--tiny]``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anthropic

import costwatch
from costwatch.avoidable import avoidable_for_request
from costwatch.demo import DEMO_BLOCKS
from costwatch.pipeline import Pipeline
from costwatch.pricing import PriceTable, load_prices
from costwatch.prompt_prefix import with_cache_breakpoint
from costwatch.records import AttemptRecord, Usage
from costwatch.sinks import MemorySink
from costwatch.store import SqlStore
from costwatch.testing import FakeAnthropicServer, Fault, LedgerEntry, ReceivedRequest, ResponseSpec
from costwatch.testing.plan import plan_response, position_of_delta

MODEL = "claude-sonnet-4-5"
MAX_ATTEMPTS = 4


@dataclass(frozen=True)
class Workload:
    """How big the workload is and how often it fails."""

    requests: int = 40
    prefix_chars: int = 160_000
    """Characters of the stable prefix (the fake bills one token per 4 bytes: ~40k tokens)."""
    failure_rate: float = 0.3
    """The share of attempts that fail (85% of them cut mid-event, 15% by an ``overloaded_error`` event)."""
    budget_share: float = 0.25
    """The waste budget per hour, as a share of what the baseline wasted in the whole run."""
    seed: int = 0


def request_body(workload: Workload, task: int) -> dict[str, Any]:
    """One agent turn: tools, a system prompt and earlier turns (the stable prefix), then a new turn."""
    turns = max(1, workload.prefix_chars // 4_000)
    history: list[dict[str, Any]] = []
    for turn in range(turns):
        history.append(
            # ~4,000 bytes of tool output a turn: ~1,000 tokens on the fake (4 bytes a token).
            {"role": "user", "content": f"[task {task}] step {turn}: " + "tool output line; " * 222}
        )
        history.append({"role": "assistant", "content": [{"type": "text", "text": f"Step {turn} done."}]})
    return {
        "model": MODEL,
        "max_tokens": 16_000,
        "tools": [
            {
                "name": "apply_patch",
                "description": "Apply a unified diff to the working tree.",
                "input_schema": {"type": "object", "properties": {"diff": {"type": "string"}}},
            }
        ],
        "system": "You are a coding agent in a large repository. Make the smallest correct change.",
        "messages": [*history, {"role": "user", "content": f"[task {task}] now run the tests and fix them."}],
    }


class FailureSchedule:
    """Fails attempt ``k`` of task ``n`` the same way in every variant (seeded on task and attempt)."""

    def __init__(self, workload: Workload) -> None:
        self.workload = workload
        self.attempts: dict[int, int] = {}

    def __call__(self, request: ReceivedRequest) -> Fault | None:
        body = request.body if isinstance(request.body, dict) else {}
        last = body.get("messages", [{}])[-1].get("content", "")
        task = int(str(last).split("]")[0].removeprefix("[task ") or 0)
        attempt = self.attempts[task] = self.attempts.get(task, 0) + 1
        digest = hashlib.sha256(f"{self.workload.seed}:{task}:{attempt}".encode()).digest()
        draw = int.from_bytes(digest[:8], "big") / 2**64
        if draw >= self.workload.failure_rate:
            return None
        # Failures before the body (429, 529) bill nothing and the SDK retries them itself: left out,
        # so that every variant counts the same attempts.
        if draw / self.workload.failure_rate < 0.85:
            return Fault.cut_mid_event(after_events=position_of_delta(_EVENTS, 1 + digest[8] % 400))
        return Fault.error_event(after_deltas=1 + digest[9] % 300)


# Where the deltas of an answer are (the cut lands in the middle of one).
_EVENTS = plan_response(ResponseSpec(blocks=DEMO_BLOCKS), body=b"{}", model_requested=MODEL).events


def _transport_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = []
    for name in ("httpx", "httpx2"):
        try:
            errors.append(importlib.import_module(name).TransportError)
        except ImportError:
            continue
    return tuple(errors)


def baseline_loop(client: anthropic.Anthropic, body: dict[str, Any]) -> bool:
    """The retry loop applications write by hand."""
    retryable = (anthropic.APIError, *_transport_errors())
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            with client.messages.stream(**body) as stream:
                for _event in stream:
                    pass
            return True
        except retryable:
            if attempt == MAX_ATTEMPTS:
                return False
            time.sleep(0.001 * 2 ** (attempt - 1))
    return False


def helper(cache_prefix_on_retry: bool) -> Callable[[anthropic.Anthropic, dict[str, Any]], bool]:
    def send(client: anthropic.Anthropic, body: dict[str, Any]) -> bool:
        try:
            costwatch.stream_with_retries(
                client,
                cache_prefix_on_retry=cache_prefix_on_retry,
                max_attempts=MAX_ATTEMPTS,
                initial_backoff_s=0.001,
                max_backoff_s=0.01,
                **body,
            )
            return True
        except Exception:  # given up, or refused by the waste budget
            return False

    return send


def cache_every_request(client: anthropic.Anthropic, body: dict[str, Any]) -> bool:
    return baseline_loop(client, with_cache_breakpoint(body) or body)


@dataclass
class Outcome:
    """What one variant did, from the fake's ledger and costwatch's records."""

    lever: str
    answered: int
    attempts: int
    billed_usd: float
    wasted_usd: float
    prompt_usd: float
    avoidable_usd: float | None
    refused: int


def price_ledger(entries: tuple[LedgerEntry, ...], prices: PriceTable) -> tuple[float, float, float]:
    """(billed, wasted, prompt-only) dollars of the ledger: wasted is every attempt that did not complete."""
    billed = wasted = prompt = 0.0
    for entry in entries:
        usage = Usage(
            input_tokens=entry.input_tokens,
            cache_read_tokens=entry.cache_read_tokens,
            cache_write_5m_tokens=entry.cache_write_5m_tokens,
            cache_write_1h_tokens=entry.cache_write_1h_tokens,
            output_tokens=entry.output_tokens,
        )
        cost = prices.cost(MODEL, usage)
        assert cost is not None
        billed += cost.total_usd
        prompt += cost.input_usd + cost.cache_read_usd + cost.cache_write_usd
        if entry.ending.value != "completed":
            wasted += cost.total_usd
    return billed, wasted, prompt


def run_variant(
    lever: str,
    send: Callable[[anthropic.Anthropic, dict[str, Any]], bool],
    workload: Workload,
    prices: PriceTable,
    *,
    budget: float | None = None,
    database_url: str | None = None,
) -> Outcome:
    sink = MemorySink()
    pipeline = Pipeline()
    sinks: list[Any] = [sink]
    if database_url is not None:
        sinks.append(SqlStore(database_url))
    costwatch.instrument(pipeline=pipeline, sinks=sinks, listeners=[], prices=prices)
    costwatch.waste_budget(budget)
    answered = 0
    try:
        spec = ResponseSpec(blocks=DEMO_BLOCKS, seed=workload.seed)
        with FakeAnthropicServer(spec, schedule=FailureSchedule(workload), seed=workload.seed) as server:
            client = anthropic.Anthropic(base_url=server.base_url, api_key="bench", max_retries=2)
            for task in range(workload.requests):
                with costwatch.tags(workflow=f"agent-{task % 3}"):
                    answered += send(client, request_body(workload, task))
            client.close()
            entries = server.ledger.entries
        costwatch.flush(30)
    finally:
        costwatch.waste_budget(None)
        costwatch.uninstrument()
        pipeline.shutdown()
        for extra in sinks[1:]:
            extra.shutdown()
    by_request: dict[str, list[AttemptRecord]] = {}
    for record in sink.records:
        by_request.setdefault(record.logical_request_id, []).append(record)
    found = [avoidable_for_request(attempts, prices) for attempts in by_request.values()]
    known = [f.avoidable_usd for f in found if f is not None and f.avoidable_usd is not None]
    billed, wasted, prompt = price_ledger(entries, prices)
    return Outcome(
        lever=lever,
        answered=answered,
        attempts=len(entries),
        billed_usd=billed,
        wasted_usd=wasted,
        prompt_usd=prompt,
        avoidable_usd=sum(known) if known else None,
        refused=sum(1 for r in sink.records if r.error_type == "WasteBudgetExceeded"),
    )


def run(workload: Workload, database_url: str | None = None) -> list[Outcome]:
    prices = load_prices()
    baseline = run_variant(
        "baseline: hand-written retry loop", baseline_loop, workload, prices, database_url=database_url
    )
    # The run lasts well under an hour: all of its waste counts against an hourly budget.
    budget = round(baseline.wasted_usd * workload.budget_share, 2)
    return [
        baseline,
        run_variant("stream_with_retries", helper(False), workload, prices),
        run_variant("stream_with_retries(cache_prefix_on_retry=True)", helper(True), workload, prices),
        run_variant("cache_control on every request", cache_every_request, workload, prices),
        run_variant(
            f"stream_with_retries + waste_budget(usd_per_hour={budget:g})",
            helper(False),
            workload,
            prices,
            budget=budget,
        ),
    ]


def table(outcomes: list[Outcome], workload: Workload) -> str:
    base = outcomes[0]
    lines = [
        f"{workload.requests} requests, ~{workload.prefix_chars // 4:,}-token stable prefix, "
        f"{workload.failure_rate:.0%} of attempts failing, {MODEL}, at most {MAX_ATTEMPTS} attempts",
        "",
        "| lever | answered | attempts | billed $ | wasted $ | prompt $ | billed vs baseline "
        "| refused retries |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for o in outcomes:
        lines.append(
            f"| {o.lever} | {o.answered}/{workload.requests} | {o.attempts} | {o.billed_usd:.2f} | "
            f"{o.wasted_usd:.2f} | {o.prompt_usd:.2f} | {o.billed_usd / base.billed_usd - 1:+.1%} "
            f"| {o.refused} |"
        )
    if base.avoidable_usd is not None:
        lines += [
            "",
            f"costwatch's avoidable-waste figure for the baseline: ${base.avoidable_usd:.2f} of "
            f"${base.wasted_usd:.2f} wasted (caching the prefix from the first attempt of each retried "
            "request).",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=Workload.requests)
    parser.add_argument("--failure-rate", type=float, default=Workload.failure_rate)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--db", help="also store the baseline's attempts here, for `costwatch report --db`")
    parser.add_argument(
        "--tiny", action="store_true", help="a few small requests: every path once, in seconds"
    )
    args = parser.parse_args()
    workload = Workload(requests=args.requests, failure_rate=args.failure_rate, seed=args.seed)
    if args.tiny:
        workload = Workload(requests=4, prefix_chars=8_000, failure_rate=0.5, seed=args.seed)
    outcomes = run(workload, args.db)
    print(table(outcomes, workload))
    print(json.dumps({"workload": workload.__dict__, "outcomes": [o.__dict__ for o in outcomes]}))


if __name__ == "__main__":
    main()
