"""Instructions a fresh process's stream loop costs with ``costwatch.instrument()`` defaults.

Instruction counts (valgrind's callgrind) are what a loaded, shared machine cannot blur. This runs
one fresh process per variant under ``valgrind --tool=callgrind --instr-atstart=no
--separate-threads=yes``, each installing the variant, switching counting on
(``callgrind_control -i on``), running ``streams`` streams of ``events`` SSE events through the real
SDK against the fake API in another process (dump ``loop``: the application's thread, and anything
else running meanwhile, each thread apart), then flushing what the variant holds (dump ``flush``:
the writer's transaction for those streams, its first). ``COSTWATCH_FLUSH_INTERVAL`` is set high so
the writer wakes only for the flush: under valgrind the loop takes a hundred times longer and a 1 s
timer would wake it a hundred times more often than outside. The costwatch processes use a
database that an untimed process created and migrated first, as in ``fresh_process.py``.

Prints instructions per stream in each phase and beyond the SDK alone. Run::

    PYTHONPATH=. python benchmarks/stream_instructions.py [--streams 20] [--events 2000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["measure_stream_instructions"]

MODEL = "claude-opus-4-6"
VARIANTS = ("none", "costwatch")
_PHASES = ("loop", "flush")
_CALIBRATING_STREAMS = 12
"""Streams of the untimed first process: past the ten samples a model's factor reads in full."""


def _child(variant: str, url: str, streams: int, events: int) -> None:
    import anthropic
    from measure import callgrind_control

    flush: Any = lambda: None  # noqa: E731
    if variant == "costwatch":
        import costwatch

        costwatch.instrument()
        flush = lambda: costwatch.flush(600)  # noqa: E731
    client = anthropic.Anthropic(base_url=url, api_key="bench", max_retries=0)
    body: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": max(1, events - 7),
        "messages": [{"role": "user", "content": "benchmark request: summarise the quarterly report"}],
    }
    callgrind_control("-i", "on")
    for i in range(streams):
        body["messages"][0]["content"] = f"benchmark request {i}: summarise the quarterly report"
        for _event in client.messages.create(**body, stream=True):
            pass
    callgrind_control("-d", "loop")
    flush()
    callgrind_control("-d", "flush")
    callgrind_control("-i", "off")


def measure_stream_instructions(
    variants: Sequence[str], *, streams: int, events: int, keep: Path | None = None
) -> dict[str, dict[str, dict[str, int]]]:
    """Instructions of each phase and thread for each variant, from one process each."""
    from fake_api_process import fake_api_in_subprocess
    from measure import callgrind_dumps, callgrind_run

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
        "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED", "0"),
    }
    env.pop("COSTWATCH_DATABASE_URL", None)
    env["COSTWATCH_FLUSH_INTERVAL"] = "600"
    results: dict[str, dict[str, dict[str, int]]] = {}
    with fake_api_in_subprocess() as url, tempfile.TemporaryDirectory(prefix="costwatch-cg-") as home:
        out = keep or Path(home) / "callgrind"
        out.mkdir(parents=True, exist_ok=True)
        me = str(Path(__file__).resolve())
        # Untimed: creates and migrates the database and stores the calibration samples that a
        # deployed application's earlier runs leave, so that the counted streams are read as a
        # calibrated process reads them (their tails), not in full as the first ten of a model are.
        prepare = [sys.executable, me, "--child", "costwatch", url, str(_CALIBRATING_STREAMS), "50"]
        subprocess.run(prepare, cwd=home, env=env, check=True, capture_output=True)
        for variant in variants:
            stem = "callgrind." + variant.replace(",", "").replace(" ", "-")
            child = [sys.executable, me, "--child", variant, url, str(streams), str(events)]
            callgrind_run(child, out=out, stem=stem, cwd=home, env=env, separate_threads=True)
            results[variant] = callgrind_dumps(out, stem, _PHASES)
    return results


def _table(results: dict[str, dict[str, dict[str, int]]], streams: int) -> str:
    def total(variant: str) -> int:
        return sum(sum(threads.values()) for threads in results[variant].values())

    lines = ["| variant | phase | thread | instructions a stream |", "| --- | --- | --- | ---: |"]
    for variant, phases in results.items():
        for phase, threads in sorted(phases.items()):
            for thread, count in sorted(threads.items()):
                lines.append(f"| {variant} | {phase} | {thread} | {count / streams / 1000:,.0f} k |")
        lines.append(f"| {variant} | all in | all | {total(variant) / streams / 1000:,.0f} k |")
    if "none" in results:
        for variant in results:
            if variant != "none":
                beyond = (total(variant) - total("none")) / streams
                lines.append(f"| {variant} | beyond the SDK alone | all | {beyond / 1000:,.0f} k |")
    return "\n".join(lines)


def _main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=4, metavar=("VARIANT", "URL", "STREAMS", "EVENTS"))
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--events", type=int, default=2_000)
    parser.add_argument("--variant", action="append", choices=VARIANTS)
    parser.add_argument("--keep", type=Path, help="leave the callgrind files here")
    args = parser.parse_args(argv)
    if args.child:
        variant, url, streams, events = args.child
        _child(variant, url, int(streams), int(events))
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    variants = args.variant or list(VARIANTS)
    results = measure_stream_instructions(variants, streams=args.streams, events=args.events, keep=args.keep)
    print(json.dumps(results))
    print(_table(results, args.streams))


if __name__ == "__main__":
    _main(sys.argv[1:])
