"""How well costwatch estimates the billed output of a stream cut mid-way.

Completed streams from ``costwatch.testing`` calibrate the estimator, as completed attempts do in
production; then the same kind of stream is cut after a random number of ``content_block_delta``
events, and each dropped attempt's estimate is compared with the tokens the server billed (its ledger).
Three ways to be calibrated: not at all (a fresh process and a fresh store), by completed streams
of the same process, and by completed streams another process stored (a fresh process over a warm
store: the calibration samples loaded at ``instrument()``). A fourth row counts instead of estimating
(``count_partial_output``: the fake's ``count_tokens``). Prints a markdown table and a JSON line.
Run: ``python benchmarks/estimator_accuracy.py [--cuts N]``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
from pathlib import Path

import anthropic

import costwatch
from costwatch.pipeline import Pipeline
from costwatch.sinks import MemorySink
from costwatch.spool import Spool
from costwatch.store import SqlStore
from costwatch.testing import FakeAnthropicServer, Fault, ResponseSpec

MODEL = "claude-haiku-4-5"


def warm_store(store_url: str, spool: Path, streams: int, seed: int) -> None:
    """Another process: ``streams`` completed streams recorded in the store at ``store_url``."""
    pipeline = Pipeline(spool=Spool(spool))
    costwatch.instrument(pipeline=pipeline, sinks=[SqlStore(store_url)], listeners=[])
    try:
        with FakeAnthropicServer(ResponseSpec(seed=seed)) as server:
            client = anthropic.Anthropic(base_url=server.base_url, api_key="bench", max_retries=0)
            for i in range(streams):
                messages = [{"role": "user", "content": f"earlier task {i}"}]
                for _ in client.messages.create(model=MODEL, max_tokens=8192, messages=messages, stream=True):
                    pass
        pipeline.flush()
    finally:
        costwatch.uninstrument()
        pipeline.shutdown()


def run(
    cuts: int, warm_up: int, seed: int, store_url: str | None = None, count: bool = False
) -> dict[str, float]:
    rng = random.Random(seed)
    sink = MemorySink()
    pipeline = Pipeline()
    sinks = [sink] if store_url is None else [sink, SqlStore(store_url)]
    # The fake API has no rate limit on count_tokens: the bench counts as fast as it can.
    counting = {"count_partial_output": True, "count_partial_output_rate": 100} if count else {}
    costwatch.instrument(pipeline=pipeline, sinks=sinks, listeners=[], **counting)
    try:
        with FakeAnthropicServer(ResponseSpec(seed=seed)) as server:
            client = anthropic.Anthropic(base_url=server.base_url, api_key="bench", max_retries=0)
            deltas = ResponseSpec().output_tokens // 2  # about two tokens per delta event

            def stream(i: int) -> None:
                messages = [{"role": "user", "content": f"task {i}"}]
                try:
                    for _ in client.messages.create(
                        model=MODEL, max_tokens=8192, messages=messages, stream=True
                    ):
                        pass
                except Exception:
                    pass

            for i in range(warm_up):
                stream(i)
            costwatch.flush()
            sink.clear()
            server.ledger.clear()
            for i in range(cuts):
                server.enqueue(Fault.cut_after_deltas(rng.randint(1, deltas)))
                stream(warm_up + i)
            entries = {e.request_id: e for e in server.ledger.entries}
            costwatch.flush(None)  # with count: waits for the counts, while the fake still answers
    finally:
        costwatch.uninstrument()
        pipeline.shutdown()
    errors, estimated, truth = [], 0, 0
    for record in sink.records:
        entry = entries[record.request_id]
        if not entry.output_tokens:
            continue
        estimated += record.usage.output_tokens
        truth += entry.output_tokens
        errors.append(abs(record.usage.output_tokens - entry.output_tokens) / entry.output_tokens)
    errors.sort()
    return {
        "cuts": len(errors),
        "total_error": abs(estimated - truth) / truth,
        "median_error": statistics.median(errors),
        "p90_error": errors[int(0.9 * (len(errors) - 1))],
        "max_error": errors[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuts", type=int, default=60)
    parser.add_argument("--warm-up", type=int, default=8)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    cold = run(args.cuts, 0, args.seed)
    warm = run(args.cuts, args.warm_up, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        store_url = f"sqlite:///{Path(tmp) / 'store.db'}"
        warm_store(store_url, Path(tmp) / "spool", args.warm_up, args.seed + 1)
        fleet = run(args.cuts, 0, args.seed, store_url)
    counted = run(args.cuts, 0, args.seed, count=True)
    print("| estimator | cuts | total error | median error | p90 error | max error |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, result in (
        ("defaults (fresh process, fresh store)", cold),
        (f"after {args.warm_up} completed streams in the same process", warm),
        (f"fresh process over a store holding {args.warm_up} completed streams", fleet),
        ("count_partial_output (fresh process, fresh store)", counted),
    ):
        print(
            f"| {name} | {result['cuts']} | {result['total_error']:.1%} | {result['median_error']:.1%} "
            f"| {result['p90_error']:.1%} | {result['max_error']:.1%} |"
        )
    print(json.dumps({"uncalibrated": cold, "calibrated": warm, "fleet": fleet, "counted": counted}))


if __name__ == "__main__":
    main()
