"""What every benchmark shares: the measurement row, alternating timed runs, medians and resident memory.

A benchmark returns :class:`Measurement` rows; ``run.py`` prints them as one markdown table and
writes them as JSON. Benchmarks never fail on a slow machine: a missed target is reported in the
row (``met`` false), not raised, and a run that cannot tell says so (``no_verdict``) rather than
claiming a verdict.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Measurement",
    "Timing",
    "alternating_runs",
    "callgrind_control",
    "callgrind_dumps",
    "callgrind_run",
    "environment",
    "markdown_table",
    "median_ratio",
    "resident_bytes",
    "timed",
]


@dataclass(frozen=True)
class Measurement:
    """One result of one benchmark case, with the target it is held against (if any)."""

    benchmark: str
    """Which of the benchmarks: ``stream overhead``, ``attempt cost``, ``store writes``, ..."""
    case: str
    """What was measured, in words: ``sync, 2,000 events, costwatch + memory sink``."""
    metric: str
    """What ``value`` is: ``wall time vs SDK alone``, ``per attempt``, ``attempts/s``, ..."""
    value: float
    unit: str
    """``ratio``, ``us``, ``ms``, ``s``, ``attempts/s`` or ``MB``."""
    target: str = ""
    """The target in words (``<= 1.03``), empty when the row is context rather than a goal."""
    met: bool | None = None
    """Whether ``value`` meets ``target``; ``None`` when there is no target, or no verdict."""
    no_verdict: str = ""
    """Why a row with a target has no verdict (``below noise``): printed in place of yes or no."""
    detail: Mapping[str, Any] = field(default_factory=dict)
    """The raw numbers behind ``value`` (medians of each side of a ratio, sample counts, ...)."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {**asdict(self), "detail": dict(self.detail)}


@dataclass(frozen=True)
class Timing:
    """Wall-clock and process CPU seconds of one timed run."""

    wall_s: float
    cpu_s: float


def timed(action: Callable[[], object]) -> Timing:
    """Run ``action`` once and time it (``time.process_time`` counts every thread of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    action()
    return Timing(time.perf_counter() - wall, time.process_time() - cpu)


def alternating_runs(variants: Mapping[str, Callable[[], Timing]], repeats: int) -> dict[str, list[Timing]]:
    """Run every variant once per round, ``repeats`` rounds, rotating the order each round.

    Alternating (rather than all runs of one variant, then all of the next) spreads slow phases of a
    shared machine over every variant; rotating keeps any variant from always running first.
    """
    names = list(variants)
    timings: dict[str, list[Timing]] = {name: [] for name in names}
    for round_number in range(repeats):
        shift = round_number % len(names)
        for name in names[shift:] + names[:shift]:
            timings[name].append(variants[name]())
    return timings


def median_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """The median of per-round ratios: each run is compared with the baseline run of its own round."""
    return statistics.median(n / d for n, d in zip(numerators, denominators, strict=True) if d > 0)


def resident_bytes() -> int:
    """This process's resident set size now (Linux ``/proc``; elsewhere the peak from ``getrusage``)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def environment() -> dict[str, Any]:
    """Where the numbers were taken: Python, SDK and HTTP library versions, CPUs."""
    # Read from the installed distributions, not by importing them: a run of the store's benchmarks
    # alone never imports the SDK (tests/test_benchmarks_smoke.py runs it on one SDK line only).
    versions: dict[str, Any] = {}
    for name in ("anthropic", "httpx", "httpx2", "sqlalchemy", "costwatch"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "versions": versions,
    }


def _format(value: float, unit: str) -> str:
    if unit == "ratio":
        return f"{value:.3f}x"
    if unit == "attempts/s":
        return f"{value:,.0f} attempts/s"
    if value >= 100:
        return f"{value:,.0f} {unit}"
    return f"{value:.3g} {unit}"


def markdown_table(measurements: Iterable[Measurement]) -> str:
    """The measurements as a markdown table: benchmark, case, metric, result, target, met."""
    lines = [
        "| benchmark | case | metric | result | target | met |",
        "| --- | --- | --- | ---: | --- | --- |",
    ]
    for m in measurements:
        met = m.no_verdict if m.met is None else ("yes" if m.met else "**no**")
        lines.append(
            f"| {m.benchmark} | {m.case} | {m.metric} | {_format(m.value, m.unit)} | {m.target} | {met} |"
        )
    return "\n".join(lines)


# -- instruction counts (valgrind's callgrind), which a loaded machine cannot blur ----------------
_UNDER_CALLGRIND = "COSTWATCH_BENCH_COUNTING"
"""Set (to ``1``) in the environment of a process that :func:`callgrind_run` starts."""


def callgrind_control(*command: str) -> None:
    """Tell callgrind about this process (``-i on``, ``-d NAME``, ...); outside :func:`callgrind_run`,
    nothing."""
    if os.environ.get(_UNDER_CALLGRIND) == "1":
        subprocess.run(["callgrind_control", *command, str(os.getpid())], check=True, capture_output=True)


def callgrind_run(
    command: Sequence[str],
    *,
    out: Path,
    stem: str,
    cwd: str,
    env: Mapping[str, str],
    separate_threads: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` under callgrind, counting nothing until it says ``callgrind_control("-i", "on")``;
    its files go to ``out`` as ``stem.*`` (earlier ones of that stem removed first)."""
    for old in out.glob(f"{stem}.*"):
        old.unlink()
    options = ["--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out / stem}.%p"]
    if separate_threads:
        options.insert(2, "--separate-threads=yes")
    return subprocess.run(
        ["valgrind", *options, *command],
        cwd=cwd,
        env={**env, _UNDER_CALLGRIND: "1"},
        check=True,
        capture_output=True,
        text=True,
    )


def callgrind_dumps(out: Path, stem: str, dumps: Collection[str]) -> dict[str, dict[str, int]]:
    """Instructions in each of the named dumps of one :func:`callgrind_run`, by thread:
    ``{dump: {thread: instructions}}`` (thread ``""`` when threads were not counted apart)."""
    found: dict[str, dict[str, int]] = {}
    for path in out.glob(f"{stem}.*"):
        trigger, total = None, None
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("desc: Trigger: dump "):
                trigger = line.removeprefix("desc: Trigger: dump ").strip()
            elif line.startswith("totals:"):
                total = int(line.split()[1])
        if trigger in dumps and total:
            _, dash, thread = path.name.removeprefix(stem).rpartition("-")
            found.setdefault(trigger, {})[thread if dash else ""] = total
    return found
