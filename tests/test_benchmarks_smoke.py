"""The benchmarks still run: ``benchmarks/run.py --tiny`` prints its table and writes well-formed JSON.

Benchmarks are not tests: nothing here looks at how fast anything was, only that every benchmark
ran and reported its measurements in the documented shape, so that they cannot rot unnoticed; and
how a row's verdict is decided from the numbers it is given (no timing either).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from fresh_process import (  # noqa: E402
    BELOW_NOISE,
    SPANS_TARGET,
    TOO_FEW_ROUNDS,
    create_verdict,
    median_interval,
    paired_rows,
    ratio_verdict,
)
from measure import Measurement, markdown_table  # noqa: E402

COLUMNS = "| benchmark | case | metric | result | target | met |"


# The benchmarks that drive the SDK in the processes they start (run on every SDK line), and those of
# the store alone, which never import it (tests/sdk_lines.py's guard checks): on the newest line only.
SDK_BENCHMARKS = {
    "fresh": {"fresh process"},
    "streams": {"stream overhead"},
    "attempt": {"attempt cost"},
    "memory": {"memory"},
    "huge_event": {"huge SSE event"},
    "sigkill": {"sigkill"},
}
STORE_BENCHMARKS = {
    "store": {"store writes", "store reads"},
    "scrape_load": {"scrape load"},
    "retention": {"retention"},
    "revision": {"revision pass"},
}


def test_the_two_halves_are_every_benchmark() -> None:
    from run import BENCHMARKS as EVERY_BENCHMARK

    assert sorted([*SDK_BENCHMARKS, *STORE_BENCHMARKS]) == sorted(EVERY_BENCHMARK)


@pytest.mark.parametrize(
    "half",
    [
        pytest.param(SDK_BENCHMARKS, marks=pytest.mark.sdk, id="sdk"),
        pytest.param(STORE_BENCHMARKS, id="store"),
    ],
)
@pytest.mark.timeout(900)  # beyond the run's own 600 s, which says more when it is reached
def test_tiny_run_prints_a_table_and_writes_json_for_every_benchmark(
    tmp_path: Path, half: dict[str, set[str]]
) -> None:
    results = tmp_path / "results.json"
    only = [word for name in half for word in ("--only", name)]
    finished = subprocess.run(
        [sys.executable, str(BENCHMARKS / "run.py"), "--tiny", *only, "--json", str(results)],
        capture_output=True,
        text=True,
        timeout=600,  # every benchmark at its smallest: seconds each idle, minutes on a loaded machine
        cwd=tmp_path,
    )
    assert finished.returncode == 0, finished.stderr[-2000:]

    table = finished.stdout.strip().splitlines()
    assert table[0] == COLUMNS
    rows = [line for line in table[2:] if line.startswith("| ")]
    assert all(line.count("|") == COLUMNS.count("|") for line in rows)

    document = json.loads(results.read_text())
    assert document["mode"] == "tiny"
    assert document["environment"]["versions"]["anthropic"]
    measurements = document["measurements"]
    assert len(measurements) == len(rows)
    assert {m["benchmark"] for m in measurements} == set().union(*half.values())
    for m in measurements:
        assert set(m) == {
            "benchmark",
            "case",
            "metric",
            "value",
            "unit",
            "target",
            "met",
            "no_verdict",
            "detail",
        }
        assert isinstance(m["value"], (int, float)) and math.isfinite(m["value"])
        assert m["met"] in (True, False, None)
        assert m["no_verdict"] in ("", BELOW_NOISE, SPANS_TARGET, TOO_FEW_ROUNDS)
        assert (m["met"] is None) == (
            m["target"] == "" or m["target"].startswith("(") or m["no_verdict"] != ""
        )
        assert m["no_verdict"] == "" or m["target"] != ""


def test_a_create_cost_at_or_below_zero_has_no_verdict() -> None:
    assert create_verdict(-51.5, noise_us=0.0, target_us=100.0) is None
    assert create_verdict(-51.5, noise_us=30.0, target_us=100.0) is None
    assert create_verdict(0.0, noise_us=0.0, target_us=100.0) is None


def test_a_create_cost_within_the_controls_noise_has_no_verdict_however_it_reads() -> None:
    assert create_verdict(40.0, noise_us=40.0, target_us=100.0) is None
    assert create_verdict(250.0, noise_us=600.0, target_us=100.0) is None


def test_a_create_cost_above_the_noise_is_held_against_the_target() -> None:
    assert create_verdict(60.0, noise_us=20.0, target_us=100.0) is True
    assert create_verdict(100.0, noise_us=20.0, target_us=100.0) is True
    assert create_verdict(327.0, noise_us=20.0, target_us=100.0) is False


def test_the_medians_interval_needs_six_values_at_95_percent() -> None:
    assert median_interval([1.0, 1.1, 1.2, 1.3, 1.4]) is None
    assert median_interval([1.3, 1.0, 1.5, 1.1, 1.2, 1.4]) == (1.0, 1.5)


def test_the_medians_interval_runs_between_binomial_order_statistics() -> None:
    # 9 values: P(Bin(9, 1/2) <= 1) = 1.95% <= 2.5% < P(<= 2) = 8.98%: the 2nd to the 8th.
    assert median_interval([float(v) for v in (9, 1, 8, 2, 7, 3, 6, 4, 5)]) == (2.0, 8.0)
    # 60 values: P(Bin(60, 1/2) <= 21) = 1.36% <= 2.5% < P(<= 22) = 2.62%: the 22nd to the 39th.
    assert median_interval([float(v) for v in range(1, 61)]) == (22.0, 39.0)


def test_a_loop_ratio_is_met_or_missed_only_when_its_whole_interval_is() -> None:
    nine_at = [0.99, 1.0, 1.0, 1.01, 1.01, 1.01, 1.02, 1.02, 1.05]
    assert ratio_verdict(nine_at, 1.03) is True
    assert ratio_verdict([r + 0.05 for r in nine_at], 1.03) is False
    # A median of 1.01 whose interval reaches 1.08: the run cannot tell.
    assert ratio_verdict([0.9, 0.95, 0.99, 1.0, 1.01, 1.02, 1.05, 1.08, 1.2], 1.03) is None
    assert ratio_verdict([1.0, 1.0, 1.0], 1.03) is None


def _pair(accounted: float, plain: float, others: float = 0.0) -> dict[str, float]:
    return {
        "accounted_cpu_s": accounted,
        "plain_cpu_s": plain,
        "accounted_wall_s": accounted,
        "plain_wall_s": plain,
        "others_cpu_s": others,
    }


def test_a_paired_loop_charges_the_other_threads_cpu_to_the_accounted_stream() -> None:
    # Each pair: the accounted stream 1.00 s on its thread, the plain one 1.00 s, the writer 0.02 s.
    run = {
        "loop": [_pair(1.0, 1.0, 0.02)] * 6,
        "create": [_pair(0.002, 0.002)] * 6,
        "flush_others_cpu_s": 0.0,
    }
    wall, cpu, _create = paired_rows([run], streams=6, events=10)
    assert wall.value == pytest.approx(1.0) and wall.met is True
    assert cpu.value == pytest.approx(1.02) and cpu.met is True
    assert cpu.detail["pairs"] == 6


def test_a_paired_create_is_the_callers_median_difference_plus_the_writers_cpu_spread_over_the_calls() -> (
    None
):
    # The caller: +100 us a call in most pairs (one outlier pair the median ignores); the writer:
    # 10 ms during the calls and 30 ms in the final flush, over 100 calls: +400 us a call.
    creates = [_pair(0.0021, 0.002)] * 99 + [_pair(0.05, 0.002, 0.01)]
    runs = [{"loop": [_pair(1.0, 1.0)] * 6, "create": creates, "flush_others_cpu_s": 0.03}] * 6
    create = paired_rows(runs, streams=6, events=10)[2]
    assert create.value == pytest.approx(500.0)
    assert create.met is False and create.detail["interval_95"] == [500.0, 500.0]
    assert create.detail["plain_us"] == pytest.approx(2000.0)
    assert create.detail["caller_us"] == pytest.approx(100.0)
    assert create.detail["writer_us"] == pytest.approx(400.0)


def test_a_row_without_a_verdict_prints_why_instead_of_yes_or_no() -> None:
    rows = [
        Measurement("fresh process", "create", "per call", -51.5, "us", "<= 100 us", None, BELOW_NOISE),
        Measurement("fresh process", "create", "per call", 60.0, "us", "<= 100 us", True),
        Measurement("fresh process", "create", "per call", 327.0, "us", "<= 100 us", False),
        Measurement("fresh process", "create, control", "per call", 12.0, "us"),
    ]
    verdicts = [line.rsplit("|", 2)[1].strip() for line in markdown_table(rows).splitlines()[2:]]
    assert verdicts == [BELOW_NOISE, "yes", "**no**", ""]


@pytest.mark.sdk
@pytest.mark.timeout(900)
def test_the_waste_levers_benchmark_prints_its_table_and_json_for_every_lever(tmp_path: Path) -> None:
    finished = subprocess.run(
        [sys.executable, str(BENCHMARKS / "waste_levers.py"), "--tiny"],
        capture_output=True,
        text=True,
        timeout=600,  # generous: a loaded machine is slow, not wrong
        cwd=tmp_path,
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    lines = finished.stdout.strip().splitlines()
    header = next(line for line in lines if line.startswith("| lever |"))
    rows = [line for line in lines if line.startswith("| ") and line != header and "---" not in line]
    assert len(rows) == 5 and all(row.count("|") == header.count("|") for row in rows)
    document = json.loads(lines[-1])
    assert document["outcomes"][0]["lever"].startswith("baseline")
    for outcome in document["outcomes"]:
        assert math.isfinite(outcome["billed_usd"]) and outcome["billed_usd"] > 0
        assert outcome["attempts"] >= document["workload"]["requests"]
