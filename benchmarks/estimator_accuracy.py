"""How close the wasted output of dropped streams comes to what the API billed: issue 20's targets.

Every scenario runs in a process of its own over a database of its own, with the fake API (in a
thread of that process) answering through the real SDK. Its tokenizer is set to 0.6x and 1.6x its
default characters per token (``ResponseSpec.chars_per_token_scale``), and its answers are one
content kind each: English prose, CJK, emoji + CJK, code (a code-execution call's input),
thinking-heavy and tool-input-heavy. A stream is cut after a random number of
``content_block_delta`` events; the report's wasted output tokens, read from the store after
``costwatch.flush()``, are compared with the output the fake billed for the cut attempts (its ledger):

* **fresh**: a fresh process over a fresh database; the cuts come before any stream completed, then
  three streams complete in the same run (target: aggregate wasted-output error <= 10%);
* **warm**: a store holding ten completed streams of the same kind, written by an earlier process
  (target: <= 5% for every content kind);
* **counted**: ``count_partial_output=True`` at ``count_partial_output_rate`` :data:`COUNT_RATE`
  calls a second, so that no cut waits past its hold for the rate limit and keeps its estimate
  (target: exact). The fake's ``count_tokens`` counts with the tokenizer it bills with (its spec's
  script and scale), so this row is about counting; the cuts that fell back to their estimate
  anyway are reported apart (``fallbacks``) and must be none.

Input, cache and attempt counts must be exact in every scenario: the benchmark asserts it. Prints a
markdown table and a JSON line. Run: ``python benchmarks/estimator_accuracy.py [--cuts N] [--seed S]``.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MODEL = "claude-haiku-4-5"
SCALES = (0.6, 1.6)
KINDS: dict[str, dict[str, Any]] = {
    # kind: the answer's blocks (kind, output tokens) and the script of its text
    "English prose": {"blocks": (("text", 1200),), "script": "latin"},
    "CJK": {"blocks": (("text", 1200),), "script": "cjk"},
    "emoji + CJK": {"blocks": (("text", 1200),), "script": "emoji_cjk"},
    "code": {"blocks": (("text", 60), ("code_execution", 1200)), "script": "latin"},
    "thinking-heavy": {"blocks": (("thinking", 1500), ("text", 300)), "script": "latin"},
    "tool-input-heavy": {"blocks": (("text", 80), ("tool_use", 1200)), "script": "latin"},
}
COUNT_RATE = 100.0
"""``count_partial_output_rate`` of the counted rows (the setting's maximum; its default is 1 a second)."""
WARM_STREAMS = 10
FRESH_COMPLETIONS = 3
FRESH_TARGET = 0.10
WARM_TARGET = 0.05


# -- one scenario, in a process of its own --------------------------------------------------------
def _spec(kind: str, scale: float, seed: int) -> Any:
    from costwatch.testing import ResponseSpec
    from costwatch.testing.spec import BlockKind, BlockSpec

    shape = KINDS[kind]
    return ResponseSpec(
        blocks=tuple(BlockSpec(BlockKind(name), tokens) for name, tokens in shape["blocks"]),
        script=shape["script"],
        chars_per_token_scale=scale,
        # Cache figures of their own, so that "exact" covers them too.
        cache_read_tokens=2_000,
        cache_write_5m_tokens=300,
        seed=seed,
    )


def _stream(client: Any, label: str) -> None:
    messages = [{"role": "user", "content": f"task {label}"}]
    try:
        for _ in client.messages.create(model=MODEL, max_tokens=8192, messages=messages, stream=True):
            pass
    except Exception as exc:  # the cut: the SDK line's transport error, or the SDK's own
        if (
            "incomplete" not in str(exc)
            and "closed" not in str(exc)
            and "Connection" not in type(exc).__name__
        ):
            raise


def _session(store_url: str, spool: Path, work: Any, **settings: Any) -> None:
    """One process's worth of costwatch: instrument over the store, ``work()``, flush, uninstrument."""
    import costwatch
    from costwatch.pipeline import Pipeline
    from costwatch.spool import Spool

    pipeline = Pipeline(spool=Spool(spool))
    costwatch.instrument(pipeline=pipeline, database_url=store_url, metrics=False, listeners=[], **settings)
    try:
        work()
        assert costwatch.flush(60), "records did not reach the store"
    finally:
        costwatch.uninstrument()
        pipeline.shutdown()


def _totals(store_url: str) -> dict[str, int]:
    """The report's overall totals (every rollup measure) of the store at ``store_url``."""
    from costwatch.store import ROLLUP_MEASURES, SqlStore

    store = SqlStore(store_url)
    try:
        found = store.rollup_totals()
    finally:
        store.shutdown()
    return {name: getattr(found[0], name) for name in ROLLUP_MEASURES} if found else {}


def _cut_sources(store_url: str) -> dict[str, int]:
    """How many dropped attempts in the store have each output source (counted, estimated, ...)."""
    import sqlalchemy as sa

    from costwatch.store.schema import ATTEMPTS

    engine = sa.create_engine(store_url)
    try:
        with engine.connect() as connection:
            query = (
                sa.select(ATTEMPTS.c.output_source, sa.func.count())
                .where(ATTEMPTS.c.outcome != "completed")
                .group_by(ATTEMPTS.c.output_source)
            )
            return {str(source): int(n) for source, n in connection.execute(query)}
    finally:
        engine.dispose()


def scenario(
    mode: str, kind: str, scale: float, cuts: int, seed: int, count_rate: float = COUNT_RATE
) -> dict[str, Any]:
    """Run one scenario; the report's figures beside the fake's ledger (exact counts asserted)."""
    import anthropic

    from costwatch.testing import FakeAnthropicServer, Fault
    from costwatch.testing.plan import plan_response

    rng = random.Random(f"{mode}:{kind}:{scale}:{seed}")
    spec = _spec(kind, scale, seed)
    with tempfile.TemporaryDirectory() as tmp, FakeAnthropicServer(spec) as server:
        store_url = f"sqlite:///{Path(tmp) / 'store.db'}"
        client = anthropic.Anthropic(base_url=server.base_url, api_key="bench", max_retries=0)
        if mode == "warm":
            # An earlier process: completed streams of the same kind, their samples in the store.
            _session(
                store_url,
                Path(tmp) / "spool-0",
                lambda: [_stream(client, f"w{i}") for i in range(WARM_STREAMS)],
            )
        server.ledger.clear()
        # Cut before the end: 90% of the deltas of an answer of this spec (a piece may count 2 or 3
        # tokens in some scripts and scales, so deltas are not a fixed share of tokens).
        deltas = max(1, plan_response(spec, body=b"{}", model_requested=MODEL).delta_count * 9 // 10)

        def work() -> None:
            for i in range(cuts):
                server.enqueue(Fault.cut_after_deltas(rng.randint(1, deltas)))
                _stream(client, f"cut {i}")
            if mode == "fresh":
                for i in range(FRESH_COMPLETIONS):
                    _stream(client, f"done {i}")

        settings: dict[str, Any] = {}
        if mode == "counted":
            settings = {"count_partial_output": True, "count_partial_output_rate": count_rate}
        before = _totals(store_url)
        _session(store_url, Path(tmp) / "spool-1", work, **settings)
        ledger = server.ledger.entries
        after = _totals(store_url)
        sources = _cut_sources(store_url)
    totals = {name: after.get(name, 0) - before.get(name, 0) for name in after}
    cut = [e for e in ledger if e.ending.value != "completed"]
    assert len(cut) == cuts, f"{len(cut)} streams were cut, not {cuts}"
    exact = {
        "attempts": (totals["attempts"], len(ledger)),
        "input tokens": (totals["billed_input_tokens"], sum(e.input_tokens for e in ledger)),
        "cache read tokens": (totals["billed_cache_read_tokens"], sum(e.cache_read_tokens for e in ledger)),
        "cache write tokens": (
            totals["billed_cache_write_tokens"],
            sum(e.cache_write_tokens for e in ledger),
        ),
        "wasted input tokens": (totals["wasted_input_tokens"], sum(e.input_tokens for e in cut)),
    }
    for name, (reported, billed) in exact.items():
        assert reported == billed, f"{mode}/{kind}/{scale}: {name} {reported} in the report, {billed} billed"
    truth = sum(e.output_tokens for e in cut)
    return {
        "mode": mode,
        "kind": kind,
        "scale": scale,
        "cuts": cuts,
        "wasted_output_reported": totals["wasted_output_tokens"],
        "wasted_output_billed": truth,
        "error": (totals["wasted_output_tokens"] - truth) / truth if truth else 0.0,
        "fallbacks": sum(n for source, n in sources.items() if source != "counted") * (mode == "counted"),
    }


# -- the driver ----------------------------------------------------------------------------------
def _run_apart(mode: str, kind: str, scale: float, cuts: int, seed: int, count_rate: float) -> dict[str, Any]:
    """:func:`scenario` in a fresh Python process (nothing of costwatch's carried over)."""
    arguments = json.dumps(
        {"mode": mode, "kind": kind, "scale": scale, "cuts": cuts, "seed": seed, "count_rate": count_rate}
    )
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--scenario", arguments],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"scenario {arguments} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _aggregate(rows: Sequence[dict[str, Any]]) -> float:
    reported = sum(r["wasted_output_reported"] for r in rows)
    billed = sum(r["wasted_output_billed"] for r in rows)
    return (reported - billed) / billed if billed else 0.0


def _counted_available() -> bool:
    from costwatch.settings import Settings

    return "count_partial_output" in Settings.__dataclass_fields__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuts", type=int, default=6, help="streams cut per scenario (default 6)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--count-rate",
        type=float,
        default=COUNT_RATE,
        help=f"count_partial_output_rate of the counted rows (default {COUNT_RATE:g}; the setting's: 1)",
    )
    parser.add_argument(
        "--modes", default="fresh,warm,counted", help="which rows to run (default fresh,warm,counted)"
    )
    parser.add_argument("--scenario", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scenario:
        print(json.dumps(scenario(**json.loads(args.scenario))))
        return
    wanted = args.modes.split(",")
    modes = [m for m in ("fresh", "warm") if m in wanted]
    modes += ["counted"] if "counted" in wanted and _counted_available() else []
    results = [
        _run_apart(mode, kind, scale, args.cuts, args.seed, args.count_rate)
        for mode in modes
        for scale in SCALES
        for kind in KINDS
    ]
    print("| scenario | tokenizer | " + " | ".join(KINDS) + " | aggregate |")
    print("|---|---:|" + "---:|" * (len(KINDS) + 1))
    for mode in modes:
        for scale in SCALES:
            rows = [r for r in results if r["mode"] == mode and r["scale"] == scale]
            cells = " | ".join(f"{r['error']:+.1%}" for r in rows)
            print(f"| {mode} | {scale}x | {cells} | {_aggregate(rows):+.1%} |")
    if "counted" in wanted and "counted" not in modes:
        print("| counted | 0.6x, 1.6x | (count_partial_output is not in this costwatch yet) |")
    fresh = [r for r in results if r["mode"] == "fresh"]
    warm = [r for r in results if r["mode"] == "warm"]
    verdicts: dict[str, bool] = {}
    if fresh:
        verdicts[f"fresh, aggregate <= {FRESH_TARGET:.0%}"] = abs(_aggregate(fresh)) <= FRESH_TARGET
        verdicts[f"fresh, each tokenizer's aggregate <= {FRESH_TARGET:.0%}"] = all(
            abs(_aggregate([r for r in fresh if r["scale"] == s])) <= FRESH_TARGET for s in SCALES
        )
    if warm:
        verdicts[f"warm, every kind <= {WARM_TARGET:.0%}"] = all(abs(r["error"]) <= WARM_TARGET for r in warm)
    counted = [r for r in results if r["mode"] == "counted"]
    if counted:
        verdicts["counted, exact"] = all(
            r["wasted_output_reported"] == r["wasted_output_billed"] for r in counted
        )
        verdicts["counted, no cut fell back to its estimate"] = not any(r["fallbacks"] for r in counted)
        off = sum(abs(r["wasted_output_reported"] - r["wasted_output_billed"]) for r in counted)
        fell_back = [f"{r['kind']} {r['scale']}x: {r['fallbacks']}" for r in counted if r["fallbacks"]]
        print(
            f"counted at {args.count_rate:g} calls/s: {off} tokens off over {sum(r['cuts'] for r in counted)}"
            f" cuts; fell back to the estimate: {', '.join(fell_back) or 'none'}"
        )
    print()
    for name, met in verdicts.items():
        print(f"- {name}: {'met' if met else 'MISSED'}")
    print("- input, cache and attempt counts: exact in every scenario (asserted)")
    print(json.dumps({"results": results, "targets": verdicts}))


if __name__ == "__main__":
    main()
