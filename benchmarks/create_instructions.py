"""Instructions a non-streaming ``messages.create`` costs with ``costwatch.instrument()`` defaults.

Instruction counts (valgrind's callgrind) are what a loaded, shared machine cannot blur: this runs
one fresh process per variant under ``valgrind --tool=callgrind --instr-atstart=no``, each making
``warmup`` creates through the real SDK against the fake API in another process (not counted), then
switching counting on (``callgrind_control -i on``), making ``creates`` more (dump 1: the caller's
thread, and anything else running meanwhile) and flushing what the variant holds (dump 2: the
writer's batch). ``COSTWATCH_FLUSH_INTERVAL`` is set high, so the writer wakes only for the
flush and the records are one batch, one transaction, as ~100 creates are within a default
1 s wake outside valgrind. The costwatch processes use a database that an untimed process created,
migrated and gave a user's failure history (``store_history.py``: abandoned attempts, retried
requests).

Prints a table: instructions per create in each phase and all in, and beyond the SDK alone. Run::

    PYTHONPATH=. python benchmarks/create_instructions.py [--creates 100] [--warmup 30] [--keep DIR]

``--keep`` leaves the callgrind files in ``DIR`` for ``callgrind_annotate``. ``--variant`` may be
given several times (``none``, ``costwatch``, ``costwatch, no sinks``: the caller's side alone).
``--fresh-store`` runs on a store created and migrated only, without the history (as before the
tenth session), to compare the two.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["VARIANTS", "measure_create_instructions"]

MODEL = "claude-opus-4-6"
VARIANTS = ("none", "costwatch", "costwatch, no sinks")
_PHASES = ("creates", "flush")


def _child(variant: str, url: str, warmup: int, creates: int) -> None:
    import anthropic
    from measure import callgrind_control

    flush: Any = lambda: None  # noqa: E731
    if variant != "none":
        import costwatch

        if variant == "costwatch":
            costwatch.instrument()
        else:
            costwatch.instrument(sinks=[], listeners=[])
        flush = lambda: costwatch.flush(600)  # noqa: E731
    client = anthropic.Anthropic(base_url=url, api_key="bench", max_retries=0)
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 16}

    def call(i: int) -> None:
        client.messages.create(**body, messages=[{"role": "user", "content": f"short request {i}"}])

    for i in range(warmup):
        call(i)
    flush()
    collections = [generation["collections"] for generation in gc.get_stats()]
    callgrind_control("-i", "on")
    for i in range(creates):
        call(warmup + i)
    callgrind_control("-d", "creates")
    flush()
    callgrind_control("-d", "flush")
    callgrind_control("-i", "off")
    # A full collection costs tens of millions of instructions: whether one fell in the counted
    # calls moves a create's figure by ~100k (see the README), so each run says how many did.
    after = [generation["collections"] for generation in gc.get_stats()]
    print(json.dumps({"gc": [b - a for a, b in zip(collections, after, strict=True)]}))


def measure_create_instructions(
    variants: Sequence[str], *, creates: int, warmup: int, keep: Path | None = None, history: bool = True
) -> dict[str, dict[str, int]]:
    """Instructions of each phase (``creates``, ``flush``) for each variant, from one process each;
    ``history``: on a store with a user's failure history (else a fresh one)."""
    from fake_api_process import fake_api_in_subprocess
    from measure import callgrind_dumps, callgrind_run
    from store_history import write_store_history

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "PYTHONHASHSEED": "0"}
    env.pop("COSTWATCH_DATABASE_URL", None)
    env["COSTWATCH_FLUSH_INTERVAL"] = "600"
    results: dict[str, dict[str, int]] = {}
    with fake_api_in_subprocess() as url, tempfile.TemporaryDirectory(prefix="costwatch-cg-") as home:
        out = keep or Path(home) / "callgrind"
        out.mkdir(parents=True, exist_ok=True)
        me = str(Path(__file__).resolve())
        # Untimed: creates and migrates the database the counted processes then find.
        if history:
            write_store_history(home, env)
        else:
            prepare = [sys.executable, me, "--child", "costwatch", url, "1", "0"]
            subprocess.run(prepare, cwd=home, env=env, check=True, capture_output=True)
        for variant in variants:
            stem = "callgrind." + variant.replace(",", "").replace(" ", "-")
            child = [sys.executable, me, "--child", variant, url, str(warmup), str(creates)]
            completed = callgrind_run(child, out=out, stem=stem, cwd=home, env=env)
            results[variant] = {
                dump: sum(threads.values()) for dump, threads in callgrind_dumps(out, stem, _PHASES).items()
            }
            gcs = json.loads(completed.stdout.strip().splitlines()[-1])["gc"]
            results[variant].update({f"gc{generation}": count for generation, count in enumerate(gcs)})
    return results


def _table(results: dict[str, dict[str, int]], creates: int) -> str:
    base = results.get("none")
    lines = [
        "| variant | creates phase, a create | flush phase, a create | all in, a create "
        "| beyond the SDK alone | collections (gen 0/1/2) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for variant, phases in results.items():
        per = {phase: phases.get(phase, 0) / creates for phase in _PHASES}
        total = sum(per.values())
        beyond = "" if base is None else f"{(total - sum(base[p] for p in _PHASES) / creates) / 1000:,.0f} k"
        collections = "/".join(str(phases.get(f"gc{generation}", "?")) for generation in range(3))
        lines.append(
            f"| {variant} | {per['creates'] / 1000:,.0f} k | {per['flush'] / 1000:,.0f} k "
            f"| {total / 1000:,.0f} k | {beyond} | {collections} |"
        )
    return "\n".join(lines)


def _main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=4, metavar=("VARIANT", "URL", "WARMUP", "CREATES"))
    parser.add_argument("--creates", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--variant", action="append", choices=VARIANTS)
    parser.add_argument("--keep", type=Path, help="leave the callgrind files here")
    parser.add_argument("--fresh-store", action="store_true", help="a store without failure history")
    args = parser.parse_args(argv)
    if args.child:
        variant, url, warmup, creates = args.child
        _child(variant, url, int(warmup), int(creates))
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    variants = args.variant or ["none", "costwatch"]
    results = measure_create_instructions(
        variants, creates=args.creates, warmup=args.warmup, keep=args.keep, history=not args.fresh_store
    )
    print(json.dumps(results))
    print(_table(results, args.creates))


if __name__ == "__main__":
    _main(sys.argv[1:])
