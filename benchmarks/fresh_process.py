"""What a fresh process pays, with each tool's defaults: costwatch beside OpenLLMetry, Logfire, SDK tracing.

Every timed run is a new Python process (this file run with ``--child``), as a user's application
starts: it imports the SDK, installs one variant, then times its own loop of ``streams`` streams of
``events`` SSE events each through the real SDK against the fake API in another process, then
``creates`` non-streaming ``messages.create`` calls. Variants:

* ``none`` and ``none (control)``: the SDK alone, twice, so the table shows what two identical
  variants read when timed the same way (the noise floor of the machine);
* ``costwatch``: ``costwatch.instrument()`` with its defaults (SQLite store in the working directory,
  in-process Prometheus metrics, spans on the global tracer);
* ``OpenLLMetry``: ``AnthropicInstrumentor().instrument()`` with an SDK tracer provider exporting to
  memory;
* ``Logfire``: ``logfire.configure(send_to_logfire=False, console=False)`` and
  ``logfire.instrument_anthropic()``;
* ``SDK tracing`` (anthropic 1.x/2.x only): the SDK's own spans, with the same tracer provider.

Each round starts one process per variant in rotated order; a ratio is the median over rounds of
(variant / ``none`` of the same round), so a slow phase of a shared machine hits both sides of a
pair. The stream loop is timed on the wall clock and on ``time.process_time`` (every thread of the
process: costwatch's writer included); a loop row is held against its target by the 95% interval of
that median (:func:`median_interval`), and one whose interval spans the target has no verdict
(:func:`ratio_verdict`): on a 2-core machine a pair's ratio moves by ~10%, so nine rounds tell
1.03 from 1.10, not from 1.05. A create's CPU is ``process_time`` over the calls and a
final flush of what the variant still holds, minus ``none``'s, per call; the control's distance
from ``none`` the same way is the run's noise, and a difference within it has no verdict
(:func:`create_verdict`). The costwatch processes
share one working directory whose database a first, untimed process created and migrated, as the
runs of a deployed application do, and a second gave a user's failure history (``store_history.py``:
abandoned attempts, retried requests); a separate row gives that first ``instrument()`` (new database),
and another ``instrument()`` on a store that already holds the fleet's calibration (5,000 samples of
completed streams), which it reads before it returns.

Two processes of one variant differ by several percent in what the same work costs them (memory
layout, the machine's other load), which is why the loop rows need many rounds. The paired rows
(:func:`_paired_child`) take that difference out: one fresh process per round runs
``costwatch.instrument(client=accounted)`` with the defaults otherwise, and alternates every stream
and every create between the accounted client and a plain one, each timed on the calling thread's
CPU clock; the CPU of every other thread (costwatch's writer) during the loop, and during the creates
and the final flush, is charged to the accounted side whole (the create's row says how much of its
cost each side is). The plain client makes one stream and
one create first, uncounted: the SDK's own first use (its response models' schemas, some 20-40 ms)
would otherwise fall on whichever client went first. What the two clients share (the process's
imports, its memory) these rows cannot see; the loop rows above can, as can callgrind
(benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from store_history import StoreHistory

__all__ = [
    "BELOW_NOISE",
    "PEERS",
    "SPANS_TARGET",
    "TOO_FEW_ROUNDS",
    "create_verdict",
    "measure_fresh_process",
    "median_interval",
    "paired_rows",
    "ratio_verdict",
]

MODEL = "claude-opus-4-6"
NONE = "none"
CONTROL = "none (control)"
COSTWATCH = "costwatch"
PEERS = ("OpenLLMetry", "Logfire", "SDK tracing")
RATIO_TARGET = 1.03
INSTRUMENT_TARGET_MS = 150.0
CREATE_TARGET_US = 100.0
_CHILD_TIMEOUT_S = 600.0
BELOW_NOISE = "below noise"
SPANS_TARGET = "interval spans target"
TOO_FEW_ROUNDS = "too few rounds"
_CALIBRATED_RUNS = 5
"""Fresh processes timed on the calibrated store (at most: no more than rounds)."""


def create_verdict(difference_us: float, noise_us: float, target_us: float) -> bool | None:
    """Whether a create's CPU beyond the SDK alone meets its target; ``None``: the run cannot tell.

    ``noise_us`` is how far two identical variants (the control and the SDK alone) read a create
    apart in the same run. A difference no larger than that, or not above zero, is no measurement
    of the cost: it has no verdict, however far below the target it reads.
    """
    if difference_us <= max(noise_us, 0.0):
        return None
    return difference_us <= target_us


def median_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """A distribution-free interval for the median of what ``values`` sample, or ``None`` if too few.

    The interval runs between two order statistics, chosen from the binomial distribution so that
    the median lies inside it with at least ``confidence`` whatever the distribution (at 95%: from
    6 values; with 9, the second smallest to the second largest).
    """
    n = len(values)
    tail = (1.0 - confidence) / 2
    below, k = 0.0, 0  # P(fewer than k+1 values fall below the median), for k = 0, 1, ...
    while True:
        below += math.comb(n, k) / 2**n
        if below > tail:
            break
        k += 1
    if k == 0:
        return None
    ordered = sorted(values)
    return ordered[k - 1], ordered[n - k]


def ratio_verdict(ratios: Sequence[float], target: float) -> bool | None:
    """Whether the median of ``ratios`` (a loop's ratios, or a create's cost in the paired rows) meets
    ``target``; ``None``: its 95% interval spans it (the run cannot tell).

    Met when the whole interval of the median is at or under the target, missed when it is all above.
    """
    interval = median_interval(ratios)
    if interval is None:
        return None
    low, high = interval
    if high <= target:
        return True
    if low > target:
        return False
    return None


# -- the child: one fresh process, one variant ------------------------------------------------------
def _sdk_has_tracing() -> bool:
    import anthropic

    return int(anthropic.__version__.split(".")[0]) >= 1


def _memory_tracer_provider() -> Any:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    return provider


def _prepare(variant: str) -> tuple[dict[str, Any], Callable[[], object]]:
    """The application's import line for ``variant``; returns client options and a flush of what it holds."""
    if variant in (NONE, CONTROL):
        return {}, lambda: None
    if variant == COSTWATCH:
        import costwatch

        return {}, lambda: costwatch.flush(60)
    if variant == "OpenLLMetry":
        from opentelemetry import trace
        from opentelemetry.instrumentation.anthropic import AnthropicInstrumentor  # noqa: F401

        provider = _memory_tracer_provider()
        trace.set_tracer_provider(provider)
        return {}, provider.force_flush
    if variant == "Logfire":
        import logfire

        return {}, lambda: logfire.force_flush()
    if variant == "SDK tracing":
        from opentelemetry import trace

        provider = _memory_tracer_provider()
        trace.set_tracer_provider(provider)
        return {"open_telemetry": {"tracer_provider": provider}}, provider.force_flush
    raise SystemExit(f"unknown variant {variant!r}")


def _install(variant: str) -> None:
    """The install call of ``variant`` (what a user adds to an application after the import)."""
    if variant == COSTWATCH:
        import costwatch

        costwatch.instrument()
    elif variant == "OpenLLMetry":
        from opentelemetry.instrumentation.anthropic import AnthropicInstrumentor

        AnthropicInstrumentor().instrument()
    elif variant == "Logfire":
        import logfire

        logfire.configure(send_to_logfire=False, console=False, inspect_arguments=False)
        logfire.instrument_anthropic()


_MARK = "costwatch-benchmark-mark:"
"""Written to stderr around the install call: the ``-X importtime`` lines between two marks are the
imports the call made, whose time is taken out of the call's."""


def _child(variant: str, url: str, streams: int, events: int, creates: int) -> dict[str, Any]:
    started = time.perf_counter()
    import anthropic

    sdk_import_s = time.perf_counter() - started
    before = time.perf_counter()
    options, flush = _prepare(variant)
    import_s = time.perf_counter() - before
    print(_MARK, file=sys.stderr, flush=True)
    before = time.perf_counter()
    _install(variant)
    install_s = time.perf_counter() - before
    print(_MARK, file=sys.stderr, flush=True)
    client = anthropic.Anthropic(base_url=url, api_key="bench", max_retries=0, **options)
    body: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": max(1, events - 7),  # fake_api_process: n deltas are n + 7 events
        "messages": [{"role": "user", "content": "benchmark request: summarise the quarterly report"}],
    }
    # The application's loop, timed as the application would time it.
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(streams):
        body["messages"][0]["content"] = f"benchmark request {i}: summarise the quarterly report"
        for _event in client.messages.create(**body, stream=True):
            pass
    loop_wall_s, loop_cpu_s = time.perf_counter() - wall, time.process_time() - cpu
    flush()
    small = {**body, "max_tokens": 16}
    cpu = time.process_time()
    for i in range(creates):
        small["messages"] = [{"role": "user", "content": f"short request {i}"}]
        client.messages.create(**small)
    flush()  # all-in: what the writer thread does for these calls is counted here
    create_cpu_s = time.process_time() - cpu
    return {
        "sdk_import_s": sdk_import_s,
        "import_s": import_s,
        "install_s": install_s,
        "loop_wall_s": loop_wall_s,
        "loop_cpu_s": loop_cpu_s,
        "create_cpu_s": create_cpu_s,
    }


def _other_threads_cpu_s() -> float:
    """CPU seconds the process's other Python threads have used so far (costwatch's writer among them)."""
    import threading

    me = threading.get_ident()
    total = 0.0
    for thread in threading.enumerate():
        if thread.ident is not None and thread.ident != me:
            with contextlib.suppress(OSError):  # it ended between the listing and the read
                total += time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    return total


def _paired_child(url: str, streams: int, events: int, creates: int) -> dict[str, Any]:
    """One fresh process: streams and creates alternated between an accounted and a plain client."""
    import anthropic

    import costwatch

    accounted = anthropic.Anthropic(base_url=url, api_key="bench", max_retries=0)
    plain = anthropic.Anthropic(base_url=url, api_key="bench", max_retries=0)
    costwatch.instrument(client=accounted)
    body: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": max(1, events - 7),
        "messages": [{"role": "user", "content": "benchmark request: summarise the quarterly report"}],
    }
    small = {**body, "max_tokens": 16}
    for _event in plain.messages.create(**body, stream=True):  # the SDK's first use, uncounted
        pass
    plain.messages.create(**small)
    thread_cpu = time.thread_time
    out: dict[str, Any] = {"loop": [], "create": []}
    for phase, count in (("loop", streams), ("create", creates)):
        for i in range(count):
            pair: dict[str, float] = {}
            others = _other_threads_cpu_s()
            # Alternate who goes first, so neither side always follows the other's leftovers.
            for side in ("accounted", "plain") if i % 2 == 0 else ("plain", "accounted"):
                client = accounted if side == "accounted" else plain
                wall, cpu = time.perf_counter(), thread_cpu()
                if phase == "loop":
                    body["messages"][0]["content"] = f"benchmark request {i}: summarise the quarterly report"
                    for _event in client.messages.create(**body, stream=True):
                        pass
                else:
                    small["messages"] = [{"role": "user", "content": f"short request {i}"}]
                    client.messages.create(**small)
                pair[f"{side}_cpu_s"] = thread_cpu() - cpu
                pair[f"{side}_wall_s"] = time.perf_counter() - wall
            pair["others_cpu_s"] = _other_threads_cpu_s() - others
            out[phase].append(pair)
    others = _other_threads_cpu_s()
    costwatch.flush(60)
    out["flush_others_cpu_s"] = _other_threads_cpu_s() - others
    return out


def _run_paired_child(
    url: str, *, streams: int, events: int, creates: int, cwd: str, env: dict[str, str]
) -> dict[str, Any]:
    completed = _run_self(
        ["--paired-child", url, str(streams), str(events), str(creates)], "paired", cwd=cwd, env=env
    )
    return dict(json.loads(completed.stdout.strip().splitlines()[-1]))


def _run_self(
    arguments: list[str], what: str, *, cwd: str, env: dict[str, str], python_options: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """This file run as a child process with ``arguments``; its output, or an error naming ``what``."""
    completed = subprocess.run(
        [sys.executable, *python_options, str(Path(__file__).resolve()), *arguments],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=_CHILD_TIMEOUT_S,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"the {what} process failed:\n{completed.stderr[-3000:]}")
    return completed


def _loop_row(case: str, metric: str, values: Sequence[float], *, gated: bool, **detail: Any) -> Any:
    """A loop's row: the median of its ratios (``values``), held against the target by the 95% interval
    of that median if ``gated``."""
    from measure import Measurement

    interval = median_interval(values)
    met = ratio_verdict(values, RATIO_TARGET) if gated else None
    return Measurement(
        benchmark="fresh process",
        case=case,
        metric=metric,
        value=statistics.median(values),
        unit="ratio",
        target=f"<= {RATIO_TARGET}" if gated else "",
        met=met,
        no_verdict="" if not gated or met is not None else (SPANS_TARGET if interval else TOO_FEW_ROUNDS),
        detail={**detail, "interval_95": [round(x, 4) for x in interval] if interval else None},
    )


def paired_rows(runs: Sequence[dict[str, Any]], *, streams: int, events: int) -> list[Any]:
    """The rows of :func:`_paired_child`'s runs: the loop's ratios and a create's CPU, each with its interval.

    A loop pair's ratio charges the other threads' CPU during the pair to the accounted stream; a
    create's cost is the median of the pairs' differences on the calling thread plus the other
    threads' CPU over the creates and the final flush, spread over the creates (the writer works in
    batches, not per call, so its share is a sum, not a per-pair figure).
    """
    from measure import Measurement

    loop = [pair for run in runs for pair in run["loop"]]
    case = (
        f"one fresh process a round, {streams} x {events:,}-event streams alternated between a client "
        "that costwatch.instrument(client=...) accounts (defaults otherwise) and a plain one"
    )
    rows = []
    for metric, ratios in (
        (
            "loop wall, accounted vs plain stream",
            [p["accounted_wall_s"] / p["plain_wall_s"] for p in loop],
        ),
        (
            "loop CPU, accounted stream and other threads vs plain stream",
            [(p["accounted_cpu_s"] + p["others_cpu_s"]) / p["plain_cpu_s"] for p in loop],
        ),
    ):
        rows.append(_loop_row(case, metric, ratios, gated=True, processes=len(runs), pairs=len(ratios)))
    per_process_us, caller_us, writer_us = [], [], []
    for run in runs:
        creates = run["create"]
        caller = statistics.median(p["accounted_cpu_s"] - p["plain_cpu_s"] for p in creates)
        writer = (sum(p["others_cpu_s"] for p in creates) + run["flush_others_cpu_s"]) / len(creates)
        per_process_us.append((caller + writer) * 1e6)
        caller_us.append(caller * 1e6)
        writer_us.append(writer * 1e6)
    plain_us = statistics.median(p["plain_cpu_s"] for run in runs for p in run["create"]) * 1e6
    create_us = statistics.median(per_process_us)
    caller_median, writer_median = statistics.median(caller_us), statistics.median(writer_us)
    interval = median_interval(per_process_us)
    met = ratio_verdict(per_process_us, CREATE_TARGET_US)
    rows.append(
        Measurement(
            benchmark="fresh process",
            case=(
                "non-streaming create alternated between an accounted and a plain client in one "
                f"fresh process (the plain one: {plain_us:.0f} us of CPU a call; the difference's medians: "
                f"{caller_median:.0f} us on the calling thread, {writer_median:.0f} us on the others)"
            ),
            metric="CPU per call beyond the plain client (all threads)",
            value=create_us,
            unit="us",
            target=f"<= {CREATE_TARGET_US:.0f} us",
            met=met,
            no_verdict="" if met is not None else (SPANS_TARGET if interval else TOO_FEW_ROUNDS),
            detail={
                "processes": len(runs),
                "creates": len(runs[0]["create"]) if runs else 0,
                "interval_95": [round(x, 1) for x in interval] if interval else None,
                "per_process_us": [round(x, 1) for x in per_process_us],
                "caller_us": round(caller_median, 1),
                "writer_us": round(writer_median, 1),
                "plain_us": round(plain_us, 1),
            },
        )
    )
    return rows


def _imports_between_marks(stderr: str) -> float:
    """Seconds of the top-level imports ``-X importtime`` reported between the two marks."""
    inside, total_us = False, 0
    for line in stderr.splitlines():
        if line.startswith(_MARK):
            if inside:
                break
            inside = True
        elif inside and line.startswith("import time:"):
            _, cumulative, name = line.split("|")
            if name.startswith(" ") and not name.startswith("  "):  # top level: not nested in another
                total_us += int(cumulative)
    return total_us / 1e6


# -- the parent: rounds of fresh processes -------------------------------------------------------------
def _run_child(
    variant: str, url: str, *, streams: int, events: int, creates: int, cwd: str, env: dict[str, str]
) -> dict[str, Any]:
    completed = _run_self(
        ["--child", variant, url, str(streams), str(events), str(creates)],
        variant,
        cwd=cwd,
        env=env,
        python_options=("-X", "importtime"),
    )
    result = dict(json.loads(completed.stdout.strip().splitlines()[-1]))
    result["install_imports_s"] = _imports_between_marks(completed.stderr)
    return result


def available_variants(*, peers: bool = True) -> list[str]:
    """The variants this interpreter can run: the SDK alone, its control and costwatch, then the peers
    (unless ``peers`` is false) whose packages are installed."""
    import importlib.util

    found = [NONE, CONTROL, COSTWATCH]
    if not peers:
        return found
    if importlib.util.find_spec("opentelemetry.instrumentation.anthropic") is not None:
        found.append("OpenLLMetry")
    if importlib.util.find_spec("logfire") is not None:
        found.append("Logfire")
    if _sdk_has_tracing():
        found.append("SDK tracing")
    return found


def _store_calibration_samples(directory: str, count: int) -> None:
    """Give the default store in ``directory`` ``count`` samples of completed streams, as a fleet leaves."""
    from datetime import datetime, timedelta, timezone

    from costwatch.records import AttemptRecord, Outcome, Usage
    from costwatch.store import SqlStore

    now = datetime.now(timezone.utc)
    store = SqlStore(f"sqlite:///{Path(directory) / 'costwatch.db'}")
    try:
        store.write(
            [
                AttemptRecord(
                    attempt_id=f"calibration-{n}",
                    logical_request_id=f"calibration-{n}",
                    attempt_number=1,
                    started_at=now - timedelta(seconds=count - n),
                    outcome=Outcome.COMPLETED,
                    model=MODEL,
                    usage=Usage(input_tokens=20, output_tokens=1_000 + n % 97),
                    output_chars={"text": 3_500 + n % 89, "space": 600},
                )
                for n in range(count)
            ]
        )
    finally:
        store.shutdown()


def measure_fresh_process(
    *,
    pairs: int,
    paired: int | None = None,
    streams: int = 20,
    events: int = 2_000,
    creates: int = 100,
    peers: bool = True,
    calibration_samples: int = 5_000,
    history: StoreHistory | None = None,
    log: Callable[[str], None],
) -> list[Any]:
    """Rows for every variant: loop wall and CPU ratios, install time, CPU per non-streaming create.

    ``pairs`` rounds of one fresh process per variant, then ``paired`` fresh processes (``pairs`` if
    None) of the paired rows. ``history``: the failure history their store is given first
    (:data:`store_history.HISTORY` if None).
    """
    from fake_api_process import fake_api_in_subprocess
    from measure import Measurement
    from store_history import HISTORY, write_store_history

    variants = available_variants(peers=peers)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    env.pop("COSTWATCH_DATABASE_URL", None)
    with fake_api_in_subprocess() as url, tempfile.TemporaryDirectory(prefix="costwatch-fresh-") as home:
        # Untimed but for its install call: the first process creates and migrates the database,
        # which every timed costwatch process then finds, as the runs of a deployed application do.
        app_dir = home
        first = _run_child(COSTWATCH, url, streams=1, events=events, creates=1, cwd=app_dir, env=env)
        # Untimed: the failure history a user's store holds (abandoned attempts, retried requests).
        history_s = write_store_history(app_dir, env, history or HISTORY)
        log(f"  the store's failure history written in {history_s:.1f} s")
        for round_number in range(pairs):
            shift = round_number % len(variants)
            for name in variants[shift:] + variants[:shift]:
                run = _run_child(
                    name, url, streams=streams, events=events, creates=creates, cwd=app_dir, env=env
                )
                results[name].append(run)
            log(f"  round {round_number + 1}/{pairs} done")
        paired_runs = [
            _run_paired_child(url, streams=streams, events=events, creates=creates, cwd=app_dir, env=env)
            for _ in range(pairs if paired is None else paired)
        ]
        log(f"  {len(paired_runs)} paired processes done")
        calibrated_dir = str(Path(home) / "calibrated")
        os.mkdir(calibrated_dir)
        _run_child(COSTWATCH, url, streams=1, events=50, creates=1, cwd=calibrated_dir, env=env)
        _store_calibration_samples(calibrated_dir, calibration_samples)
        calibrated = [
            _run_child(COSTWATCH, url, streams=1, events=50, creates=1, cwd=calibrated_dir, env=env)
            for _ in range(max(1, min(pairs, _CALIBRATED_RUNS)))
        ]
    base = results[NONE]
    rows: list[Measurement] = []
    case_of = {
        CONTROL: "the SDK alone again (control)",
        COSTWATCH: "costwatch.instrument() defaults (SQLite store, metrics, spans)",
        "OpenLLMetry": "OpenLLMetry AnthropicInstrumentor, spans to memory",
        "Logfire": "Logfire instrument_anthropic, send_to_logfire=False",
        "SDK tracing": "the SDK's own tracing, spans to memory",
    }

    def per_call_us(name: str) -> list[float]:
        """A create's CPU beyond the SDK alone in each round."""
        return [
            (r["create_cpu_s"] - b["create_cpu_s"]) / creates * 1e6
            for r, b in zip(results[name], base, strict=True)
        ]

    create_noise_us = statistics.median(abs(d) for d in per_call_us(CONTROL))
    for name in variants[1:]:
        runs = results[name]
        gated = name == COSTWATCH
        case = f"fresh process, {streams} x {events:,}-event streams, {case_of[name]}"
        for metric, key in (
            ("loop wall vs SDK alone", "loop_wall_s"),
            ("loop CPU vs SDK alone", "loop_cpu_s"),
        ):
            ratios = [r[key] / b[key] for r, b in zip(runs, base, strict=True)]
            rows.append(
                _loop_row(
                    case, metric, ratios, gated=gated, pairs=len(runs), ratios=[round(r, 4) for r in ratios]
                )
            )
        if name == CONTROL:
            rows.append(
                Measurement(
                    benchmark="fresh process",
                    case=f"non-streaming create, {case_of[name]}",
                    metric="process CPU per call apart from SDK alone (all threads): the noise",
                    value=create_noise_us,
                    unit="us",
                    detail={"creates": creates, "per_round_us": [round(d, 1) for d in per_call_us(name)]},
                )
            )
            continue
        install_ms = statistics.median(r["install_s"] - r["install_imports_s"] for r in runs) * 1000
        rows.append(
            Measurement(
                benchmark="fresh process",
                case=f"{case_of[name]}, install call",
                metric="time beyond the imports it makes",
                value=install_ms,
                unit="ms",
                target=f"<= {INSTRUMENT_TARGET_MS:.0f} ms" if gated else "",
                met=(install_ms <= INSTRUMENT_TARGET_MS) if gated else None,
                detail={
                    "install_ms": statistics.median(r["install_s"] for r in runs) * 1000,
                    "install_imports_ms": statistics.median(r["install_imports_s"] for r in runs) * 1000,
                },
            )
        )
        rows.append(
            Measurement(
                benchmark="fresh process",
                case=f"{case_of[name]}, import line and the install call's imports",
                metric="time",
                value=statistics.median(r["import_s"] + r["install_imports_s"] for r in runs) * 1000,
                unit="ms",
            )
        )
        create_us = statistics.median(per_call_us(name))
        met = create_verdict(create_us, create_noise_us, CREATE_TARGET_US) if gated else None
        rows.append(
            Measurement(
                benchmark="fresh process",
                case=f"non-streaming create, {case_of[name]}",
                metric="process CPU per call beyond SDK alone (all threads)",
                value=create_us,
                unit="us",
                target=f"<= {CREATE_TARGET_US:.0f} us" if gated else "",
                met=met,
                no_verdict=BELOW_NOISE if gated and met is None else "",
                detail={
                    "creates": creates,
                    "noise_us": round(create_noise_us, 1),
                    "per_round_us": [round(d, 1) for d in per_call_us(name)],
                },
            )
        )
    rows.extend(paired_rows(paired_runs, streams=streams, events=events))
    rows.append(
        Measurement(
            benchmark="fresh process",
            case="costwatch.instrument() defaults on a new database (created and migrated)",
            metric="install call beyond its imports",
            value=(first["install_s"] - first["install_imports_s"]) * 1000,
            unit="ms",
        )
    )
    calibrated_ms = statistics.median(r["install_s"] - r["install_imports_s"] for r in calibrated) * 1000
    rows.append(
        Measurement(
            benchmark="fresh process",
            case=(
                f"costwatch.instrument() defaults on a store holding {calibration_samples:,} calibration "
                "samples (the fleet's calibration, read at install)"
            ),
            metric="install call beyond its imports",
            value=calibrated_ms,
            unit="ms",
            target=f"<= {INSTRUMENT_TARGET_MS:.0f} ms",
            met=calibrated_ms <= INSTRUMENT_TARGET_MS,
            detail={
                "runs": len(calibrated),
                "install_ms": [round(r["install_s"] * 1000, 1) for r in calibrated],
                "install_imports_ms": [round(r["install_imports_s"] * 1000, 1) for r in calibrated],
            },
        )
    )
    return rows


def _main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=5, metavar=("VARIANT", "URL", "STREAMS", "EVENTS", "CREATES"))
    parser.add_argument("--paired-child", nargs=4, metavar=("URL", "STREAMS", "EVENTS", "CREATES"))
    args = parser.parse_args(argv)
    if args.paired_child:
        url, streams, events, creates = args.paired_child
        print(json.dumps(_paired_child(url, int(streams), int(events), int(creates))))
        return
    variant, url, streams, events, creates = args.child
    print(json.dumps(_child(variant, url, int(streams), int(events), int(creates))))


if __name__ == "__main__":
    _main(sys.argv[1:])
